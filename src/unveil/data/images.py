"""Image paths and loading.

Paths in records are relative to a data root and may not escape it. Loaders are chosen by
file suffix, so a new medical format (DICOM, NIfTI, ...) is one function registered here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image

from unveil.data.errors import RecordError

# suffix -> loader(path) -> RGB PIL image; medical formats register themselves on import.
LOADERS: dict[str, Callable[[Path], Image.Image]] = {}


def register_loader(*suffixes: str):
    def deco(fn):
        for s in suffixes:
            LOADERS[s.lower()] = fn
        return fn

    return deco


def resolve(root: str | Path, rel: str, file: str | None = None, record=None, field: str = "image") -> Path:
    """Join a record's relative path to the data root, refusing paths that leave the root."""
    if not isinstance(rel, str) or not rel.strip():
        raise RecordError(file, record, field, f"expected a relative image path, got {rel!r}")
    root = Path(root).resolve()
    p = (root / rel).resolve()
    if p != root and root not in p.parents:
        raise RecordError(file, record, field, f"path {rel!r} escapes the data root {root}")
    return p


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def load_image(path: str | Path) -> Image.Image:
    """Load any supported image as RGB. Raises OSError with the path when it cannot."""
    path = Path(path)
    loader = LOADERS.get(_suffix(path))
    if loader is not None:
        return loader(path)
    with Image.open(path) as im:
        return im.convert("RGB")


def image_size(path: str | Path, file: str | None = None, record=None, field: str = "image") -> tuple[int, int]:
    """(width, height) of an image, read cheaply; a RecordError naming the record if unreadable."""
    path = Path(path)
    if not path.exists():
        raise RecordError(file, record, field, f"image not found: {path}")
    try:
        if _suffix(path) in LOADERS:
            return load_image(path).size
        with Image.open(path) as im:
            im.verify() if path.stat().st_size < 64 else None
            return im.size
    except RecordError:
        raise
    except Exception as e:  # PIL raises several types for corrupt files
        raise RecordError(file, record, field, f"unreadable image {path}: {e}") from None


from unveil.data import medical  # noqa: E402,F401  (registers the DICOM / NIfTI loaders)
