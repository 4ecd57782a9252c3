"""Helpers for the predict, REST API and web app tests: a tiny saved VLM and scans written on the fly."""

from __future__ import annotations

import contextlib
import copy
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def tiny_vlm_dir(root: Path, tokenizer: Any) -> Path:
    """The random `med3dvlm_test` VLM (64^3 input) saved with the in-memory test tokenizer."""
    import torch

    import med3dvlm
    from med3dvlm.models.vlm import Med3DVLM

    torch.manual_seed(0)
    model = Med3DVLM(med3dvlm.get_config("med3dvlm_test"), tokenizer=copy.deepcopy(tokenizer)).eval()
    for p in model.projector.parameters():  # bigger image features, so the image visibly changes the text
        p.data.mul_(3)
    model.save_pretrained(root)
    return root


def hu_phantom(shape: tuple[int, int, int] = (20, 40, 36), seed: int = 0) -> np.ndarray:
    """A small CT-like volume in HU: air, a water body, a bone rod and a seed-dependent lesion."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    z, y, x = np.mgrid[0:d, 0:h, 0:w]
    vol = np.full(shape, -1000.0, np.float32)
    vol[(y - h / 2) ** 2 + (x - w / 2) ** 2 < (min(h, w) / 2.5) ** 2] = 40.0
    vol[(y - h / 2) ** 2 + (x - w / 2) ** 2 < 4] = 900.0
    cz, cy, cx = rng.integers(4, d - 4), rng.integers(10, h - 10), rng.integers(10, w - 10)
    vol[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < 9] = -20.0 + 200 * seed
    return vol + z.astype(np.float32)  # a slice ramp: any slice-order mistake changes the input


def write_nifti(path: Path, hu: np.ndarray, spacing: tuple[float, float, float] = (2.5, 0.8, 0.8)) -> Path:
    """`hu` (D, H, W) as a NIfTI file (nibabel wants (x, y, z))."""
    import nibabel as nib

    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)).astype(np.int16), affine), str(path))
    return path


def write_dicom_series(folder: Path, hu: np.ndarray, patient_name: str = "DOE^JANE") -> Path:
    """`hu` (D, H, W) as one CT slice per file, with patient fields so tests can check they never leak."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series, study = generate_uid(), generate_uid()
    for k in range(hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"slice{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.PatientName, ds.PatientID = patient_name, "PID-0042"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.PixelSpacing = [0.8, 0.8]
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
        ds.PixelData = np.round(hu[k] + 1024.0).astype(np.int16).tobytes()
        ds.save_as(folder / f"slice{k:03d}.dcm", enforce_file_format=True)
    return folder


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder.parent).as_posix())
    return archive


def serving_files(root: Path, tokenizer: Any) -> dict[str, Path]:
    """What the API and web app tests serve: a tiny VLM, a 4-case index of prepared volumes, and scans."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from clip_helpers import tiny_model_dir

    from med3dvlm.search import build_index

    scans = root / "scans"
    rng = np.random.default_rng(0)
    for i in range(4):  # prepared [0, 1] volumes at the tiny contrastive model's size, one case each
        (scans / f"case{i}").mkdir(parents=True)
        np.save(scans / f"case{i}" / "ct.npy", rng.random((16, 32, 32), dtype=np.float32))
    clip = tiny_model_dir(root / "clip")
    build_index(clip, scans, root / "index", progress=False)
    series = write_dicom_series(root / "dicom" / "series", hu_phantom(seed=4))
    return {
        "vlm": tiny_vlm_dir(root / "vlm", tokenizer),
        "index": root / "index",
        "nifti": write_nifti(root / "Smith_John_1961.nii.gz", hu_phantom(seed=1)),
        "zip": zip_folder(series, root / "series.zip"),
        "dicom": series,
        "query": scans / "case2" / "ct.npy",
    }


def indexed_predictor(files: dict[str, Path]) -> Any:
    """A `Predictor` of the tiny VLM in `files` with its 4-case index attached (for /search and the app)."""
    from med3dvlm.inference import Predictor
    from med3dvlm.search import CaseIndex

    predictor = Predictor.from_dir(files["vlm"])
    predictor.index = CaseIndex(files["index"], device="cpu")
    return predictor


@contextlib.contextmanager
def live_server(app: Any) -> Iterator[str]:
    """`app` served by uvicorn on a free local port in a thread; yields its base URL (http://127.0.0.1:PORT)."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held until uvicorn takes the socket over
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
