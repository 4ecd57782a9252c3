"""Fixtures for the data-layer tests: DICOM series written on the fly and the real scans of offline-assets §4."""

from __future__ import annotations

import plistlib
import random
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_dicom_series(
    folder: Path,
    hu: np.ndarray,
    spacing: tuple[float, float, float] = (2.5, 0.7, 0.8),
    origin: tuple[float, float, float] = (-100.0, -120.0, 40.0),
    slopes: list[float] | float = 1.0,
    intercept: float = -1024.0,
    series_uid: str | None = None,
    description: str = "test series",
    seed: int = 0,
) -> str:
    """Write `hu` (D, H, W) as one CT slice per file, with shuffled names and scrambled instance numbers.

    File names and InstanceNumber are deliberately unrelated to the slice position, so only a reader that
    sorts by ImagePositionPatient along the slice normal gets the order right.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    rng = random.Random(seed)
    depth = hu.shape[0]
    slopes = [slopes] * depth if isinstance(slopes, (int, float)) else list(slopes)
    instance_numbers = list(range(1, depth + 1))
    rng.shuffle(instance_numbers)
    for k in range(depth):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        name = f"{rng.getrandbits(40):010x}.dcm"
        ds = FileDataset(str(folder / name), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = description
        ds.Modality = "CT"
        ds.InstanceNumber = instance_numbers[k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[0]]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slopes[k]
        ds.RescaleIntercept = intercept
        stored = np.round((hu[k] - intercept) / slopes[k]).astype(np.int16)
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / name, enforce_file_format=True)
    return series_uid


@pytest.fixture
def hu_volume() -> np.ndarray:
    """A small (D, H, W) CT-like volume in HU: air around a water cylinder holding a bone rod."""
    d, h, w = 12, 24, 20
    z, y, x = np.mgrid[0:d, 0:h, 0:w]
    vol = np.full((d, h, w), -1000.0, np.float32)
    vol[(y - 12) ** 2 + (x - 10) ** 2 < 64] = 20.0
    vol[(y - 12) ** 2 + (x - 10) ** 2 < 4] = 900.0
    vol += z * 3.0  # a slice-dependent ramp makes any slice-order mistake visible
    return vol


@pytest.fixture(scope="session")
def invesalius_ct() -> tuple[np.ndarray, tuple[float, float, float]]:
    """The real head CT of Debian `invesalius-examples`: (108, 256, 256) int16 HU and its spacing (D, H, W)."""
    try:
        files = subprocess.run(["dpkg", "-L", "invesalius-examples"], capture_output=True, text=True, check=True).stdout.split()
        path = next(p for p in files if p.endswith("Cranium.inv3"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pytest.skip("Debian package invesalius-examples is not installed (apt-get install invesalius-examples)")
    with tarfile.open(path) as tf:
        def get(suffix: str) -> bytes:
            member = next(m for m in tf.getmembers() if m.name.endswith(suffix))
            return tf.extractfile(member).read()  # type: ignore[union-attr]

        meta = plistlib.loads(get("main.plist"))
        ct = np.frombuffer(get("matrix.dat"), dtype=meta["matrix"]["dtype"]).reshape(meta["matrix"]["shape"])
    sx, sy, sz = (float(s) for s in meta["spacing"])
    return ct.copy(), (sz, sy, sx)


@pytest.fixture
def dicom_writer():
    """`write_dicom_series` as a fixture, so test modules need no import path tricks."""
    return write_dicom_series


@pytest.fixture(scope="session")
def ct_small_path() -> Path:
    try:
        return Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    except Exception:  # pragma: no cover - pydicom always ships it, but be explicit if not
        pytest.skip("pydicom test file CT_small.dcm is not available")


@pytest.fixture(scope="session")
def ect_path() -> Path:
    """pydicom-data's enhanced (multi-frame) CT."""
    name = "eCT_Supplemental.dcm"
    try:
        import data_store
    except ImportError:
        pytest.skip("pydicom-data is not installed (pip install pydicom-data)")
    path = Path(data_store.__file__).parent / "data" / name
    if not path.exists():
        pytest.skip(f"pydicom-data has no {name}")
    return path


@pytest.fixture(scope="session")
def mni_path() -> Path:
    """nilearn's MNI152 T1 template, a real 3D MRI volume in NIfTI."""
    try:
        import nilearn
    except ImportError:
        pytest.skip("nilearn is not installed (pip install nilearn)")
    path = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not path.exists():
        pytest.skip("nilearn ships no MNI152 template here")
    return path

