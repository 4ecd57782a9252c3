"""The readers and preprocessing on broken and hostile input, called directly: every case fails with the
file named and the reason, before anything large is allocated, and geometry comes out right."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from med3dvlm.data.limits import ReadLimits, check_claim
from med3dvlm.data.preprocess import PreprocessSpec, load_for_model, preprocess_with_report
from med3dvlm.data.readers import _itk_reason, list_series, load_volume
from med3dvlm.data.volume import Volume, VolumeError, VolumeTooLarge

sys.path.insert(0, str(Path(__file__).parent))
from hostile_inputs import (  # noqa: E402
    edit_dicom_series,
    lying_nifti,
    lps_nifti,
    lying_nrrd,
    nifti_with_affine,
    patch_bytes,
    raw_nrrd,
    short_mha,
    strip_preamble,
    zip_of,
)
from serving_helpers import hu_phantom, write_dicom_series, write_nifti  # noqa: E402

SMALL = ReadLimits(max_voxels=10**6, max_bytes=4 * 1024**2)


def refused(path: Path, *needles: str, limits: ReadLimits | None = None, error: type = VolumeError, **kw) -> str:
    with pytest.raises(error) as info:
        load_volume(path, limits=limits, **kw)
    message = str(info.value)
    assert message.startswith(str(path) + ": ") and info.value.reason, message  # names the file, gives a reason
    for needle in needles:
        assert needle in message, message
    return message


# ------------------------------------------------------------------------------------ lying headers


def test_lying_nifti_is_refused_before_allocation(tmp_path: Path) -> None:
    path = lying_nifti(tmp_path / "lie.nii.gz")
    assert path.stat().st_size < 64
    refused(path, "1024 x 1024 x 1024", "more than the limit", "--max-voxels", error=VolumeTooLarge)


def test_lying_nifti_within_the_limit_is_truncated_not_allocated(tmp_path: Path) -> None:
    # Under a limit that allows the claim, the data present are checked against it instead.
    path = lying_nifti(tmp_path / "lie.nii.gz", shape=(512, 512, 512))
    refused(path, "truncated: the header claims 268,435,456 bytes", limits=ReadLimits(max_voxels=2**28))
    uncompressed = lying_nifti(tmp_path / "lie.nii", shape=(512, 512, 512))
    refused(uncompressed, "truncated", limits=ReadLimits(max_voxels=2**28))


PEAK = """
import resource, sys
from med3dvlm.data.limits import ReadLimits
from med3dvlm.data.readers import load_volume
from med3dvlm.data.volume import VolumeError
load_volume  # imports done: this is the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_volume(sys.argv[1], limits=ReadLimits(max_voxels=int(sys.argv[2])))
except VolumeError as err:
    print(type(err).__name__)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""


@pytest.mark.parametrize("max_voxels", [512 * 512 * 2048, 2**31])
def test_peak_memory_of_a_lying_file_stays_small(tmp_path: Path, max_voxels: int) -> None:
    """The 52-byte file claiming 1024^3 int16 cost 2.1 GB above the baseline before; now < 100 MB,
    whether the claim is over the limit or (with a raised limit) refused as truncated."""
    path = lying_nifti(tmp_path / "lie.nii.gz")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", PEAK, str(path), str(max_voxels)], capture_output=True, text=True, env=env, timeout=300)
    kind, extra_mb = out.stdout.split()
    assert kind == ("VolumeTooLarge" if max_voxels < 2**30 else "VolumeError"), out.stderr
    assert int(extra_mb) < 100, f"{extra_mb} MB above the baseline"


def test_gzip_nifti_is_bounded_like_a_zip(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "big.nii.gz", np.zeros((64, 128, 128), np.float32))  # 2 MB of int16, unpacked
    refused(path, "unpacks to more than 1 MB", limits=ReadLimits(max_bytes=1024**2), error=VolumeTooLarge)
    assert load_volume(path).shape == (64, 128, 128)


