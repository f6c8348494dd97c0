"""Medical image files as RGB PIL images: DICOM (pydicom) and NIfTI (nibabel).

Both loaders are registered with :func:`unveil.data.images.register_loader`, so any record
path ending in ``.dcm`` / ``.dicom`` / ``.nii`` / ``.nii.gz`` loads through
:func:`unveil.data.images.load_image` like a PNG.

DICOM (grey-scale): stored values -> modality values with ``RescaleSlope`` /
``RescaleIntercept`` (top level, or the enhanced multi-frame functional groups) -> a linear
window (centre, width) -> 0..255, inverted for ``MONOCHROME1``. The window is, in order: the
configured ``window``; the file's ``WindowCenter`` / ``WindowWidth`` (entry ``window_index``
when there are several); the ``percentile`` range of the frame. Multi-frame files: one frame
(``frame``: an index, "first" or "middle"), decoded alone. RGB / YBR / palette files are
converted to 8-bit RGB without windowing.

NIfTI (3D or 4D): one 2D slice along ``axis`` (0 sagittal, 1 coronal, 2 axial in RAS+ terms
when ``canonical``; the data array's own axes otherwise); ``index`` None = the middle slice;
``volume`` picks the time point of a 4D file; windowed by ``window`` if set, else by the
``percentile`` range of the slice. Only the slice is read from disk (array proxy). A record can
name its own slice: ``"ct.nii.gz#z=42"`` (x / y / z: the RAS axis and the index along it,
``slice=42``: the index along ``axis``, ``t=1``: the 4D volume; ``"cine.dcm#frame=3"`` for a DICOM
frame; :func:`unveil.data.images.split_fragment`).

Display orientation, the same for both formats: the **radiological convention**, as a reading
workstation shows a study and as axial CT / MR frames are stored: the viewer faces the patient,
so the patient's left is on the image's right; axial slices have anterior at the top, coronal
and sagittal slices superior at the top, sagittal slices anterior on the left. DICOM frames are
flipped / transposed into it from ``ImageOrientationPatient`` (the usual axial
``[1, 0, 0, 0, 1, 0]`` is already in it: such frames are shown as stored); NIfTI slices are taken
in RAS+ order and mirrored into it. ``orientation="stored"`` (DICOM) shows frames as stored;
``orientation="neurological"`` (NIfTI) the patient's left on the image's left (the default
before); ``canonical=False`` (NIfTI) the array as stored. Files without orientation (secondary
captures, photographs) and 2D NIfTI images are shown as stored.

Defaults are module-wide and set with :func:`configure` (e.g. from ``data.medical`` in the
config); :func:`load_dicom` / :func:`load_nifti` take per-call overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unveil.data.images import register_loader


@dataclass
class DicomOptions:
    window: tuple[float, float] | None = None  # (centre, width) in modality units; overrides the file
    use_file_window: bool = True  # use WindowCenter/WindowWidth from the file when present
    window_index: int = 0  # which window when the file lists several
    frame: int | str = "middle"  # multi-frame: an index (negative allowed), "first" or "middle"
    percentile: tuple[float, float] = (0.5, 99.5)  # fallback window from the frame's values
    orientation: str = "radiological"  # or "stored": the frame as its pixel data lie


@dataclass
class NiftiOptions:
    axis: int = 2  # 0 sagittal, 1 coronal, 2 axial (RAS+ when canonical)
    index: int | None = None  # slice along axis; None = middle
    volume: int = 0  # time point of a 4D image
    window: tuple[float, float] | None = None  # (centre, width) in stored (scaled) units
    percentile: tuple[float, float] = (0.5, 99.5)
    canonical: bool = True  # slice in RAS+ orientation rather than array order
    orientation: str = "radiological"  # or "neurological" (patient left on image left); canonical slices only


DICOM = DicomOptions()
NIFTI = NiftiOptions()


def configure(dicom: dict | None = None, nifti: dict | None = None) -> None:
    """Set module-wide loader defaults, e.g. ``configure(dicom={"window": (40, 400)})``."""
    global DICOM, NIFTI
    if dicom:
        DICOM = _with(DICOM, dicom)
    if nifti:
        NIFTI = _with(NIFTI, nifti)


def _with(opts, overrides: dict):
    names = {f.name for f in fields(opts)}
    bad = set(overrides) - names
    if bad:
        raise TypeError(f"unknown {type(opts).__name__} option(s) {sorted(bad)}; known: {sorted(names)}")
    over = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return replace(opts, **over)


# ----------------------------------------------------------------------------------------
# shared: values -> 8-bit
# ----------------------------------------------------------------------------------------
def apply_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Linear window to uint8: ``centre - width/2`` -> 0, ``centre + width/2`` -> 255."""
    if not width > 0:
        raise ValueError(f"window width must be > 0, got {width}")
    lo = centre - width / 2.0
    out = np.clip((values.astype(np.float64) - lo) / width, 0.0, 1.0)
    return np.round(out * 255.0).astype(np.uint8)


