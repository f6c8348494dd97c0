"""Image paths and loading.

Paths in records are relative to a data root and may not escape it. Loaders are chosen by
file suffix, so a new medical format (DICOM, NIfTI, ...) is one function registered here. A
path may end in a fragment that a loader reads as options, e.g. ``ct.nii.gz#z=42`` (one slice of
a volume per record) or ``cine.dcm#frame=3``; the fragment stays on the path in ``Sample.images``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from unveil.data.errors import RecordError

# suffix -> loader(path, **fragment options) -> RGB PIL image; medical formats register themselves on import.
LOADERS: dict[str, Callable[..., Image.Image]] = {}
LOADER_OPTIONS: dict[str, tuple[str, ...]] = {}  # suffix -> the fragment keys its loader takes
_FRAGMENT = re.compile(r"^(?P<path>.+?)#(?P<opts>[a-z]+=-?\d+(?:,[a-z]+=-?\d+)*)$")


def register_loader(*suffixes: str, options: tuple[str, ...] = ()):
    def deco(fn):
        for s in suffixes:
            LOADERS[s.lower()] = fn
            LOADER_OPTIONS[s.lower()] = tuple(options)
        return fn

    return deco


def split_fragment(path: str | Path) -> tuple[Path, dict[str, int]]:
    """(the file, its fragment's options): ``"ct.nii.gz#z=42,t=1"`` -> (ct.nii.gz, {"z": 42, "t": 1}).
    Raises ValueError for keys the file's loader does not take."""
    m = _FRAGMENT.match(str(path))
    if not m:
        return Path(path), {}
    base = Path(m.group("path"))
    opts = {k: int(v) for k, v in (kv.split("=") for kv in m.group("opts").split(","))}
    known = LOADER_OPTIONS.get(_suffix(base), ())
    bad = sorted(set(opts) - set(known))
    if bad:
        where = f"the {_suffix(base) or 'suffix-less'} loader takes {list(known)}" if known else "only for NIfTI/DICOM"
        raise ValueError(f"{path}: unknown path option(s) {bad} after '#' ({where})")
    return base, opts


def resolve(root: str | Path, rel: str, file: str | None = None, record=None, field: str = "image") -> Path:
    """Join a record's relative path to the data root, refusing paths that leave the root. A loader
    fragment (``#z=42``) is checked and kept on the returned path."""
    if not isinstance(rel, str) or not rel.strip():
        raise RecordError(file, record, field, f"expected a relative image path, got {rel!r}")
    try:
        base, opts = split_fragment(rel)
    except ValueError as e:
        raise RecordError(file, record, field, str(e)) from None
    root = Path(root).resolve()
    p = (root / base).resolve()
    if p != root and root not in p.parents:
        raise RecordError(file, record, field, f"path {rel!r} escapes the data root {root}")
    return Path(f"{p}#{','.join(f'{k}={v}' for k, v in opts.items())}") if opts else p


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def load_image(path: str | Path) -> Image.Image:
    """Load any supported image as RGB. Raises OSError with the path when it cannot."""
    path, opts = split_fragment(path)
    loader = LOADERS.get(_suffix(path))
    if loader is not None:
        return loader(path, **opts)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:  # name the file: PIL's "image file is truncated" does not
        raise OSError(f"{path}: cannot decode image (truncated or corrupt): {e}") from e


def decode_fully(im: Image.Image) -> None:
    """Decode every pixel of an opened image, as the collator will: a truncated or corrupt file
    raises here. A JPEG is decoded at 1/8 scale (``draft``): the whole entropy-coded stream is
    still read, so truncation is caught, at a fraction of the cost."""
    w, h = im.size
    if im.format == "JPEG":
        im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
    im.load()


@functools.lru_cache(maxsize=1 << 17)
def _checked_size(path: str, mtime_ns: int, n_bytes: int) -> tuple[int, int] | str:
    """(width, height) of a fully decoded image, or why it cannot be decoded.

    Cached per file version (path, mtime, size): records sharing an image (MMedPO, Med-MIM, the
    closed questions of a synthetic study) decode it once. Cost: one decode per distinct image,
    about 1-5 ms for a 512 x 512 PNG or JPEG on one core (a 60k-image set: a few minutes, once,
    at setup); ``data.check_images=false`` skips it.
    """
    try:
        with Image.open(path) as im:
            size = im.size
            decode_fully(im)
            return size
    except Exception as e:  # PIL raises several types for corrupt files
        return f"{type(e).__name__}: {e}"


def image_size(path: str | Path, file: str | None = None, record=None, field: str = "image") -> tuple[int, int]:
    """(width, height) of an image after decoding it fully; a RecordError naming the record when
    the file is missing, unreadable, truncated or corrupt (what would otherwise crash a DataLoader
    worker mid-training with a bare PIL ``OSError``)."""
    full = path
    try:
        path, _ = split_fragment(path)
    except ValueError as e:
        raise RecordError(file, record, field, str(e)) from None
    if not path.exists():
        raise RecordError(file, record, field, f"image not found: {path}")
    if _suffix(path) in LOADERS:
        # DICOM / NIfTI: the loader decodes the frame or slice; not cached, the size depends on
        # data.medical (the NIfTI slice axis)
        try:
            got = load_image(full).size
        except Exception as e:  # the medical loaders raise OSError naming the path
            got = f"{type(e).__name__}: {e}"
    else:
        st = path.stat()
        got = _checked_size(str(path), st.st_mtime_ns, st.st_size)
    if isinstance(got, str):
        raise RecordError(file, record, field, f"unreadable image {full}: cannot decode (truncated or corrupt): {got}")
    return got


from unveil.data import medical  # noqa: E402,F401  (registers the DICOM / NIfTI loaders)
