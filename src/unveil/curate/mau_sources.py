"""Identified abnormal areas from segmentation and detection data sets, for the MAU builder.

Every source (one entry of ``builder.sources``) yields :class:`Study` objects: one 2D image and
its abnormal areas (:class:`Region`: finding name, normalised box, the component's mask when
there is one). ``kind``:

- ``masks``: 2D label masks (PNG, BMP, TIFF or ``.npy``; pixel value = label id) paired with
  images by file name: the path under ``masks`` without its extension and ``mask_suffix``
  equals the path under ``images`` without its extension and ``image_suffix``
  (``case1_mask.png`` <-> ``case1.png`` with ``mask_suffix: _mask``). ``binary: true`` reads
  every non-zero pixel as label 1 (0/255 masks).
- ``nifti``: a label volume and its image volume, paired the same way (``labels`` /
  ``label_suffix``). Slices along ``axis`` (0 sagittal, 1 coronal, 2 axial, RAS+ as in
  :mod:`unveil.data.medical`) are ranked by lesion area (voxels of kept labels); the largest
  ``max_slices`` with at least ``min_area`` voxels and ``min_gap`` slices apart become studies
  (one record set per slice). Up to ``normal_per_volume`` lesion-free slices whose foreground
  (pixels above the slice minimum) covers at least ``normal_min_foreground`` are normal
  candidates. The slice is rendered with :func:`unveil.data.medical.nifti_slice` (the image
  loader's orientation) and written as a PNG by the builder: record files have no syntax for
  "slice k of this volume".
- ``dicom_seg``: DICOM Segmentation objects that pydicom reads (BINARY or FRACTIONAL), each frame
  naming its source image through ``DerivationImageSequence``; the source images are found by
  SOPInstanceUID under ``images``. Segment numbers are the label ids; a segment without an entry
  in ``label_names`` is named by its ``SegmentLabel``. Referenced images are ranked by area as
  NIfTI slices are (gaps in ``InstanceNumber``); the source DICOM file is the record's image.
- ``boxes``: a box table (CSV, JSON array or JSONL) with columns ``image``, ``x1``, ``y1``,
  ``x2``, ``y2``, ``label`` (optional ``patient_id``; other names via ``columns``), ``units:
  pixel`` (default) or ``normalized``. Rows without coordinates, or whose label is in
  ``normal_labels``, mark a normal image.

Masks become one box per connected component of each label id (``scipy.ndimage.label``,
``connectivity`` 8 or 4); components under ``min_component_px`` pixels are dropped. Label ids
map to finding names through ``label_names``; ids in ``ignore_labels`` (e.g. KiTS's kidney) are
not abnormal; any other id is an error naming the file. Patient ids: group 1 of
``patient_regex`` searched in the pairing key, else the key itself (one patient per image or
volume), the SEG's ``PatientID``, or the table's ``patient_id`` column.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".nii", ".nii.gz")
MASK_EXTS = (".png", ".bmp", ".tif", ".tiff", ".npy")
VOLUME_EXTS = (".nii", ".nii.gz")


@dataclass
class Region:
    """One identified abnormal area: a connected component of a label, or a box of a table."""

    label: int | str
    finding: str
    box: tuple[float, float, float, float]  # normalised xyxy, pixel edges: a 1-px component has area > 0
    mask: np.ndarray | None = None  # bool crop of the component inside its pixel box
    origin: tuple[int, int] = (0, 0)  # (row, col) of the crop's top-left pixel


@dataclass
class Study:
    """One 2D image with its abnormal areas (none: a normal study)."""

    study_id: str
    patient_id: str
    source: str
    size: tuple[int, int]  # (width, height)
    regions: list[Region] = field(default_factory=list)
    image: str | None = None  # an existing 2D image, or None when ``render`` writes it
    render: Callable[[Path], None] | None = None  # writes the image (a NIfTI slice) as a PNG
    modality: str | None = None
    meta: dict = field(default_factory=dict)
    area: int = 0  # lesion pixels, for ranking


@dataclass
class MaskRules:
    """Label ids -> finding names, and how masks become regions."""

    label_names: dict[int, str]
    ignore_labels: tuple = ()
    min_component_px: int = 10
    connectivity: int = 8

    def __post_init__(self):
        self.label_names = {label_key(k): str(v) for k, v in (self.label_names or {}).items()}
        self.ignore_labels = tuple(label_key(k) for k in (self.ignore_labels or ()))
        if self.connectivity not in (4, 8):
            raise ValueError(f"builder.connectivity must be 4 or 8, got {self.connectivity}")

    def kept(self, labels: np.ndarray, where: str, fallback: dict | None = None) -> list[int]:
        """The label ids present that are abnormal; an id with no name is an error naming ``where``."""
        ids = [int(v) for v in np.unique(labels) if v != 0 and int(v) not in self.ignore_labels]
        names = {**(fallback or {}), **self.label_names}
        unknown = [i for i in ids if i not in names]
        if unknown:
            raise ValueError(
                f"{where}: label id(s) {unknown} have no name in builder.label_names "
                f"({self.label_names or 'empty'}); name them, or list them in builder.ignore_labels"
            )
        return ids

    def regions(self, masks: dict[int, np.ndarray], names: dict | None = None) -> tuple[list[Region], int]:
        """(regions in reading order, components dropped as too small) of {label id: bool mask}."""
        names = {**(names or {}), **self.label_names}
        out, dropped = [], 0
        for lab, m in sorted(masks.items()):
            got, n_small = components(m, lab, names[lab], self.min_component_px, self.connectivity)
            out += got
            dropped += n_small
        return reading_order(out), dropped


def label_key(k) -> int | str:
    """A label id as an int when it reads as one (YAML and CSV give strings), else the string."""
    try:
        return int(str(k).strip())
    except ValueError:
        return str(k).strip()


def components(mask: np.ndarray, label, finding: str, min_px: int, connectivity: int = 8):
    """(one Region per connected component of a bool mask, how many were under ``min_px`` pixels)."""
    from scipy import ndimage

    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    lab, _ = ndimage.label(mask, structure=structure)
    h, w = mask.shape
    out, dropped = [], 0
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        crop = lab[sl] == k
        if int(crop.sum()) < min_px:
            dropped += 1
            continue
        r0, r1, c0, c1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        out.append(Region(label, finding, (c0 / w, r0 / h, c1 / w, r1 / h), crop, (r0, c0)))
    return out, dropped


def reading_order(regions: list[Region]) -> list[Region]:
    """Left to right, then top to bottom (the synthetic set's order: "the first box" is the leftmost)."""
    return sorted(regions, key=lambda r: (r.box[0], r.box[1]))


def choose_slices(areas: dict[int, int], max_n: int, min_area: int, min_gap: int) -> list[int]:
    """Indices with the largest areas (>= ``min_area``), at least ``min_gap`` apart, at most ``max_n``."""
    chosen: list[int] = []
    for i, a in sorted(areas.items(), key=lambda kv: (-kv[1], kv[0])):
        if a < min_area or len(chosen) >= max_n:
            break
        if all(abs(i - j) >= min_gap for j in chosen):
            chosen.append(i)
    return sorted(chosen)


# --- files and pairing ----------------------------------------------------------------------------
def strip_ext(name: str) -> str:
    low = name.lower()
    for ext in (".nii.gz", *IMAGE_EXTS, *MASK_EXTS):
        if low.endswith(ext):
            return name[: -len(ext)]
    return name


def list_files(spec: str, exts: tuple, where: str) -> tuple[Path, list[Path]]:
    """(root, files): every file with one of ``exts`` under a folder, or matching a glob pattern."""
    p = Path(str(spec)).expanduser()
    if p.is_dir():
        root, files = p, p.rglob("*")
    elif any(ch in str(spec) for ch in "*?["):
        parts = p.parts
        k = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
        root = Path(*parts[:k]) if k else Path(".")
        files = root.glob(str(Path(*parts[k:])))
    elif p.is_file():
        root, files = p.parent, [p]
    else:
        raise FileNotFoundError(f"{where}: {spec} not found")
    found = sorted(f for f in files if f.is_file() and (not exts or f.name.lower().endswith(exts)))
    if not found:
        raise FileNotFoundError(f"{where}: no {'/'.join(exts)} files in {spec}")
    return root.resolve(), [f.resolve() for f in found]


def pair(images: str, masks: str, image_suffix: str, mask_suffix: str, img_exts, mask_exts, where: str):
    """(image root, [(key, image, mask)], images without a mask): files matched by key."""
    img_root, img_files = list_files(images, img_exts, f"{where} images")
    mask_root, mask_files = list_files(masks, mask_exts, f"{where} masks")

    def keyed(root: Path, files: list[Path], suffix: str, what: str) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for f in files:
            key = strip_ext(f.relative_to(root).as_posix())
            key = key[: -len(suffix)] if suffix and key.endswith(suffix) else key
            if key in out and out[key] != f:
                raise ValueError(f"{where}: {what} {out[key]} and {f} have the same key {key!r}")
            out[key] = f
        return out

    by_img = keyed(img_root, [f for f in img_files if f not in mask_files], image_suffix, "images")
    by_mask = keyed(mask_root, mask_files, mask_suffix, "masks")
    pairs = [(k, by_img[k], by_mask[k]) for k in sorted(by_mask) if k in by_img]
    orphans = sorted(set(by_mask) - set(by_img))
    if orphans:
        log.warning("%s: %d mask(s) without an image, e.g. %s", where, len(orphans), by_mask[orphans[0]])
    if not pairs:
        raise FileNotFoundError(
            f"{where}: no mask matches an image (keys: path without extension and suffix; "
            f"e.g. mask key {next(iter(by_mask))!r}, image key {next(iter(by_img), None)!r})"
        )
    return img_root, pairs, len(set(by_img) - set(by_mask))


def safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def patient_of(key: str, regex: str | None, where: str) -> str:
    if not regex:
        return safe_id(key)
    m = re.search(regex, key)
    if m is None:
        raise ValueError(f"{where}: patient_regex {regex!r} does not match {key!r}")
    return m.group(1) if m.groups() else m.group(0)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of a 2D image; medical formats through their loader."""
    from unveil.data.images import LOADERS, _suffix, load_image

    if _suffix(path) in LOADERS:
        return load_image(path).size
    with Image.open(path) as im:
        return im.size


def read_mask(path: Path, binary: bool) -> np.ndarray:
    """A 2D label mask as integers (palette index or grey value = label id)."""
    if path.suffix.lower() == ".npy":
        arr = np.load(path, allow_pickle=False)
    else:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB") if im.mode in ("RGB", "RGBA", "LA") else im)
    if arr.ndim == 3:
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])):
            raise ValueError(f"{path}: a colour mask; give a single-channel label mask (pixel value = label id)")
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2D mask, got shape {arr.shape}")
    arr = np.rint(arr).astype(np.int64)
    return (arr != 0).astype(np.int64) if binary else arr


# --- the sources ----------------------------------------------------------------------------------
def mask_studies(src: dict, rules: MaskRules, stats, where: str, rng=None) -> tuple[Path, list[Study]]:
    """``kind: masks``: one study per (image, mask) pair."""
    root, pairs, unpaired = pair(
        src["images"], src["masks"], src.get("image_suffix", ""), src.get("mask_suffix", ""),
        IMAGE_EXTS, MASK_EXTS, where,
    )  # fmt: skip
    stats["images_without_mask"] += unpaired
    out = []
    for key, img, mpath in pairs:
        labels = read_mask(mpath, bool(src.get("binary", False)))
        w, h = image_size(img)
        if labels.shape != (h, w):
            raise ValueError(f"{where}: mask {mpath} is {labels.shape[1]}x{labels.shape[0]}, image {img} is {w}x{h}")
        ids = rules.kept(labels, str(mpath))
        regions, dropped = rules.regions({i: labels == i for i in ids})
        stats["components_too_small"] += dropped
        if ids and not regions:
            stats["only_small_components"] += 1
            continue
        area = int(sum(int(r.mask.sum()) for r in regions))
        sid = safe_id(key)
        meta = {"source_image": img.relative_to(root).as_posix(), "source_mask": mpath.name}
        pid = patient_of(key, src.get("patient_regex"), where)
        out.append(Study(sid, pid, "masks", (w, h), regions, image=str(img), meta=meta, area=area))
    return root, out


def _nifti_pairs(src: dict, where: str):
    root, pairs, unpaired = pair(
        src["images"], src["labels"], src.get("image_suffix", ""), src.get("label_suffix", ""),
        VOLUME_EXTS, VOLUME_EXTS, where,
    )  # fmt: skip
    return root, pairs, unpaired


def _axis_areas(lab_img, lesion: np.ndarray, axis: int, canonical: bool) -> dict[int, int]:
    """{display slice index: lesion voxels}; display indices as :func:`medical.nifti_slice` counts them."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(lab_img.affine) if canonical else np.array([[0, 1], [1, 1], [2, 1]])
    j = int(np.flatnonzero(ornt[:, 0] == axis)[0])
    per = lesion.sum(axis=tuple(a for a in range(3) if a != j))
    size = lesion.shape[j]
    return {(i if ornt[j, 1] > 0 else size - 1 - i): int(v) for i, v in enumerate(per)}


def _check_volumes(img_path: Path, lab_path: Path, canonical: bool):
    """(image, label) nibabel images with the same grid; an error naming both files otherwise."""
    import nibabel as nib

    img, lab = nib.load(str(img_path)), nib.load(str(lab_path))
    if lab.ndim != 3 or img.shape[:3] != lab.shape:
        raise ValueError(f"label volume {lab_path} {lab.shape} does not match image volume {img_path} {img.shape}")
    same = np.array_equal(nib.orientations.io_orientation(img.affine), nib.orientations.io_orientation(lab.affine))
    if canonical and not same:
        raise ValueError(f"label volume {lab_path} and image volume {img_path} have different orientations")
    return img, lab


def _nifti_normals(img_path: Path, free: list[int], opts: dict, rng, limit: int, min_fg: float) -> list[int]:
    """Up to ``limit`` lesion-free slices (random order, at most 4 x ``limit`` read) whose foreground
    (pixels above the slice's minimum) covers at least ``min_fg`` of the slice."""
    from unveil.data.medical import nifti_slice

    out: list[int] = []
    for i in rng.permutation(free)[: 4 * limit] if limit > 0 and free else []:
        plane = nifti_slice(img_path, index=int(i), **opts)
        if float((plane > plane.min()).mean()) >= min_fg:
            out.append(int(i))
        if len(out) >= limit:
            break
    return sorted(out)


def _slice_renderer(img_path: Path, index: int, opts: dict, window, percentile) -> Callable[[Path], None]:
    def render(dst: Path) -> None:
        from unveil.data.medical import apply_window, nifti_slice, percentile_window

        plane = nifti_slice(img_path, index=index, **opts)
        c, w = (float(x) for x in window) if window is not None else percentile_window(plane, tuple(percentile))
        Image.fromarray(apply_window(plane, c, w)).save(dst)

    return render


def nifti_studies(src: dict, rules: MaskRules, stats, where: str, rng) -> tuple[Path, list[Study]]:
    """``kind: nifti``: studies from the chosen slices of each label volume (+ normal candidates)."""
    from unveil.data.medical import nifti_slice

    root, pairs, unpaired = _nifti_pairs(src, where)
    stats["volumes_without_labels"] += unpaired
    axis, canonical = int(src.get("axis", 2)), bool(src.get("canonical", True))
    opts = {"axis": axis, "canonical": canonical, "volume": int(src.get("volume", 0))}
    out = []
    for key, img_path, lab_path in pairs:
        img, lab = _check_volumes(img_path, lab_path, canonical)
        labels = np.rint(np.asanyarray(lab.dataobj)).astype(np.int64)
        ids = rules.kept(labels, str(lab_path))
        areas = _axis_areas(lab, np.isin(labels, ids), axis, canonical)
        del labels
        chosen = choose_slices(
            areas, int(src.get("max_slices", 3)), int(src.get("min_area", 50)), int(src.get("min_gap", 5))
        )
        free = [i for i, a in areas.items() if a == 0]
        n_normal, min_fg = int(src.get("normal_per_volume", 2)), float(src.get("normal_min_foreground", 0.2))
        normals = _nifti_normals(img_path, free, opts, rng, n_normal, min_fg)
        pid = patient_of(key, src.get("patient_regex"), where)
        w, h = nifti_slice(lab_path, index=0, **opts).shape[::-1]
        for i in chosen + normals:
            regions: list[Region] = []
            if i in chosen:
                plane = np.rint(nifti_slice(lab_path, index=i, **opts)).astype(np.int64)
                regions, dropped = rules.regions({k: plane == k for k in ids})
                stats["components_too_small"] += dropped
                if not regions:
                    stats["only_small_components"] += 1
                    continue
            sid = safe_id(f"{key}_{'sca'[axis]}{i:04d}")
            render = _slice_renderer(img_path, i, opts, src.get("window"), src.get("percentile", (0.5, 99.5)))
            meta = {"source_volume": img_path.relative_to(root).as_posix(), "source_slice": {"axis": axis, "index": i}}
            out.append(Study(sid, pid, "nifti", (w, h), regions, render=render, meta=meta, area=areas[i]))
    return root, out


# --- DICOM SEG ------------------------------------------------------------------------------------
def _dicom_index(images: str, where: str) -> tuple[Path, dict[str, tuple[Path, int]]]:
    """(root, {SOPInstanceUID: (file, InstanceNumber)}) of the DICOM files under ``images``."""
    import pydicom

    root, files = list_files(images, (), f"{where} images")
    out = {}
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "InstanceNumber"])
        except Exception:  # not a DICOM file (a DICOMDIR's neighbours, notes): not an image of the series
            continue
        if "SOPInstanceUID" in ds:
            out[str(ds.SOPInstanceUID)] = (f, int(ds.get("InstanceNumber") or 0))
    if not out:
        raise FileNotFoundError(f"{where}: no DICOM files under {images}")
    return root, out