def percentile_window(values: np.ndarray, pct: tuple[float, float]) -> tuple[float, float]:
    """(centre, width) spanning the given percentiles of the finite values."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = (float(x) for x in np.percentile(v, pct))
    if hi <= lo:
        hi = lo + 1.0
    return (lo + hi) / 2.0, hi - lo


def _rgb(gray_u8: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray_u8)).convert("RGB")


# ----------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------
def _first(v: Any, i: int = 0) -> float | None:
    if v is None or v == "":
        return None
    try:
        seq = list(v)
    except TypeError:
        return float(v)
    return float(seq[min(i, len(seq) - 1)]) if seq else None


def _frame_attr(ds, frame: int, seq: str, attr: str, i: int = 0) -> float | None:
    """An attribute from the top level, else the frame's, else the shared functional groups."""
    v = _first(ds.get(attr), i)
    if v is not None:
        return v
    for groups, k in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        g = ds.get(groups)
        if g is not None and len(g) > k and seq in g[k] and len(g[k][seq].value):
            v = _first(g[k][seq][0].get(attr), i)
            if v is not None:
                return v
    return None


def _frame_index(frame: int | str, n: int, path: Path) -> int:
    if frame == "middle":
        return n // 2
    if frame == "first":
        return 0
    if isinstance(frame, bool) or not isinstance(frame, int):
        raise ValueError(f"{path}: frame must be an int, 'first' or 'middle', got {frame!r}")
    if not -n <= frame < n:
        raise OSError(f"{path}: frame {frame} out of range for {n} frame(s)")
    return frame % n


# JPEG Lossless and JPEG-LS decode through python-gdcm (in requirements.txt); 12-bit JPEG Extended
# needs pylibjpeg-libjpeg, GPL-3.0 and so not a dependency of this Apache-2.0 project
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.51": " (12-bit JPEG Extended: `pip install pylibjpeg pylibjpeg-libjpeg`, GPL-3.0)",
}
# Segmentation Storage and Surface Segmentation Storage: pixel data that are labels, not intensities
_DICOM_NOT_IMAGES = {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.5"}


# Radiological display of each plane (the axis of LPS patient coordinates its normal is closest
# to): the LPS directions the image's columns (left -> right) and rows (top -> bottom) run along.
_DISPLAY = {
    2: ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),  # axial: patient left on the right, posterior at the bottom
    1: ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),  # coronal: patient left on the right, superior at the top
    0: ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),  # sagittal: posterior on the right, superior at the top
}


def _orientation(ds, frame: int) -> np.ndarray | None:
    """ImageOrientationPatient (6 direction cosines) of the file or the frame, or None."""
    v = ds.get("ImageOrientationPatient")
    for groups, k in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        if v is not None:
            break
        g = ds.get(groups)
        if g is not None and len(g) > k and "PlaneOrientationSequence" in g[k] and len(g[k].PlaneOrientationSequence):
            v = g[k].PlaneOrientationSequence[0].get("ImageOrientationPatient")
    if v is None or len(v) != 6:
        return None
    return np.asarray([float(x) for x in v])


def to_radiological(arr: np.ndarray, iop) -> np.ndarray:
    """A frame (rows, cols[, channels]) flipped / transposed into the radiological display
    (``_DISPLAY``) from its ImageOrientationPatient: ``iop[:3]`` is the LPS direction of increasing
    column index, ``iop[3:]`` of increasing row index."""
    r, c = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    want_col, want_row = (np.asarray(v) for v in _DISPLAY[int(np.argmax(np.abs(np.cross(r, c))))])
    if abs(r @ want_col) < abs(c @ want_col):  # the stored rows run along the wanted columns
        arr, r, c = np.swapaxes(arr, 0, 1), c, r
    if r @ want_col < 0:
        arr = arr[:, ::-1]
    if c @ want_row < 0:
        arr = arr[::-1]
    return np.ascontiguousarray(arr)


