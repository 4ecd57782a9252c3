"""Readers: NIfTI, NRRD/MHA, .npy, DICOM series (synthetic and real) and the real scans of offline-assets §4."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from med3dvlm.data import PreprocessSpec, Volume, VolumeError, list_series, load_volume, preprocess_with_report, reorient


def _write_itk(path, array, spacing_dhw=(2.0, 0.5, 0.75), origin=(10.0, -20.0, 30.0)):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(reversed(spacing_dhw)))
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path), useCompression=str(path).endswith(".gz"))
    return path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_itk_formats_round_trip(tmp_path, hu_volume, suffix):
    path = _write_itk(tmp_path / f"vol{suffix}", hu_volume)
    vol = load_volume(path)
    assert vol.shape == hu_volume.shape
    np.testing.assert_array_equal(vol.array, hu_volume)
    np.testing.assert_allclose(vol.spacing, (2.0, 0.5, 0.75))
    np.testing.assert_allclose(vol.origin, (10.0, -20.0, 30.0), atol=1e-4)
    assert vol.orientation == "LPS"


def test_nifti_from_nibabel_ras_affine_maps_axes(tmp_path):
    # nibabel data are indexed (x, y, z) in RAS; our array is (D, H, W) = (z, y, x) in LPS.
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.0, 3.0, 1.0])), tmp_path / "ras.nii.gz")
    vol = load_volume(tmp_path / "ras.nii.gz")
    assert vol.shape == (6, 5, 4)
    np.testing.assert_array_equal(vol.array, data.transpose(2, 1, 0))
    np.testing.assert_allclose(vol.spacing, (3.0, 1.0, 1.5))
    assert vol.orientation == "RAS"
    canon = reorient(vol, "LPS")
    assert canon.orientation == "LPS"
    # R->L and A->P flip the W and H axes; values are only moved, never interpolated.
    np.testing.assert_array_equal(canon.array, vol.array[:, ::-1, ::-1])


def test_npy_plain_and_with_channel(tmp_path, hu_volume):
    np.save(tmp_path / "a.npy", hu_volume)
    np.save(tmp_path / "b.npy", hu_volume[None])
    for name in ("a.npy", "b.npy"):
        vol = load_volume(tmp_path / name)
        np.testing.assert_array_equal(vol.array, hu_volume)
        assert vol.spacing == (1.0, 1.0, 1.0)


def test_dicom_series_sorted_by_geometry_in_hu(tmp_path, hu_volume, dicom_writer):
    dicom_writer(tmp_path / "series", hu_volume, spacing=(2.5, 0.7, 0.8), seed=3)
    vol = load_volume(tmp_path / "series")
    np.testing.assert_allclose(vol.array, np.round(hu_volume), atol=0.5)
    np.testing.assert_allclose(vol.spacing, (2.5, 0.7, 0.8))
    np.testing.assert_allclose(vol.origin, (-100.0, -120.0, 40.0))
    assert vol.modality == "CT"
    assert vol.orientation == "LPS"
    # The writer scrambles file names and instance numbers, so neither gives the right order.
    files = sorted((tmp_path / "series").iterdir())
    by_name = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files]
    by_instance = [float(ds.ImagePositionPatient[2]) for ds in sorted(map(pydicom.dcmread, files), key=lambda d: d.InstanceNumber)]
    assert by_name != sorted(by_name) and by_instance != sorted(by_instance)


def test_dicom_per_slice_slope_and_intercept(tmp_path, hu_volume, dicom_writer):
    slopes = [1.0, 2.0, 0.5] * 4
    dicom_writer(tmp_path / "s", hu_volume, slopes=slopes, intercept=-1000.0)
    vol = load_volume(tmp_path / "s")
    # Stored values are rounded to the slope's step, so the error is at most half a step.
    err = np.abs(vol.array - hu_volume).max(axis=(1, 2))
    assert np.all(err <= np.array(slopes) / 2 + 1e-3)
    assert vol.array.min() == pytest.approx(-1000.0, abs=1.0)


def test_two_series_in_one_folder_listed_and_selected(tmp_path, hu_volume, dicom_writer):
    uid_a = dicom_writer(tmp_path / "mixed", hu_volume, description="soft", seed=1)
    uid_b = dicom_writer(tmp_path / "mixed", hu_volume[:6] + 500.0, description="shifted", seed=2)
    series = {s.uid: s for s in list_series(tmp_path / "mixed")}
    assert set(series) == {uid_a, uid_b}
    assert series[uid_a].num_files == 12 and series[uid_b].num_files == 6
    with pytest.raises(VolumeError, match="2 DICOM series") as err:
        load_volume(tmp_path / "mixed")
    assert uid_a in str(err.value) and uid_b in str(err.value)
    b = load_volume(tmp_path / "mixed", series_uid=uid_b)
    np.testing.assert_allclose(b.array, np.round(hu_volume[:6]) + 500.0, atol=0.5)
    with pytest.raises(VolumeError, match="no series with UID"):
        load_volume(tmp_path / "mixed", series_uid="1.2.3")


def test_real_pydicom_ct_slice_made_into_a_shuffled_series(tmp_path, ct_small_path):
    # A real CT slice (pydicom's CT_small.dcm) copied to 6 positions in reverse file-name order.
    src = pydicom.dcmread(ct_small_path)
    expected_hu = src.pixel_array.astype(np.float32) * float(src.RescaleSlope) + float(src.RescaleIntercept)
    uid = generate_uid()
    normal = np.cross(np.array(src.ImageOrientationPatient[:3], float), np.array(src.ImageOrientationPatient[3:], float))
    for k in range(6):
        ds = pydicom.dcmread(ct_small_path)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = list(np.array(src.ImagePositionPatient, float) + k * 5.0 * normal)
        ds.PixelData = (src.pixel_array + k).astype(src.pixel_array.dtype).tobytes()  # slice k is offset by k
        ds.save_as(tmp_path / f"slice_{5 - k}.dcm")
    vol = load_volume(tmp_path)
    assert vol.shape == (6, 128, 128)
    assert vol.modality == "CT"
    np.testing.assert_allclose(vol.spacing[0], 5.0, rtol=1e-5)
    for k in range(6):
        np.testing.assert_allclose(vol.array[k], expected_hu + k * float(src.RescaleSlope))
    assert vol.array.min() < -500  # air in HU, so the intercept was applied


def test_real_pydicom_single_slice_is_rejected(ct_small_path):
    with pytest.raises(VolumeError, match="single 2D DICOM slice"):
        load_volume(ct_small_path)


def test_real_enhanced_multiframe_ct(ect_path):
    vol = load_volume(ect_path)
    assert vol.shape == (2, 512, 512)
    assert vol.modality == "CT"
    assert vol.array.min() < -500  # HU, rescale applied


def test_real_head_ct_invesalius(tmp_path, invesalius_ct):
    ct, spacing = invesalius_ct
    path = tmp_path / "head.nii.gz"
    sitk_img = Volume(array=ct, spacing=spacing).to_sitk()
    sitk.WriteImage(sitk_img, str(path), useCompression=True)
    vol = load_volume(path)
    assert vol.shape == (108, 256, 256)
    assert vol.value_range() == (-1024.0, 2986.0)
    np.testing.assert_allclose(vol.spacing, spacing, rtol=1e-5)
    image, report = preprocess_with_report(vol, PreprocessSpec.ct("bone", size=(64, 128, 128), crop_foreground=False))
    assert image.shape == (1, 64, 128, 128) and not report.warnings
    # Bone (>= 226 HU, the package's own bone mask threshold) is a small but real share of the head.
    bone_share = float((ct >= 226).mean())
    low = PreprocessSpec.ct("bone").hu_range[0]
    assert 0.01 < bone_share < 0.3
    assert float((image > (226 - low) / 1800).float().mean()) == pytest.approx(bone_share, rel=0.1)


def test_real_mni_template_nifti(mni_path):
    vol = load_volume(mni_path)
    assert vol.shape == (189, 233, 197)
    np.testing.assert_allclose(vol.spacing, (1.0, 1.0, 1.0))
    assert vol.orientation == "RAS"
    image, report = preprocess_with_report(vol, PreprocessSpec(size=(32, 40, 32)))
    assert image.shape == (1, 32, 40, 32)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert any("reorient RAS -> LPS" in s for s in report.steps)


def test_copy_of_dicom_folder_with_extra_files(tmp_path, hu_volume, dicom_writer):
    # Non-DICOM files (notes, thumbnails) beside the slices are ignored, not fatal.
    dicom_writer(tmp_path / "s", hu_volume)
    (tmp_path / "s" / "README.txt").write_text("not an image")
    (tmp_path / "s" / "thumb.png").write_bytes(b"\x89PNG....")
    shutil.copytree(tmp_path / "s", tmp_path / "t")
    assert load_volume(tmp_path / "t").shape == hu_volume.shape