def _source_ref(group) -> tuple[str, int | None] | None:
    """(ReferencedSOPInstanceUID, ReferencedFrameNumber or None) of a functional group, if it names one."""
    der = group.get("DerivationImageSequence") if group is not None else None
    if not der or not der[0].get("SourceImageSequence"):
        return None
    ref = der[0].SourceImageSequence[0]
    frame = ref.get("ReferencedFrameNumber")
    return str(ref.ReferencedSOPInstanceUID), (int(_first_of(frame)) if frame not in (None, "") else None)


def _first_of(v):
    try:
        return list(v)[0]
    except TypeError:
        return v


def read_seg(path: Path) -> tuple[object, dict[str, dict[int, np.ndarray]], dict[int, str]]:
    """(dataset, {source SOPInstanceUID: {segment number: bool mask}}, {segment number: SegmentLabel})."""
    import pydicom

    ds = pydicom.dcmread(path)
    if ds.get("Modality") != "SEG":
        raise ValueError(f"{path}: not a DICOM segmentation (Modality {ds.get('Modality')!r})")
    names = {
        int(it.SegmentNumber): str(it.get("SegmentLabel") or f"segment {it.SegmentNumber}")
        for it in ds.SegmentSequence
    }
    try:
        frames = np.asarray(ds.pixel_array).reshape(-1, int(ds.Rows), int(ds.Columns))
    except Exception as e:
        raise OSError(f"{path}: pydicom cannot decode the segmentation's frames: {e}") from e
    if str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        masks = frames > float(ds.get("MaximumFractionalValue") or 255) / 2.0
    else:
        masks = frames > 0
    groups = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(groups) != len(masks):
        raise ValueError(f"{path}: {len(masks)} frame(s) but {len(groups)} per-frame functional group(s)")
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    acc: dict[str, dict[int, np.ndarray]] = {}
    for i, fg in enumerate(groups):
        seg_no = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ref = _source_ref(fg) or _source_ref(shared)
        if ref is None:
            raise ValueError(
                f"{path} frame {i + 1}: names no source image (DerivationImageSequence/SourceImageSequence); "
                "segmentations that give only plane positions are not supported"
            )
        if ref[1] is not None:
            raise ValueError(f"{path} frame {i + 1}: refers to frame {ref[1]} of a multi-frame image (not supported)")
        per = acc.setdefault(ref[0], {})
        per[seg_no] = per[seg_no] | masks[i] if seg_no in per else masks[i].copy()
    return ds, acc, names