def dicom_values(path: str | Path, frame: int | str | None = None) -> tuple[np.ndarray, Any, int]:
    """(one frame as modality values (float64, or stored RGB), dataset, frame index), as stored."""
    import pydicom
    from pydicom.pixels import pixel_array

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:
        raise OSError(f"{path}: not a readable DICOM file: {e}") from e
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise OSError(f"{path}: DICOM file has no pixel data ({ds.get('Modality', '?')} object)")
    if ds.get("Modality") == "SEG" or str(ds.get("SOPClassUID", "")) in _DICOM_NOT_IMAGES:
        raise OSError(
            f"{path}: a DICOM segmentation (SEG), not an image: its frames are label masks. Give the image "
            "series it annotates (a builder can read the SEG as the lesion's mask)"
        )
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    k = _frame_index(DICOM.frame if frame is None else frame, n_frames, path)
    try:
        arr = pixel_array(ds, index=k) if n_frames > 1 else ds.pixel_array
    except Exception as e:
        ts = str(ds.file_meta.get("TransferSyntaxUID", "?"))
        hint = _DECODER_HINTS.get(ts, "")
        raise OSError(f"{path}: cannot decode pixel data ({ts}){hint}: {e}") from e
    if int(ds.get("SamplesPerPixel", 1)) == 1 and ds.get("PhotometricInterpretation") != "PALETTE COLOR":
        slope = _frame_attr(ds, k, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _frame_attr(ds, k, "PixelValueTransformationSequence", "RescaleIntercept")
        arr = arr.astype(np.float64) * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)
    return arr, ds, k


def load_dicom(path: str | Path, **overrides) -> Image.Image:
    """One DICOM frame as an RGB image (see the module docstring for the pipeline). A malformed
    header (pydicom's ``ValueError`` on, e.g., an IS value ``'1A'``) is an OSError naming the file."""
    o = _with(DICOM, overrides) if overrides else DICOM
    if o.orientation not in ("radiological", "stored"):
        raise ValueError(f"dicom orientation must be 'radiological' or 'stored', got {o.orientation!r}")
    path = Path(path)
    try:
        return _dicom_image(path, o)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise OSError(f"{path}: malformed DICOM ({type(e).__name__}: {e})") from e


def _dicom_image(path: Path, o: DicomOptions) -> Image.Image:
    arr, ds, k = dicom_values(path, o.frame)
    iop = _orientation(ds, k) if o.orientation == "radiological" else None
    if iop is not None and arr.ndim in (2, 3):
        arr = to_radiological(arr, iop)
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pi == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(arr, ds).astype(np.float64)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return Image.fromarray(np.round(rgb / (2**bits - 1) * 255).clip(0, 255).astype(np.uint8))
    if arr.ndim == 3:  # RGB / YBR (pydicom converts YBR to RGB)
        if arr.dtype != np.uint8:
            bits = int(ds.get("BitsStored", 8 * arr.dtype.itemsize))
            arr = np.round(arr.astype(np.float64) / (2**bits - 1) * 255).clip(0, 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(arr))
    if arr.ndim != 2:
        raise OSError(f"{path}: expected a 2D frame, got shape {arr.shape}")
    if o.window is not None:
        centre, width = (float(x) for x in o.window)
    else:
        centre = (
            _frame_attr(ds, k, "FrameVOILUTSequence", "WindowCenter", o.window_index) if o.use_file_window else None
        )
        width = _frame_attr(ds, k, "FrameVOILUTSequence", "WindowWidth", o.window_index) if o.use_file_window else None
        if centre is None or width is None or not width > 0:
            centre, width = percentile_window(arr, o.percentile)
    out = apply_window(arr, centre, width)
    if pi == "MONOCHROME1":  # 0 = white
        out = 255 - out
    return _rgb(out)


# ----------------------------------------------------------------------------------------
# NIfTI
# ----------------------------------------------------------------------------------------
def _read(path: Path, get) -> np.ndarray:
    """Voxel data as float64; a truncated or corrupt file (gzip's EOFError, zlib.error, a short
    read) becomes an OSError naming the file, like every other unreadable image."""
    try:
        return np.asanyarray(get(), dtype=np.float64)
    except Exception as e:
        raise OSError(f"{path}: cannot decode NIfTI data (truncated or corrupt): {type(e).__name__}: {e}") from e


