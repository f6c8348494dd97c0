"""DICOM and NIfTI loaders on the real scans shipped inside pydicom and nibabel (nothing downloaded)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path as NIB_DATA
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from unveil.data import medical
from unveil.data.adapters import llava
from unveil.data.errors import RecordError
from unveil.data.images import LOADERS, image_size, load_image


def dcm(name: str) -> str:
    p = get_testdata_file(name, download=False)
    assert p is not None and os.path.exists(p), f"pydicom test file {name} is not shipped with this pydicom"
    return p


def nii(name: str) -> str:
    p = os.path.join(NIB_DATA, name)
    assert os.path.exists(p), f"nibabel test file {name} is missing from {NIB_DATA}"
    return p


@pytest.fixture(autouse=True)
def _reset_options():
    d, n = medical.DICOM, medical.NIFTI
    yield
    medical.DICOM, medical.NIFTI = d, n


def _window(values, centre, width):
    lo = centre - width / 2
    return np.round(np.clip((values - lo) / width, 0, 1) * 255).astype(np.uint8)


def _gray(im) -> np.ndarray:
    a = np.asarray(im)
    assert im.mode == "RGB" and a.ndim == 3 and a.shape[2] == 3
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    return a[..., 0]


def test_loaders_are_registered_on_import_of_images():
    for suffix in (".dcm", ".dicom", ".nii", ".nii.gz"):
        assert suffix in LOADERS


# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------
def test_ct_rescale_slope_intercept_gives_hounsfield_units():
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
    values, _, _ = medical.dicom_values(dcm("CT_small.dcm"))
    np.testing.assert_array_equal(values, ds.pixel_array.astype(float) - 1024)


def test_ct_configured_window_and_percentile_fallback():
    hu = pydicom.dcmread(dcm("CT_small.dcm")).pixel_array.astype(float) - 1024
    medical.configure(dicom={"window": [40, 400]})  # soft-tissue window, list as from YAML
    im = load_image(dcm("CT_small.dcm"))
    assert im.size == (128, 128)
    np.testing.assert_array_equal(_gray(im), _window(hu, 40, 400))
    # the file has no window of its own: without a configured one, the 0.5-99.5 percentile range
    medical.configure(dicom={"window": None})
    lo, hi = np.percentile(hu, (0.5, 99.5))
    np.testing.assert_array_equal(_gray(load_image(dcm("CT_small.dcm"))), _window(hu, (lo + hi) / 2, hi - lo))
    assert not np.array_equal(
        _gray(medical.load_dicom(dcm("CT_small.dcm"), window=(40, 400))),
        _gray(medical.load_dicom(dcm("CT_small.dcm"), window=(400, 2000))),
    )


def test_mr_window_from_the_file():
    ds = pydicom.dcmread(dcm("MR_small.dcm"))
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    assert (c, w) == (600, 1600)
    out = _gray(load_image(dcm("MR_small.dcm")))
    np.testing.assert_array_equal(out, _window(ds.pixel_array.astype(float), c, w))
    assert not np.array_equal(out, _gray(medical.load_dicom(dcm("MR_small.dcm"), use_file_window=False)))


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    p = tmp_path / "inv.dcm"
    ds.save_as(p)
    a = _gray(medical.load_dicom(p, window=(40, 400)))
    b = _gray(medical.load_dicom(dcm("CT_small.dcm"), window=(40, 400)))
    np.testing.assert_array_equal(a, 255 - b)


def test_multi_frame_picks_one_frame():
    path = dcm("rtdose.dcm")
    frames = pydicom.dcmread(path).pixel_array.astype(float)
    assert frames.shape == (15, 10, 10)
    first, _, k0 = medical.dicom_values(path, frame="first")
    middle, _, k = medical.dicom_values(path)  # default: the middle frame
    last, _, kl = medical.dicom_values(path, frame=-1)
    assert (k0, k, kl) == (0, 7, 14)
    np.testing.assert_array_equal(first, frames[0])
    np.testing.assert_array_equal(middle, frames[7])
    np.testing.assert_array_equal(last, frames[14])
    medical.configure(dicom={"frame": 3})
    c, w = medical.percentile_window(frames[3], (0.5, 99.5))
    np.testing.assert_array_equal(_gray(load_image(path)), _window(frames[3], c, w))
    with pytest.raises(OSError, match="frame 15 out of range"):
        medical.dicom_values(path, frame=15)


def test_enhanced_multi_frame_rescale_and_window_from_functional_groups(tmp_path):
    ds = pydicom.dcmread(dcm("rtdose.dcm"))
    pvt, voi = Dataset(), Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept = 2, -10
    voi.WindowCenter, voi.WindowWidth = 100, 50
    shared = Dataset()
    shared.PixelValueTransformationSequence = Sequence([pvt])
    shared.FrameVOILUTSequence = Sequence([voi])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    p = tmp_path / "enh.dcm"
    ds.save_as(p)
    raw = pydicom.dcmread(dcm("rtdose.dcm")).pixel_array[2].astype(float)
    values, _, _ = medical.dicom_values(p, frame=2)
    np.testing.assert_array_equal(values, raw * 2 - 10)
    np.testing.assert_array_equal(_gray(medical.load_dicom(p, frame=2)), _window(raw * 2 - 10, 100, 50))


def test_rgb_dicom_stays_colour():
    path = dcm("SC_rgb_small_odd.dcm")
    im = load_image(path)
    np.testing.assert_array_equal(np.asarray(im), pydicom.dcmread(path).pixel_array)
    two = dcm("SC_rgb_rle_16bit_2frame.dcm")  # 16-bit RGB, 2 frames
    a = np.asarray(medical.load_dicom(two, frame=0))
    ref = pydicom.dcmread(two).pixel_array[0].astype(float)
    np.testing.assert_array_equal(a, np.round(ref / 65535 * 255).astype(np.uint8))


def test_unreadable_dicom_is_an_oserror_and_a_record_error(tmp_path):
    bad = tmp_path / "scan.dcm"
    bad.write_bytes(b"definitely not DICOM")
    with pytest.raises(OSError, match="scan.dcm"):
        load_image(bad)
    with pytest.raises(RecordError, match="unreadable image") as e:
        image_size(bad, "records.json", 4, "image")
    assert (e.value.file, e.value.record, e.value.field) == ("records.json", 4, "image")
    with pytest.raises(OSError, match="no pixel data"):
        load_image(dcm("rtplan.dcm"))


def test_configure_rejects_unknown_options():
    with pytest.raises(TypeError, match="windw"):
        medical.configure(dicom={"windw": (1, 2)})
    with pytest.raises(TypeError, match="slice"):
        medical.load_nifti(nii("anatomical.nii"), slice=3)


# ---------------------------------------------------------------------------------------------
# NIfTI
# ---------------------------------------------------------------------------------------------
def _canonical(path):
    return nib.as_closest_canonical(nib.load(path)).get_fdata()


def _shown(ras_plane):
    """A RAS+ plane as displayed: second axis up (rot90), then mirrored into the radiological
    convention (the patient's left / anterior on the image's right / left)."""
    return np.rot90(ras_plane)[:, ::-1]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_nifti_middle_slice_in_ras_orientation(axis):
    path = nii("anatomical.nii")  # LAS on disk: the loader must flip x to reach RAS
    assert nib.aff2axcodes(nib.load(path).affine) == ("L", "A", "S")
    vol = _canonical(path)
    mid = vol.shape[axis] // 2
    expected = _shown(np.take(vol, mid, axis=axis))
    np.testing.assert_array_equal(medical.nifti_slice(path, axis=axis), expected)
    # neurological: the same slice unmirrored (the patient's left on the image's left)
    np.testing.assert_array_equal(
        medical.nifti_slice(path, axis=axis, orientation="neurological"), np.rot90(np.take(vol, mid, axis=axis))
    )
    # a non-middle slice differs, and is the same as taking it by hand
    np.testing.assert_array_equal(medical.nifti_slice(path, axis=axis, index=3), _shown(np.take(vol, 3, axis=axis)))
    # array order instead of RAS: no flip
    raw = np.asanyarray(nib.load(path).dataobj, dtype=float)
    np.testing.assert_array_equal(
        medical.nifti_slice(path, axis=axis, canonical=False), np.rot90(np.take(raw, raw.shape[axis] // 2, axis=axis))
    )


def test_nifti_percentile_window_and_fixed_window():
    path = nii("anatomical.nii")
    plane = medical.nifti_slice(path)
    lo, hi = np.percentile(plane, (0.5, 99.5))
    im = load_image(path)
    assert im.size == (plane.shape[1], plane.shape[0]) == (33, 41)
    out = _gray(im)
    np.testing.assert_array_equal(out, _window(plane, (lo + hi) / 2, hi - lo))
    assert out.min() == 0 and out.max() == 255
    medical.configure(nifti={"percentile": (0, 100)})
    np.testing.assert_array_equal(
        _gray(load_image(path)), _window(plane, (plane.min() + plane.max()) / 2, plane.max() - plane.min())
    )
    np.testing.assert_array_equal(_gray(medical.load_nifti(path, window=(50, 20))), _window(plane, 50, 20))


def test_nifti_gz_4d_volume_selection():
    path = nii("example4d.nii.gz")
    img = nib.load(path)
    assert img.shape == (128, 96, 24, 2)
    v0 = medical.nifti_slice(path)
    v1 = medical.nifti_slice(path, volume=1)
    data = nib.as_closest_canonical(img).get_fdata()
    np.testing.assert_array_equal(v0, _shown(data[:, :, 12, 0]))
    np.testing.assert_array_equal(v1, _shown(data[:, :, 12, 1]))
    assert not np.array_equal(v0, v1)
    assert load_image(path).size == (128, 96)
    with pytest.raises(OSError, match="volume 2 out of range"):
        medical.nifti_slice(path, volume=2)
    with pytest.raises(OSError, match="slice 24 out of range"):
        medical.nifti_slice(path, index=24)


def test_nifti2_and_scaled_data():
    path = nii("example_nifti2.nii.gz")
    data = nib.as_closest_canonical(nib.load(path)).get_fdata()
    np.testing.assert_array_equal(medical.nifti_slice(path, axis=1), _shown(data[:, data.shape[1] // 2, :, 0]))


# ---------------------------------------------------------------------------------------------
# through an adapter: records that point at scans
# ---------------------------------------------------------------------------------------------
def test_records_with_dicom_and_nifti_images(tmp_path):
    shutil.copy(dcm("CT_small.dcm"), tmp_path / "ct.dcm")
    shutil.copy(nii("example4d.nii.gz"), tmp_path / "vol.nii.gz")
    recs = [
        {
            "id": i,
            "image": name,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown?"},
                {"from": "gpt", "value": "A scan."},
            ],
        }
        for i, name in enumerate(["ct.dcm", "vol.nii.gz"])
    ]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    samples = llava.read(tmp_path / "d.json")
    assert [Path(s.images[0]).name for s in samples] == ["ct.dcm", "vol.nii.gz"]
    assert image_size(samples[0].images[0]) == (128, 128)
    assert image_size(samples[1].images[0]) == (128, 96)
    (tmp_path / "broken.dcm").write_bytes(b"\x00" * 200)
    recs[0]["image"] = "broken.dcm"
    (tmp_path / "e.json").write_text(json.dumps(recs))
    with pytest.raises(RecordError, match="unreadable image") as e:
        llava.read(tmp_path / "e.json")
    assert e.value.record == 0 and e.value.field == "image"


@pytest.mark.parametrize("codes", [("P", "S", "L"), ("S", "R", "P"), ("I", "L", "A")])
def test_nifti_permuted_axes_give_the_same_ras_slices(tmp_path, codes):
    """Axis order and flips on disk do not change what a RAS slice shows (sagittal/coronal/axial)."""
    src = nib.load(nii("anatomical.nii"))
    moved = src.as_reoriented(
        nib.orientations.ornt_transform(
            nib.orientations.io_orientation(src.affine), nib.orientations.axcodes2ornt(codes)
        )
    )
    assert nib.aff2axcodes(moved.affine) == codes
    p = tmp_path / "moved.nii.gz"
    nib.save(moved, p)
    for axis in (0, 1, 2):
        np.testing.assert_array_equal(
            medical.nifti_slice(p, axis=axis, index=5), medical.nifti_slice(nii("anatomical.nii"), axis=axis, index=5)
        )


def test_non_images_are_refused_with_a_clear_error(tmp_path):
    """A CIFTI file (nibabel's own test file) and a DICOM segmentation (pydicom's CT_small with its
    class and modality made a SEG's) used to load silently as pictures."""
    with pytest.raises(OSError, match="a CIFTI file"):
        medical.load_nifti(os.path.join(NIB_DATA, "row_major.dconn.nii"))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Modality, ds.SOPClassUID = "SEG", "1.2.840.10008.5.1.4.1.1.66.4"
    ds.save_as(tmp_path / "seg.dcm")
    with pytest.raises(OSError, match=r"seg\.dcm: a DICOM segmentation \(SEG\), not an image"):
        medical.load_dicom(tmp_path / "seg.dcm")
    medical.load_dicom(get_testdata_file("CT_small.dcm"))  # the image itself still loads


@pytest.mark.parametrize(
    "name",
    ["SC_rgb_jpeg_gdcm.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_16.dcm"],  # .70, .80, .81
)
def test_jpeg_lossless_and_jpeg_ls_dicom_decode(name):
    """pydicom's own JPEG Lossless / JPEG-LS test files decode with the pinned requirements."""
    im = medical.load_dicom(get_testdata_file(name))
    assert im.size[0] > 1 and im.size[1] > 1 and np.asarray(im).std() > 0


def test_12_bit_jpeg_extended_decodes_or_says_what_decodes_it():
    try:
        im = medical.load_dicom(get_testdata_file("JPGExtended.dcm"))
    except OSError as e:  # without the GPL-3.0 plugin: the error names the file and the fix
        assert "JPGExtended.dcm" in str(e) and "pylibjpeg-libjpeg" in str(e)
    else:  # with it installed
        assert np.asarray(im).std() > 0


# ---------------------------------------------------------------------------------------------
# one display orientation for DICOM and NIfTI (radiological), per-record slices, malformed headers
# ---------------------------------------------------------------------------------------------
def _ct_with_orientation(tmp_path, iop) -> tuple[Path, Path, np.ndarray]:
    """pydicom's CT_small with its ImageOrientationPatient set to ``iop`` (pixels as they are), and
    the same slice written as NIfTI with the affine that orientation gives (LPS -> RAS)."""
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    ds.ImageOrientationPatient = [float(v) for v in iop]
    d = tmp_path / f"ct_{'_'.join(str(int(v)) for v in iop)}.dcm"
    ds.save_as(d)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    r, c = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    dr, dc = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = r * dc, c * dr, np.cross(r, c) * float(ds.SliceThickness or 1)
    lps[:3, 3] = [float(v) for v in ds.ImagePositionPatient]
    n = tmp_path / d.name.replace(".dcm", ".nii.gz")
    # NIfTI voxel (i, j, k) = (column, row, slice)
    nib.save(nib.Nifti1Image(hu.T[:, :, None].astype(np.float32), np.diag([-1, -1, 1, 1]) @ lps), n)
    return d, n, hu


@pytest.mark.parametrize(
    "iop",
    [
        (1, 0, 0, 0, 1, 0),  # axial as usually stored
        (-1, 0, 0, 0, 1, 0),  # axial, stored mirrored
        (0, 1, 0, 1, 0, 0),  # axial, stored transposed
        (1, 0, 0, 0, 0, -1),  # coronal
        (0, 1, 0, 0, 0, -1),  # sagittal
    ],
)
def test_dicom_and_nifti_show_the_same_slice_the_same_way(tmp_path, iop):
    """Before, NIfTI slices put the patient's left on the image's left while DICOM frames were shown
    as stored (left on the right for the usual axial frame): the two formats mirrored each other."""
    d, n, _ = _ct_with_orientation(tmp_path, iop)
    axis = int(np.argmax(np.abs(np.cross(iop[:3], iop[3:]))))
    from_dicom = _gray(medical.load_dicom(d, window=(40, 400)))
    from_nifti = _gray(medical.load_nifti(n, axis=axis, window=(40, 400)))
    np.testing.assert_array_equal(from_dicom, from_nifti)


def test_the_display_is_radiological(tmp_path):
    """The usual axial frame (rows toward the patient's left, columns posterior) is shown as stored;
    a mirrored one is flipped back; orientation="stored" keeps the stored pixels."""
    d, _, hu = _ct_with_orientation(tmp_path, (1, 0, 0, 0, 1, 0))
    np.testing.assert_array_equal(_gray(medical.load_dicom(d, window=(40, 400))), _window(hu, 40, 400))
    m, _, _ = _ct_with_orientation(tmp_path, (-1, 0, 0, 0, 1, 0))
    np.testing.assert_array_equal(_gray(medical.load_dicom(m, window=(40, 400))), _window(hu, 40, 400)[:, ::-1])
    stored = medical.load_dicom(m, window=(40, 400), orientation="stored")
    np.testing.assert_array_equal(_gray(stored), _window(hu, 40, 400))
    with pytest.raises(ValueError, match="orientation"):
        medical.load_dicom(d, orientation="left")


def test_bad_vr_dicom_error_names_the_file(tmp_path):
    """pydicom's badVR.dcm (an IS value '1A') raised a bare ValueError without the path."""
    path = dcm("badVR.dcm")
    with pytest.raises(OSError, match=r"badVR\.dcm: malformed DICOM \(ValueError"):
        load_image(path)
    shutil.copy(path, tmp_path / "bad.dcm")
    with pytest.raises(RecordError, match="bad.dcm") as e:
        image_size(tmp_path / "bad.dcm", "records.json", 2, "image")
    assert (e.value.record, e.value.field) == (2, "image")


def test_a_record_chooses_its_nifti_slice(tmp_path):
    """`"image": "vol.nii.gz#z=3"` (any adapter) and `"slice": 5` (MAU JSONL) pick one slice per record;
    before, one module-wide index served every record."""
    from unveil.data.adapters import mau_jsonl

    shutil.copy(nii("example4d.nii.gz"), tmp_path / "vol.nii.gz")
    vol = tmp_path / "vol.nii.gz"
    np.testing.assert_array_equal(_gray(load_image(f"{vol}#z=3")), _gray(medical.load_nifti(vol, axis=2, index=3)))
    np.testing.assert_array_equal(
        _gray(load_image(f"{vol}#x=7,t=1")), _gray(medical.load_nifti(vol, axis=0, index=7, volume=1))
    )
    assert not np.array_equal(_gray(load_image(f"{vol}#z=3")), _gray(load_image(f"{vol}#z=20")))
    rec = {"id": "a", "query": "Q?", "answer": "A.", "boxes": [], "findings": []}
    rows = [
        {**rec, "id": "z3", "image": "vol.nii.gz#z=3"},
        {**rec, "id": "s5", "image": "vol.nii.gz", "slice": 5},
        {**rec, "id": "mid", "image": "vol.nii.gz"},
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = mau_jsonl.read(tmp_path / "train.jsonl", root=tmp_path)
    assert [s.images[0] for s in samples] == [f"{vol}#z=3", f"{vol}#slice=5", str(vol)]
    np.testing.assert_array_equal(_gray(load_image(samples[1].images[0])), _gray(medical.load_nifti(vol, index=5)))
    for bad, field, msg in (
        ({**rec, "image": "vol.nii.gz#q=3"}, "image", r"unknown path option\(s\) \['q'\]"),
        ({**rec, "image": "vol.nii.gz#z=99"}, "image", "slice 99 out of range"),
        ({**rec, "image": "vol.nii.gz", "slice": "5"}, "slice", "expected an integer"),
    ):
        (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(RecordError, match=msg) as e:
            mau_jsonl.read(tmp_path / "bad.jsonl", root=tmp_path)
        assert e.value.field == field