def seg_studies(src: dict, rules: MaskRules, stats, where: str, rng) -> tuple[Path, list[Study]]:
    """``kind: dicom_seg``: the referenced images with the largest segmented areas (+ normal candidates)."""
    root, index = _dicom_index(src["images"], where)
    _, seg_files = list_files(src["seg"], (), f"{where} seg")
    out = []
    for path in seg_files:
        ds, per_image, names = read_seg(path)
        missing = [u for u in per_image if u not in index]
        if missing:
            raise FileNotFoundError(f"{path}: source image {missing[0]} is not under {src['images']}")
        found: dict[str, tuple[list[Region], int]] = {}
        for uid, masks in per_image.items():
            ids = rules.kept(np.array(sorted(masks)), str(path), fallback=names)
            regions, dropped = rules.regions({k: masks[k] for k in ids if masks[k].any()}, names)
            stats["components_too_small"] += dropped
            found[uid] = (regions, int(sum(int(r.mask.sum()) for r in regions)))
        # positions in the series (InstanceNumber order; ties and missing numbers by UID) rank and name the slices
        order = {u: k for k, u in enumerate(sorted(found, key=lambda u: (index[u][1], u)))}
        areas = {order[u]: a for u, (_, a) in found.items()}
        chosen = set(choose_slices(areas, int(src.get("max_slices", 3)), int(src.get("min_area", 50)),
                                   int(src.get("min_gap", 1))))  # fmt: skip
        free = [u for u, (r, _) in found.items() if not r]
        normals = set(rng.permutation(free)[: int(src.get("normal_per_volume", 2))].tolist()) if free else set()
        pid = str(ds.get("PatientID") or "") or patient_of(strip_ext(path.name), src.get("patient_regex"), where)
        for uid in sorted(found, key=order.get):
            (regions, area), img = found[uid], index[uid][0]
            if (order[uid] in chosen and regions) or uid in normals:
                sid = safe_id(f"{strip_ext(path.name)}_{order[uid]:04d}")
                meta = {"source_image": img.relative_to(root).as_posix(), "source_seg": path.name}
                size = (int(ds.Columns), int(ds.Rows))
                out.append(Study(sid, safe_id(pid), "dicom_seg", size, regions, image=str(img), meta=meta, area=area))
    return root, out