def nifti_slice(path: str | Path, **overrides) -> np.ndarray:
    """The configured 2D slice as float values, in display orientation (rows, cols)."""
    import nibabel as nib

    o = _with(NIFTI, overrides) if overrides else NIFTI
    if o.orientation not in ("radiological", "neurological"):
        raise ValueError(f"nifti orientation must be 'radiological' or 'neurological', got {o.orientation!r}")
    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as e:
        raise OSError(f"{path}: not a readable NIfTI file: {e}") from e
    if type(img).__name__.startswith("Cifti2"):
        raise OSError(f"{path}: a CIFTI file (brain grayordinates or connectivity), not an image volume")
    shape = img.shape
    if len(shape) not in (2, 3, 4) or (len(shape) == 4 and shape[3] == 0):
        raise OSError(f"{path}: expected a 2D, 3D or 4D image, got shape {shape}")
    if len(shape) == 2:
        return np.rot90(_read(path, lambda: img.dataobj))
    if o.axis not in (0, 1, 2):
        raise ValueError(f"{path}: axis must be 0, 1 or 2, got {o.axis}")
    if o.canonical:
        ornt = nib.orientations.io_orientation(img.affine)  # row j: (RAS axis, +1/-1) of array axis j
    else:
        ornt = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    j = int(np.flatnonzero(ornt[:, 0] == o.axis)[0])  # array axis along the requested direction
    size = shape[j]
    idx = size // 2 if o.index is None else int(o.index)
    if not -size <= idx < size:
        raise OSError(f"{path}: slice {idx} out of range for {size} slices along axis {o.axis}")
    idx %= size
    arr_idx = idx if ornt[j, 1] > 0 else size - 1 - idx
    slicer: list[Any] = [slice(None)] * 3
    slicer[j] = arr_idx
    if len(shape) == 4:
        if not -shape[3] <= o.volume < shape[3]:
            raise OSError(f"{path}: volume {o.volume} out of range for {shape[3]} volume(s)")
        slicer.append(o.volume % shape[3])
    plane = _read(path, lambda: img.dataobj[tuple(slicer)])  # reads only this slice
    rest = [a for a in range(3) if a != j]  # remaining array axes, in array order
    for pos, a in enumerate(rest):
        if ornt[a, 1] < 0:
            plane = np.flip(plane, axis=pos)
    if ornt[rest[0], 0] > ornt[rest[1], 0]:  # order the plane by RAS axis
        plane = plane.T
    plane = np.rot90(plane)  # second in-plane axis points up; the first runs to the right (neurological)
    if o.canonical and o.orientation == "radiological":
        plane = plane[:, ::-1]  # the patient's left (axial, coronal) / anterior (sagittal) on the image's right
    return np.ascontiguousarray(plane)


def load_nifti(path: str | Path, **overrides) -> Image.Image:
    """One NIfTI slice as an RGB image (see the module docstring)."""
    o = _with(NIFTI, overrides) if overrides else NIFTI
    plane = nifti_slice(path, **overrides)
    centre, width = (float(x) for x in o.window) if o.window is not None else percentile_window(plane, o.percentile)
    return _rgb(apply_window(plane, centre, width))


@register_loader(".dcm", ".dicom", options=("frame",))
def _dicom_loader(path: Path, frame: int | None = None) -> Image.Image:
    return load_dicom(path) if frame is None else load_dicom(path, frame=frame)


@register_loader(".nii", ".nii.gz", options=("x", "y", "z", "slice", "t"))
def _nifti_loader(path: Path, **where: int) -> Image.Image:
    """``where`` from a ``#z=42`` path fragment: x / y / z -> axis 0 / 1 / 2 and its index;
    slice -> the index along the configured axis; t -> the 4D volume."""
    over: dict[str, int] = {}
    for key, axis in (("x", 0), ("y", 1), ("z", 2)):
        if key in where:
            over.update(axis=axis, index=where[key])
    if "slice" in where:
        over["index"] = where["slice"]
    if "t" in where:
        over["volume"] = where["t"]
    return load_nifti(path, **over)
