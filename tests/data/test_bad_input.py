"""Bad input: every case raises `VolumeError` naming the file and the reason; the CLI exits non-zero."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from med3dvlm.cli import main
from med3dvlm.data import VolumeError, load_volume


def _nifti(path, array):
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), useCompression=str(path).endswith(".gz"))
    return path


def _expect(path, reason, **kw):
    with pytest.raises(VolumeError, match=reason) as err:
        load_volume(path, **kw)
    assert str(path) in str(err.value), "the message must name the file"
    return err.value


def test_missing_file(tmp_path):
    _expect(tmp_path / "nope.nii.gz", "no such file")


def test_empty_file(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    _expect(tmp_path / "empty.nii.gz", "empty")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_truncated_file(tmp_path, hu_volume, suffix):
    full = _nifti(tmp_path / f"full{suffix}", hu_volume)
    data = full.read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) * 2 // 3])
    _expect(tmp_path / f"cut{suffix}", "truncated|cannot be read|corrupt")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".npy", ".mha"])
def test_corrupt_bytes(tmp_path, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    _expect(path, "corrupt|not a|cannot be read|invalid")


def test_unsupported_suffix(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _expect(tmp_path / "notes.txt", "unsupported file type")


def test_2d_image(tmp_path):
    _expect(_nifti(tmp_path / "flat.nii.gz", np.zeros((32, 32), np.float32)), "2D image")
    np.save(tmp_path / "flat.npy", np.zeros((1, 32, 32), np.float32))
    _expect(tmp_path / "flat.npy", "singleton axis|2D")


def test_4d_image(tmp_path):
    img = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))] * 3)
    sitk.WriteImage(img, str(tmp_path / "dyn.nii.gz"))
    _expect(tmp_path / "dyn.nii.gz", "4D image")
    np.save(tmp_path / "dyn.npy", np.zeros((3, 4, 5, 6), np.float32))
    _expect(tmp_path / "dyn.npy", "4D image")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf(tmp_path, hu_volume, bad):
    hu_volume[3, 4, 5] = bad
    _expect(_nifti(tmp_path / "nan.nii.gz", hu_volume), "1 voxels are NaN or Inf")
    np.save(tmp_path / "nan.npy", hu_volume)
    _expect(tmp_path / "nan.npy", "NaN or Inf")


def test_empty_folder(tmp_path):
    (tmp_path / "series").mkdir()
    _expect(tmp_path / "series", "no DICOM files")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "a.txt").write_text("x")
    _expect(tmp_path / "series", "no DICOM files")


def test_series_without_images(tmp_path):
    # A structured report: valid DICOM, same series, but no pixel data at all.
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    folder = tmp_path / "sr"
    folder.mkdir()
    ds = FileDataset(str(folder / "sr.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.save_as(folder / "sr.dcm", enforce_file_format=True)
    _expect(folder, "no image slices")
    _expect(folder / "sr.dcm", "holds no image")


def test_series_with_a_corrupt_slice(tmp_path, hu_volume, dicom_writer):
    dicom_writer(tmp_path / "s", hu_volume)
    victim = sorted((tmp_path / "s").iterdir())[4]
    ds = pydicom.dcmread(victim)
    ds.PixelData = ds.PixelData[:100]  # truncated pixel data
    ds.save_as(victim)
    err = _expect(tmp_path / "s", "pixel data|cannot")
    assert victim.name in str(err)


def test_series_with_duplicate_positions(tmp_path, hu_volume, dicom_writer):
    uid = dicom_writer(tmp_path / "s", hu_volume, seed=1)
    dicom_writer(tmp_path / "s", hu_volume[:2], series_uid=uid, seed=2)  # same positions again
    _expect(tmp_path / "s", "same slice position")


def test_series_with_mixed_slice_sizes(tmp_path, hu_volume, dicom_writer):
    uid = dicom_writer(tmp_path / "s", hu_volume, seed=1)
    dicom_writer(tmp_path / "s", np.zeros((2, 8, 8), np.float32), series_uid=uid, origin=(-100.0, -120.0, 500.0), seed=2)
    _expect(tmp_path / "s", "slice size differs")


def test_cli_inspect_bad_file_exits_nonzero(tmp_path, capsys):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(b"not a nifti at all" * 50)
    assert main(["data", "inspect", str(path)]) != 0
    err = capsys.readouterr().err
    assert str(path) in err and "error:" in err


def test_cli_inspect_multi_series_lists_them(tmp_path, hu_volume, dicom_writer, capsys):
    uid_a = dicom_writer(tmp_path / "m", hu_volume, seed=1)
    uid_b = dicom_writer(tmp_path / "m", hu_volume[:4], seed=2)
    assert main(["data", "inspect", str(tmp_path / "m")]) == 2
    out = capsys.readouterr()
    assert uid_a in out.out and uid_b in out.out and "--series" in out.err
    assert main(["data", "inspect", str(tmp_path / "m"), "--series", uid_b, "--json", "--size", "4", "8", "8"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["read"]["shape"] == [4, 24, 20] and payload["output"]["shape"] == [1, 4, 8, 8]
    assert 0.0 <= payload["output"]["min"] <= payload["output"]["max"] <= 1.0