# --- box tables -----------------------------------------------------------------------------------
BOX_COLUMNS = ("image", "x1", "y1", "x2", "y2", "label", "patient_id")


def read_table(path: Path) -> list[dict]:
    """Rows of a CSV/TSV file, a JSON array of objects, or JSONL."""
    if not path.is_file():
        raise FileNotFoundError(f"box table {path} not found")
    if path.suffix.lower() in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    if path.suffix.lower() == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    data = json.loads(path.read_text(encoding="utf-8-sig"))
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a JSON array of objects (one per box)")
    return data


def _row_box(row: dict, cols: dict, n: int, table: Path, size, units: str) -> tuple[float, float, float, float]:
    vals = []
    for c in ("x1", "y1", "x2", "y2"):
        try:
            vals.append(float(row.get(cols[c])))
        except (TypeError, ValueError):
            raise ValueError(
                f"{table} row {n} column {cols[c]!r}: expected a number, got {row.get(cols[c])!r}"
            ) from None
    w, h = size if units == "pixel" else (1.0, 1.0)
    x1, y1, x2, y2 = vals[0] / w, vals[1] / h, vals[2] / w, vals[3] / h
    if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
        raise ValueError(f"{table} row {n}: box {vals} is outside the {size[0]}x{size[1]} image or empty ({units})")
    return (x1, y1, x2, y2)