def test_lying_and_short_nrrd_and_mha(tmp_path: Path) -> None:
    refused(lying_nrrd(tmp_path / "lie.nrrd"), "2048 x 2048 x 512", error=VolumeTooLarge)
    refused(lying_nrrd(tmp_path / "short.nrrd", (64, 64, 64), b"\0" * 100), "truncated: the header claims 524,288 bytes", "holds 100")
    refused(short_mha(tmp_path / "short.mha"), "truncated", "holds 64")
    refused(short_mha(tmp_path / "raw.mha", compressed=False), "truncated")
    bomb = lying_nrrd(tmp_path / "bomb.nrrd", (256, 256, 64), b"\0" * (8 * 1024**2))
    refused(bomb, "unpack to more than 4 MB", limits=SMALL.__class__(max_voxels=10**7, max_bytes=4 * 1024**2), error=VolumeTooLarge)
    ok = raw_nrrd(tmp_path / "ok.nrrd", np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    assert load_volume(ok).array[3, 4, 5] == 119


def test_claim_check_counts_every_axis() -> None:
    with pytest.raises(VolumeTooLarge):
        check_claim("x", (100, 100, 100, 2), 2, ReadLimits(max_voxels=10**6 + 1))
    with pytest.raises(VolumeError, match="holds no voxels"):
        check_claim("x", (10, 0, 10), 2, ReadLimits())
    assert check_claim("x", (10, 10, 10), 2, ReadLimits()) == 2000


# ------------------------------------------------------------------------------- geometry and values


@pytest.mark.parametrize(
    "affine, needle",
    [
        (np.zeros((4, 4)), "zero voxel spacing"),
        (np.full((4, 4), np.nan), "NaN or Inf"),
        (np.diag([1.0, np.inf, 1.0, 1.0]), "NaN or Inf"),
        (np.diag([1.0, 0.0, 2.0, 1.0]), "zero voxel spacing"),
        (np.array([[1.0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "degenerate"),
    ],
)
def test_bad_nifti_affines(tmp_path: Path, affine: np.ndarray, needle: str) -> None:
    """These gave "LinAlgError: SVD did not converge" with no file named."""
    refused(nifti_with_affine(tmp_path / "bad.nii.gz", affine), needle)


def test_nrrd_zero_spacing(tmp_path: Path) -> None:
    refused(raw_nrrd(tmp_path / "zero.nrrd", np.zeros((4, 5, 6), np.int16), spacings="1 0 1"))


def test_volume_geometry_checks_cover_every_reader(tmp_path: Path) -> None:
    from med3dvlm.data.readers import check_geometry

    for bad in ({"spacing": (1.0, 0.0, 1.0)}, {"spacing": (1.0, -2.0, 1.0)}, {"spacing": (np.nan, 1.0, 1.0)}, {"origin": (0.0, np.inf, 0.0)}):
        with pytest.raises(VolumeError, match="invalid"):
            check_geometry(Volume(np.zeros((2, 2, 2)), source="v", **bad))


def test_nan_inf_2d_4d_singleton(tmp_path: Path) -> None:
    vol = np.zeros((4, 5, 6), np.float32)
    vol[1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", vol)
    refused(tmp_path / "nan.npy", "1 voxels are NaN or Inf")
    np.save(tmp_path / "one.npy", np.zeros((1, 1, 1), np.float32))
    refused(tmp_path / "one.npy", "singleton axis")
    np.save(tmp_path / "flat.npy", np.zeros((8, 8), np.float32))
    refused(tmp_path / "flat.npy", "a 2D image")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}] * 8, dtype=object))
    refused(tmp_path / "obj.npy", "not a readable .npy")
    refused(lying_nifti(tmp_path / "four.nii.gz", shape=(8, 8, 8, 3)), "a 4D image")
    refused(lying_nifti(tmp_path / "two.nii.gz", shape=(8, 8)), "a 2D image")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    refused(tmp_path / "empty.nii.gz", "empty (0 bytes)")
    (tmp_path / "junk.nii.gz").write_bytes(b"\x1f\x8bnot gzip at all")
    message = refused(tmp_path / "junk.nii.gz")
    assert "()" not in message  # the reason is never empty


def test_paths_that_are_not_files(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    refused(tmp_path / "a", "symbolic link loop")
    (tmp_path / "dangling.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    refused(tmp_path / "dangling.nii.gz", "broken symbolic link")
    refused(tmp_path / "missing.nii.gz", "no such file")


def test_itk_messages_lose_build_paths() -> None:
    err = RuntimeError(
        "Exception thrown in SimpleITK ImageFileReader_Execute: /tmp/SimpleITK-build/ITK/Modules/Core/Common/src/itkImportImageContainer.hxx:180:\n"
        "ITK ERROR: Failed to allocate memory for image of /tmp/med3dvlm-api-x1/upload.nrrd"
    )
    reason = _itk_reason(err, Path("/tmp/med3dvlm-api-x1/upload.nrrd"))
    assert "Failed to allocate memory" in reason and "/tmp" not in reason and "SimpleITK-build" not in reason


# ------------------------------------------------------------------------------------------- DICOM


@pytest.fixture
def series(tmp_path: Path) -> Path:
    return write_dicom_series(tmp_path / "series", hu_phantom((10, 24, 24)))


def test_dicom_order_is_by_geometry_not_name(tmp_path: Path) -> None:
    hu = hu_phantom((10, 24, 24))
    folder = write_dicom_series(tmp_path / "s", hu)
    names = sorted(folder.glob("*.dcm"))
    for k, p in enumerate(names):  # reverse the names: file order now disagrees with position
        p.rename(folder / f"tmp{len(names) - 1 - k:03d}.dcm")
    volume = load_volume(folder)
    np.testing.assert_allclose(volume.array, np.round(hu), atol=0.5)
    assert volume.spacing == (2.5, 0.8, 0.8) and volume.modality == "CT"


def test_dicom_slope_intercept_per_slice(series: Path) -> None:
    before = load_volume(series).array
    edit_dicom_series(series, lambda k, ds: setattr(ds, "RescaleSlope", 2.0 if k == 3 else 1.0))
    after = load_volume(series).array
    np.testing.assert_allclose(after[3], 2 * (before[3] + 1024) - 1024, atol=1e-3)
    np.testing.assert_allclose(after[4], before[4])


def test_dicom_duplicates_and_mixed_orientation(series: Path) -> None:
    edit_dicom_series(series, lambda k, ds: setattr(ds, "ImagePositionPatient", [0.0, 0.0, 2.5 * min(k, 8)]))
    refused(series, "same slice position as")


def test_dicom_slice_gap_is_reported_and_refused_under_strict(series: Path) -> None:
    edit_dicom_series(series, lambda k, ds: k != 5)  # a slice missing in the middle
    volume = load_volume(series)
    assert volume.meta["slice_gaps"]["missing_estimate"] == 1 and volume.meta["slice_gaps"]["max_mm"] == 5.0
    assert any("uneven slice gaps" in w and "1 slice(s) missing" in w for w in volume.warnings)
    _, report = preprocess_with_report(volume, PreprocessSpec.m3d((8, 16, 16)))
    assert any("uneven slice gaps" in w for w in report.warnings)  # what the JSON, the API and the app show
    refused(series, "uneven slice gaps", "refused under --strict", strict=True)


def test_dicom_without_preamble(series: Path) -> None:
    """Headers were read with force=True, the pixels without: InvalidDicomError."""
    expected = load_volume(series).array
    for path in series.glob("*.dcm"):
        strip_preamble(path)
    assert not (series / "slice000.dcm").read_bytes()[128:132] == b"DICM"
    np.testing.assert_allclose(load_volume(series).array, expected)


@pytest.mark.parametrize(
    "old, new, needle",
    [
        (b"9.9 ", b"abc ", "RescaleSlope 'abc' is not a number"),
        (b"9.9 ", b"0.0 ", "RescaleSlope is 0"),
    ],
)
def test_dicom_bad_rescale(series: Path, old: bytes, new: bytes, needle: str) -> None:
    edit_dicom_series(series, lambda k, ds: setattr(ds, "RescaleSlope", "9.9") if k == 2 else None)
    patch_bytes(series / "slice002.dcm", old, new)
    message = refused(series, "slice slice002.dcm", needle)
    assert "Traceback" not in message


@pytest.mark.parametrize("spacing, needle", [([0.0, 0.0], "PixelSpacing [0.0, 0.0] is invalid"), ([0.8, -1.0], "invalid")])
def test_dicom_bad_pixel_spacing(series: Path, spacing: list, needle: str) -> None:
    """PixelSpacing 0 was accepted as "2.5 x 0 x 0 mm" and the app divided by it."""
    edit_dicom_series(series, lambda k, ds: setattr(ds, "PixelSpacing", spacing))
    refused(series, needle)


def test_dicom_missing_pixel_spacing_is_a_warning_or_strict_error(series: Path) -> None:
    edit_dicom_series(series, lambda k, ds: delattr(ds, "PixelSpacing"))
    assert any("assuming 1 x 1 mm" in w for w in load_volume(series).warnings)
    refused(series, "assuming 1 x 1 mm", strict=True)


def test_dicom_claimed_size_checked_before_pixels(series: Path) -> None:
    refused(series, "more than the limit", limits=ReadLimits(max_voxels=10 * 24 * 24 - 1), error=VolumeTooLarge)


def test_dicom_private_fields_stay_out_of_summaries_and_logs(series: Path, caplog: pytest.LogCaptureFixture) -> None:
    edit_dicom_series(series, lambda k, ds: (setattr(ds, "SeriesDescription", "Jane Doe follow-up"), setattr(ds, "PixelSpacing", None)))
    with caplog.at_level(logging.DEBUG):
        volume = load_volume(series)
        _, report = preprocess_with_report(volume, PreprocessSpec.m3d((8, 16, 16)))
    text = json.dumps(report.to_dict())
    assert "Jane Doe" not in text and volume.private["series_uid"] not in text
    assert "Jane Doe" not in caplog.text and str(series) not in caplog.text  # nothing with a name or path is logged
    assert preprocess_with_report(volume, PreprocessSpec.m3d((8, 16, 16)), include_private=True)[1].input["dicom"]["series_description"] == "Jane Doe follow-up"


def test_two_series_listed_without_descriptions(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "two" / "a", hu_phantom((10, 24, 24)))
    write_dicom_series(tmp_path / "two" / "b", hu_phantom((10, 24, 24), seed=1))
    edit_dicom_series(tmp_path / "two" / "b", lambda k, ds: setattr(ds, "SeriesDescription", "Doe private text"))
    message = refused(tmp_path / "two", "holds 2 DICOM series")
    assert "Doe private text" not in message
    assert {s.description for s in list_series(tmp_path / "two")} == {"", "Doe private text"}


def test_non_ct_modality(series: Path) -> None:
    edit_dicom_series(series, lambda k, ds: setattr(ds, "Modality", "MR"))
    volume = load_volume(series)
    assert volume.modality == "MR"
    _, report = preprocess_with_report(volume, PreprocessSpec.m3d((8, 16, 16)))
    assert any("modality MR, not CT" in w for w in report.warnings)
    with pytest.raises(VolumeError, match="modality MR: the preprocessing applies a CT Hounsfield window"):
        preprocess_with_report(volume, PreprocessSpec.ct(size=(8, 16, 16)))


def test_zip_with_two_volumes_names_them(tmp_path: Path) -> None:
    from med3dvlm.uploads import readable_path

    nifti = write_nifti(tmp_path / "x.nii.gz", hu_phantom((10, 24, 24))).read_bytes()
    archive = zip_of({"a.nii.gz": nifti, "b.nii.gz": nifti}, tmp_path / "two.zip")
    with pytest.raises(VolumeError, match=r"two.zip: holds 2 volume files \(a.nii.gz, b.nii.gz\)"):
        with readable_path(archive):
            pass


def test_one_preprocessing_path_hu_and_normalized_agree(tmp_path: Path) -> None:
    """The same volume in HU (NIfTI) and min-maxed (.npy) becomes the same model input."""
    hu = np.round(hu_phantom((10, 24, 24)))
    np.save(tmp_path / "norm.npy", ((hu - hu.min()) / (hu.max() - hu.min())).astype(np.float32))
    spec = PreprocessSpec.m3d((8, 16, 16))
    a, _ = load_for_model(lps_nifti(tmp_path / "hu.nii.gz", hu.astype(np.int16)), spec)
    b, _ = load_for_model(tmp_path / "norm.npy", spec)
    assert float((a - b).abs().max()) < 1e-3


# ---------------------------------------------------------------------------------------- the CLI


def test_data_inspect_reads_zips_and_refuses_with_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from med3dvlm.cli import main as cli

    from serving_helpers import zip_folder

    series = write_dicom_series(tmp_path / "s" / "series", hu_phantom((10, 24, 24)))
    edit_dicom_series(series, lambda k, ds: k != 4)
    archive = zip_folder(series, tmp_path / "series.zip")
    capsys.readouterr()
    assert cli(["data", "inspect", str(archive), "--json", "--size", "8", "16", "16"]) == 0  # `predict` took zips, inspect refused them
    payload = json.loads(capsys.readouterr().out)
    assert payload["read"]["source"] == str(archive) and payload["read"]["meta"]["slice_gaps"]["missing_estimate"] == 1
    assert any(w.startswith(f"{archive}: uneven slice gaps") for w in payload["warnings"])  # the zip, not its temp folder
    assert "series_uid" not in json.dumps(payload)
    assert cli(["data", "inspect", str(archive), "--strict"]) == 1
    assert "refused under --strict" in capsys.readouterr().err
    lie = lying_nifti(tmp_path / "lie.nii.gz")
    assert cli(["data", "inspect", str(lie)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {lie}: the header claims")
    assert cli(["data", "inspect", str(lie), "--max-voxels", str(2**31)]) == 1
    assert "truncated" in capsys.readouterr().err
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert cli(["data", "inspect", str(tmp_path / "loop")]) == 1
    err = capsys.readouterr().err
    assert "symbolic link loop" in err and "Traceback" not in err
