"""Tests of StealthMarkLib.volume, sample_data and dicom_export on real files (the bundled ITK T1)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from StealthMarkLib import volume as volume_module
from StealthMarkLib.dicom_export import write_dicom_series
from StealthMarkLib.errors import InputError
from StealthMarkLib.sample_data import (
    SAMPLE_INTENSITY,
    SAMPLE_LABEL,
    SampleSplit,
    load_sample,
    sample_paths,
    sample_split,
)
from StealthMarkLib.volume import (
    Intensity,
    Volume,
    extract_slices,
    insert_slices,
    parse_slice_spec,
    read_label,
    read_volume,
    resize_slices,
    usable_slices,
    write_volume_like,
)

T1, T1_MASK = sample_paths()
BRAIN_SLICES = list(range(2, 61))
HELD_OUT = list(range(16, 24)) + list(range(40, 48))


@pytest.fixture(scope="module")
def t1() -> Volume:
    return read_volume(T1)


def _rotation(seed: int = 3, right_handed: bool = True) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    if (np.linalg.det(q) > 0) != right_handed:
        q[:, 2] *= -1
    return q


def _oblique(values: str = "int", right_handed: bool = True) -> Volume:
    """A 16x20x6 (I, J, K) volume with a rotated direction and odd spacing/origin."""
    rng = np.random.default_rng(7)
    arr = rng.integers(-1200, 3000, size=(6, 20, 16)).astype(np.float32)
    if values == "float":
        arr = (rng.random((6, 20, 16)) * 1000.0 - 300.0).astype(np.float32)
    return Volume(arr, (0.7, 0.9, 2.5), (10.5, -20.25, 33.125), tuple(_rotation(right_handed=right_handed).ravel()))


def _assert_same_geometry(a: Volume, b: Volume, tol: float = 1e-4) -> None:
    assert a.array.shape == b.array.shape
    np.testing.assert_allclose(a.spacing, b.spacing, atol=tol)
    np.testing.assert_allclose(a.origin, b.origin, atol=tol)
    np.testing.assert_allclose(a.direction, b.direction, atol=tol)


def _save_nifti(path, array_xyz, affine=None) -> str:
    nib.save(nib.Nifti1Image(array_xyz, np.eye(4) if affine is None else affine), str(path))
    return str(path)


# --- reading -----------------------------------------------------------------------------------------
def test_read_sample_nifti(t1):
    assert t1.array.shape == (62, 128, 128)
    assert t1.array.dtype == np.float32
    assert t1.spacing == (2.0, 2.0, 3.0)
    assert t1.source == str(T1)
    assert t1.array.min() >= 0 and t1.array.max() <= 255


def test_ijk_to_ras_matches_nibabel(t1, tmp_path):
    np.testing.assert_allclose(t1.ijk_to_ras, nib.load(str(T1)).affine, atol=1e-6)
    # voxel (i, j, k) of nibabel's (I, J, K) data is array[k, j, i]
    data = np.asarray(nib.load(str(T1)).dataobj)
    assert np.array_equal(data.transpose(2, 1, 0), t1.array)
    obl = _oblique()
    out = write_volume_like(obl.array, obl, tmp_path / "oblique.nii.gz")
    np.testing.assert_allclose(obl.ijk_to_ras, nib.load(str(out)).affine, atol=1e-5)


def test_from_array_round_trip(t1):
    for vol in (t1, _oblique(), _oblique(right_handed=False)):
        back = Volume.from_array(vol.array, vol.ijk_to_ras, source="slicer")
        _assert_same_geometry(back, vol, tol=1e-9)
        np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-9)
        assert back.array is not None and np.array_equal(back.array, vol.array)
        assert back.source == "slicer"
    sheared = t1.ijk_to_ras.copy()
    sheared[0, 1] = 1.0
    with pytest.raises(InputError, match="sheared"):
        Volume.from_array(t1.array, sheared)
    with pytest.raises(InputError, match="4x4"):
        Volume.from_array(t1.array, np.eye(3))


def test_to_sitk_and_from_sitk(t1):
    img = t1.to_sitk(t1.array > 100)
    assert img.GetSize() == (128, 128, 62) and img.GetPixelID() == sitk.sitkUInt8
    back = Volume.from_sitk(img)
    _assert_same_geometry(back, t1, tol=0)
    with pytest.raises(InputError, match="shape"):
        t1.to_sitk(np.zeros((2, 2, 2)))


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist") as err:
        read_volume(tmp_path / "nope.nii.gz", what="image")
    assert "nope.nii.gz" in str(err.value) and "image" in str(err.value)


def test_corrupt_file(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(InputError, match="cannot read") as err:
        read_volume(bad)
    assert str(bad) in str(err.value)


def test_directory_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("not dicom")
    with pytest.raises(InputError, match="no DICOM series") as err:
        read_volume(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_2d_and_4d_rejected_single_slice_accepted(tmp_path):
    with pytest.raises(InputError, match="2-D") as err:
        read_volume(_save_nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.float32)))
    assert "flat.nii.gz" in str(err.value)
    with pytest.raises(InputError, match="4-D"):
        read_volume(_save_nifti(tmp_path / "series.nii.gz", np.zeros((8, 8, 3, 2), np.float32)))
    one = read_volume(_save_nifti(tmp_path / "one.nii.gz", np.ones((8, 9, 1), np.float32)))
    assert one.array.shape == (1, 9, 8)


def test_nan_and_inf_voxels(tmp_path):
    data = np.zeros((8, 8, 4), np.float32)
    data[1, 1, 1] = np.nan
    data[2, 2, 2] = np.nan
    data[3, 3, 3] = np.inf
    # ITK's NIfTI reader turns them into 0 silently; they must still be reported
    with pytest.raises(InputError, match="contains 3 NaN/Inf voxels") as err:
        read_volume(_save_nifti(tmp_path / "nan.nii.gz", data))
    assert "nan.nii.gz" in str(err.value)
    sitk.WriteImage(sitk.GetImageFromArray(data.transpose(2, 1, 0)), str(tmp_path / "nan.nrrd"))
    with pytest.raises(InputError, match="contains 3 NaN/Inf voxels"):
        read_volume(tmp_path / "nan.nrrd")
    big = np.zeros((4, 4, 2), np.float64)
    big[0, 0, 0] = 1e300  # beyond float32
    with pytest.raises(InputError, match="contains 1 NaN/Inf voxels"):
        read_volume(_save_nifti(tmp_path / "big.nii.gz", big))


# --- DICOM -------------------------------------------------------------------------------------------
def test_dicom_round_trip_sample(t1, tmp_path):
    files = write_dicom_series(t1, tmp_path / "dcm", series_description="T1 sample", patient_id="P-1")
    assert len(files) == 62 and all(f.is_file() for f in files)
    assert sorted(p.name for p in (tmp_path / "dcm").iterdir()) == sorted(f.name for f in files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    ds = pydicom.dcmread(files[5])
    assert ds.Modality == "MR" and ds.SeriesDescription == "T1 sample" and ds.PatientID == "P-1"
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and int(ds.InstanceNumber) == 6
    assert float(ds.SliceThickness) == 3.0
    back = read_volume(tmp_path / "dcm")
    assert np.array_equal(back.array, t1.array)
    _assert_same_geometry(back, t1)
    assert back.source == str(tmp_path / "dcm")


def test_dicom_round_trip_oblique(tmp_path):
    vol = _oblique("int")
    write_dicom_series(vol, tmp_path / "int", modality="CT")
    back = read_volume(tmp_path / "int")
    assert np.array_equal(back.array, vol.array)
    _assert_same_geometry(back, vol)

    vol = _oblique("float")
    files = write_dicom_series(vol, tmp_path / "float")
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"  # classic MR, not Enhanced MR
    back = read_volume(tmp_path / "float")
    step = float(ds.RescaleSlope)
    assert step < 0.02
    assert np.abs(back.array - vol.array).max() <= step / 2 + 1e-3
    _assert_same_geometry(back, vol)


def test_dicom_left_handed_is_written_k_flipped(tmp_path):
    vol = _oblique("int", right_handed=False)
    write_dicom_series(vol, tmp_path / "lh")
    back = read_volume(tmp_path / "lh")
    assert np.array_equal(back.array, vol.array[::-1])
    # the same voxels in space: voxel (0, 0, k) of the copy is voxel (0, 0, K-1-k) of the original
    n = vol.array.shape[0]
    for k in (0, n - 1):
        p_back = back.ijk_to_ras @ [0, 0, k, 1]
        p_vol = vol.ijk_to_ras @ [0, 0, n - 1 - k, 1]
        np.testing.assert_allclose(p_back, p_vol, atol=1e-4)


def test_two_series_in_one_directory(tmp_path):
    a = _oblique("int")
    b = Volume(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6), (1, 1, 2), (0, 0, 0), np.eye(3).ravel())
    fa = write_dicom_series(a, tmp_path, series_description="first series")
    fb = write_dicom_series(b, tmp_path, series_description="second series")
    uid_a = pydicom.dcmread(fa[0]).SeriesInstanceUID
    uid_b = pydicom.dcmread(fb[0]).SeriesInstanceUID
    with pytest.raises(InputError) as err:
        read_volume(tmp_path)
    msg = str(err.value)
    for text in (uid_a, uid_b, "first series", "second series", "series UID", "2 DICOM series"):
        assert text in msg
    got_b = read_volume(tmp_path, series_uid=uid_b)
    assert np.array_equal(got_b.array, b.array)
    got_a = read_volume(tmp_path, series_uid=uid_a)
    assert np.array_equal(got_a.array, a.array)
    with pytest.raises(InputError, match="no DICOM series 1.2.3"):
        read_volume(tmp_path, series_uid="1.2.3")
    with pytest.raises(InputError, match="series UID"):
        read_volume(T1, series_uid=uid_a)


# --- writing -----------------------------------------------------------------------------------------
def test_write_volume_like_keeps_geometry(t1, tmp_path):
    data = np.random.default_rng(1).random(t1.array.shape).astype(np.float32)
    out = write_volume_like(data, t1, tmp_path / "heat.nii.gz")
    assert out == tmp_path / "heat.nii.gz"
    img = sitk.ReadImage(str(out))
    assert img.GetPixelID() == sitk.sitkFloat32
    assert img.GetSpacing() == t1.spacing and img.GetOrigin() == t1.origin and img.GetDirection() == t1.direction
    assert np.array_equal(sitk.GetArrayFromImage(img), data)
    nimg = nib.load(str(out))
    np.testing.assert_array_equal(nimg.affine, nib.load(str(T1)).affine)
    assert np.array_equal(np.asarray(nimg.dataobj).transpose(2, 1, 0), data)
    for suffix in (".nrrd", ".mha"):
        back = read_volume(write_volume_like(data, t1, tmp_path / f"heat{suffix}"))
        _assert_same_geometry(back, t1, tol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.mha", "heat.nii.gz", "heat.nrrd"]


def test_write_volume_like_is_atomic_and_safe(t1, tmp_path, monkeypatch):
    target = tmp_path / "out.nii.gz"
    write_volume_like(np.zeros(t1.array.shape), t1, target)
    before = target.read_bytes()

    def broken_write(image, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"half")
        raise RuntimeError("sitk::ERROR: disk full")

    monkeypatch.setattr(volume_module.sitk, "WriteImage", broken_write)
    with pytest.raises(InputError, match="disk full"):
        write_volume_like(np.ones(t1.array.shape), t1, target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]  # no temporary file left

    write_volume_like(np.ones(t1.array.shape), t1, target)  # replaced on success
    assert read_volume(target).array.max() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]

    src = tmp_path / "src.nii.gz"
    ref = read_volume(write_volume_like(t1.array, t1, src))
    src_bytes = src.read_bytes()
    with pytest.raises(InputError, match="over an input"):
        write_volume_like(np.zeros(t1.array.shape), ref, src)
    assert src.read_bytes() == src_bytes
    with pytest.raises(InputError, match="shape"):
        write_volume_like(np.zeros((2, 3, 4)), t1, tmp_path / "x.nii.gz")
    with pytest.raises(InputError, match="suffix"):
        write_volume_like(np.zeros(t1.array.shape), t1, tmp_path / "x.mhd")


# --- labels ------------------------------------------------------------------------------------------
def test_read_label_choices(t1, tmp_path):
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(T1_MASK)))
    with pytest.raises(InputError, match=r"labels \[4, 5, 6\].*--label N.*--label any"):
        read_label(T1_MASK)
    assert np.array_equal(read_label(T1_MASK, "any"), raw != 0)
    five = read_label(T1_MASK, 5, reference=t1)
    assert five.dtype == np.bool_ and np.array_equal(five, raw == 5)
    assert np.array_equal(read_label(T1_MASK, "4"), raw == 4)
    with pytest.raises(InputError, match=r"label 3 is not in the mask.*\[4, 5, 6\]"):
        read_label(T1_MASK, 3)
    with pytest.raises(InputError, match="integer or 'any'"):
        read_label(T1_MASK, "brain")

    binary = write_volume_like((raw != 0).astype(np.float32), t1, tmp_path / "bin.nii.gz")
    assert np.array_equal(read_label(binary, reference=t1), raw != 0)
    seven = write_volume_like((raw != 0) * 7.0, t1, tmp_path / "seven.nii.gz")
    assert np.array_equal(read_label(seven), raw != 0)  # {0, v} counts as binary

    empty = write_volume_like(np.zeros(t1.array.shape), t1, tmp_path / "empty.nii.gz")
    with pytest.raises(InputError, match="empty"):
        read_label(empty)
    with pytest.raises(InputError, match="empty"):
        read_label(empty, "any")


def test_read_label_geometry_mismatch(t1):
    mask = read_volume(T1_MASK)
    assert read_label(mask, "any", reference=t1).shape == t1.array.shape
    shifted = Volume(mask.array, mask.spacing, (0.0, 254.5, 0.0), mask.direction, "shifted")
    with pytest.raises(InputError, match="origin"):
        read_label(shifted, "any", reference=t1)
    wider = Volume(mask.array, (2.0, 2.1, 3.0), mask.origin, mask.direction)
    with pytest.raises(InputError, match="spacing"):
        read_label(wider, "any", reference=t1)
    cropped = Volume(mask.array[:-1], mask.spacing, mask.origin, mask.direction)
    with pytest.raises(InputError, match="shape"):
        read_label(cropped, "any", reference=t1)
    close = Volume(mask.array, (2.0, 2.0, 3.0005), mask.origin, mask.direction)
    assert read_label(close, "any", reference=t1).any()  # within tolerance


# --- slices ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, list(range(10))),
        ("all", list(range(10))),
        (" ALL ", list(range(10))),
        ("3:7", [3, 4, 5, 6]),
        ("0:10:3", [0, 3, 6, 9]),
        ("7:", [7, 8, 9]),
        (":2", [0, 1]),
        ("2,5,9", [2, 5, 9]),
        ("9, 1 ,3:5", [1, 3, 4, 9]),
        ("4,4,3:5", [3, 4]),
    ],
)
def test_parse_slice_spec_valid(spec, expected):
    assert parse_slice_spec(spec, 10) == expected


@pytest.mark.parametrize("spec", ["10", "3:11", "-1", "5:5", "7:3", "a", "1;2", "1:2:0", "1,,2", "1.5", "10:"])
def test_parse_slice_spec_errors(spec):
    with pytest.raises(InputError, match=r"0\.\.9|step"):
        parse_slice_spec(spec, 10)


def test_extract_insert_round_trip_all_axes():
    arr = np.random.default_rng(2).random((5, 6, 7)).astype(np.float32)
    vol = Volume(arr, (1, 1, 1), (0, 0, 0), np.eye(3).ravel())
    for axis, (h, w) in enumerate([(6, 7), (5, 7), (5, 6)]):
        idx = [0, 2, 3]
        s = extract_slices(vol, idx, axis=axis)
        assert s.shape == (3, h, w) and s.dtype == np.float32
        assert np.array_equal(s[1], np.take(arr, 2, axis=axis))
        back = insert_slices(arr.shape, s, idx, axis=axis)
        keep = np.zeros(arr.shape, bool)
        np.moveaxis(keep, axis, 0)[idx] = True
        assert np.array_equal(back[keep], arr[keep]) and np.all(back[~keep] == 0.0)
        full = list(range(arr.shape[axis]))
        assert np.array_equal(insert_slices(arr.shape, extract_slices(arr, full, axis), full, axis), arr)
    assert np.isnan(insert_slices(arr.shape, s[:1], [1], axis=2, fill=np.nan)[0, 0, 0])
    with pytest.raises(InputError, match=r"0\.\.4"):
        extract_slices(vol, [5])
    with pytest.raises(InputError, match="expected"):
        insert_slices(arr.shape, s, [0, 1], axis=2)
    with pytest.raises(InputError, match="axis"):
        extract_slices(vol, [0], axis=3)


def test_resize_slices():
    rng = np.random.default_rng(3)
    images = rng.random((4, 128, 128)).astype(np.float32)
    small = resize_slices(images, (64, 48))
    assert small.shape == (4, 64, 48) and small.dtype == np.float32
    assert small.min() >= 0 and small.max() <= 1
    assert resize_slices(images, (128, 128)).shape == (4, 128, 128)
    const = resize_slices(np.full((2, 10, 10), 0.25, np.float32), (31, 17))
    np.testing.assert_allclose(const, 0.25, atol=1e-6)
    masks = (rng.random((3, 40, 40)) > 0.5).astype(np.float32)
    for size in ((64, 64), (17, 23)):
        m = resize_slices(masks, size, mode="nearest")
        assert m.shape == (3,) + size and set(np.unique(m)) <= {0.0, 1.0}
    assert resize_slices(np.zeros((0, 8, 8)), (4, 4)).shape == (0, 4, 4)
    with pytest.raises(InputError, match="mode"):
        resize_slices(images, (8, 8), mode="cubic")


def test_usable_slices():
    mask = np.zeros((4, 5, 6), bool)
    mask[1, 2, 3] = True
    mask[3, :2, :2] = True
    assert usable_slices(mask) == [1, 3]
    assert usable_slices(mask, min_pixels=2) == [3]
    assert usable_slices(mask, axis=1) == [0, 1, 2]
    assert usable_slices(mask, axis=2) == [0, 1, 3]


# --- intensity ---------------------------------------------------------------------------------------
def test_intensity_minmax_percentile_json():
    x = np.array([-10.0, 0.0, 127.5, 255.0, 400.0], np.float32)
    out = Intensity(0.0, 255.0).apply(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1])

    arr = np.arange(1001, dtype=np.float32)
    p = Intensity(10.0, 90.0, mode="percentile")
    assert p.bounds(arr) == (100.0, 900.0)
    whole = Intensity(0.0, 100.0, mode="percentile")
    np.testing.assert_allclose(whole.apply(np.array([100.0, 500.0, 900.0])), [0.0, 0.5, 1.0])  # bounds from itself
    np.testing.assert_allclose(p.apply(np.array([500.0]), reference_array=arr), [0.5])
    assert np.array_equal(p.apply(np.array([1.0, 1.0, 2.0]), reference_array=np.ones(5)), [0.0, 0.0, 1.0])

    for it in (Intensity(0.0, 255.0), p, SAMPLE_INTENSITY):
        assert Intensity.from_json(it.to_json()) == it
        assert Intensity.from_json(json.dumps(it.to_json())) == it
    assert p.to_json() == {"mode": "percentile", "low": 10.0, "high": 90.0}
    bad_settings = (
        {"low": 1.0, "high": 0.0},
        {"low": 0, "high": 1, "mode": "zscore"},
        {"low": 0},
        {"low": -1, "high": 50, "mode": "percentile"},
    )
    for bad in bad_settings:
        with pytest.raises(InputError):
            Intensity.from_json(bad)


# --- sample data -------------------------------------------------------------------------------------
def test_sample_paths_and_split():
    assert T1.name == "T1.nii.gz" and T1_MASK.name == "T1_brainmask.nii.gz"
    assert SAMPLE_LABEL == "any"
    split = sample_split()
    assert isinstance(split, SampleSplit)
    assert split.held_out == HELD_OUT
    assert split.train == [k for k in BRAIN_SLICES if k not in HELD_OUT]
    assert not set(split.train) & set(split.held_out)
    assert split.slices == BRAIN_SLICES == usable_slices(read_label(T1_MASK, "any"))
    assert sample_split() == split


def test_load_sample():
    images, masks, split, vol = load_sample()
    assert images.shape == masks.shape == (59, 128, 128)
    assert images.dtype == masks.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() > 0.9
    assert set(np.unique(masks)) == {0.0, 1.0}
    assert vol.array.shape == (62, 128, 128)
    row = split.held_out_rows[0]
    assert split.slices[row] == split.held_out[0] == 16
    assert np.array_equal(images[row], vol.array[16] / 255.0)
    assert len(split.train_rows) == 43 and len(split.held_out_rows) == 16

    images, masks, _, _ = load_sample(size=64)
    assert images.shape == masks.shape == (59, 64, 64)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert set(np.unique(masks)) == {0.0, 1.0}