def _table_regions(rows, cols, table: Path, size, src: dict, rules: MaskRules) -> list[Region]:
    units = src.get("units", "pixel")
    if units not in ("pixel", "normalized"):
        raise ValueError(f"{table}: units must be 'pixel' or 'normalized', got {units!r}")
    normal = {str(x) for x in src.get("normal_labels", ())}
    out = []
    for n, row in rows:
        label = str(row.get(cols["label"]) if row.get(cols["label"]) is not None else "").strip()
        coords = [row.get(cols[c]) for c in ("x1", "y1", "x2", "y2")]
        if label in normal or all(c in (None, "") for c in coords):
            continue  # a normal image's row
        key = label_key(label)
        if key in rules.ignore_labels:
            continue
        out.append(Region(key, rules.label_names.get(key, label), _row_box(row, cols, n, table, size, units)))
    return reading_order(out)


def box_studies(src: dict, rules: MaskRules, stats, where: str, rng=None) -> tuple[Path, list[Study]]:
    """``kind: boxes``: one study per image of the table (its rows are its boxes)."""
    table = Path(str(src["table"])).expanduser().resolve()
    cols = {**{c: c for c in BOX_COLUMNS}, **dict(src.get("columns") or {})}
    root = Path(str(src.get("images") or table.parent)).expanduser().resolve()
    by_image: dict[str, list] = {}
    for n, row in enumerate(read_table(table), start=1):
        name = str(row.get(cols["image"]) or "").strip()
        if not name:
            raise ValueError(f"{table} row {n} column {cols['image']!r}: no image named")
        by_image.setdefault(name, []).append((n, row))
    out = []
    for name, rows in by_image.items():
        path = (root / f"{name}{src.get('image_suffix', '')}").resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{table} row {rows[0][0]}: image {path} not found")
        size = image_size(path)
        regions = _table_regions(rows, cols, table, size, src, rules)
        pid = str(rows[0][1].get(cols["patient_id"]) or "").strip()
        pid = pid or patient_of(strip_ext(name), src.get("patient_regex"), where)
        area = int(sum((r.box[2] - r.box[0]) * (r.box[3] - r.box[1]) * size[0] * size[1] for r in regions))
        meta = {"source_image": path.relative_to(root).as_posix() if root in path.parents else path.name}
        out.append(
            Study(safe_id(strip_ext(name)), safe_id(pid), "boxes", size, regions, str(path), meta=meta, area=area)
        )
    return root, out


SOURCES = {"masks": mask_studies, "nifti": nifti_studies, "dicom_seg": seg_studies, "boxes": box_studies}


def read_sources(sources: list[dict], rules: MaskRules, rng, stats, progress: bool = False):
    """(the sources' roots, every study), ids prefixed by the source's ``name`` when it has one."""
    from tqdm.auto import tqdm

    if not sources:
        raise ValueError("builder.sources is empty: give at least one {kind: masks | nifti | dicom_seg | boxes, ...}")
    roots, studies, seen = [], [], {}
    for k, src in enumerate(tqdm(list(sources), desc="mau sources", disable=not progress, leave=False)):
        src = dict(src)
        kind = src.get("kind")
        if kind not in SOURCES:
            raise ValueError(f"builder.sources[{k}].kind must be one of {sorted(SOURCES)}, got {kind!r}")
        where = f"builder.sources[{k}] ({kind})"
        root, got = SOURCES[kind](src, rules, stats, where, rng)
        roots.append(root)
        for st in got:
            if src.get("name"):
                st.study_id = f"{safe_id(src['name'])}_{st.study_id}"
            st.modality = src.get("modality") or st.modality
            if st.study_id in seen:
                raise ValueError(
                    f"{where}: study id {st.study_id!r} also comes from {seen[st.study_id]}; give the sources names"
                )
            seen[st.study_id] = where
        studies += got
    return roots, studies
