"""The REST API under hostile and broken uploads: 413 however a body is sent, one JSON error shape, no
server path in a detail, no name or DICOM text in a log or a response, one preprocessing path for
every endpoint, bounded concurrent reads, and a schemathesis run that sends real volumes."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import med3dvlm.inference as inference  # noqa: E402
from med3dvlm.api import ERROR_CODES, create_app  # noqa: E402
from med3dvlm.data.limits import ReadLimits  # noqa: E402
from med3dvlm.inference import Predictor  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from hostile_inputs import edit_dicom_series, lps_nifti, lying_nifti, lying_nrrd, nifti_with_affine, npy_bytes, zip_of  # noqa: E402
from serving_helpers import hu_phantom, indexed_predictor, serving_files, write_dicom_series, zip_folder  # noqa: E402

NAME = "Doe_Jane_19610101"
SECRET = "Jane Doe follow-up"
TOKENS = {"max_new_tokens": "3"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    out = serving_files(root, tiny_tokenizer)
    gap = write_dicom_series(root / "gap" / "series", hu_phantom((12, 40, 36)), patient_name="DOE^JANE")
    edit_dicom_series(gap, lambda k, ds: False if k == 6 else setattr(ds, "SeriesDescription", SECRET))
    out["gap_zip"] = zip_folder(gap, root / "gap.zip")
    mr = write_dicom_series(root / "mr" / "series", hu_phantom((12, 40, 36)))
    edit_dicom_series(mr, lambda k, ds: setattr(ds, "Modality", "MR"))
    out["mr_zip"] = zip_folder(mr, root / "mr.zip")
    return out


@pytest.fixture(scope="module")
def predictor(files: dict[str, Path]) -> Predictor:
    return indexed_predictor(files)


@pytest.fixture(scope="module")
def client(predictor: Predictor) -> TestClient:
    return TestClient(create_app(predictor, max_upload_mb=1), raise_server_exceptions=False)


def post(client: TestClient, endpoint: str, name: str, content: bytes, **data: str):
    return client.post(endpoint, files={"file": (name, content, "application/octet-stream")}, data=data)


def error_body(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail", "code", "status", "errors"} and body["status"] == status
    assert body["code"] == ERROR_CODES[status] and isinstance(body["detail"], str) and body["detail"]
    assert "/tmp" not in body["detail"] and "med3dvlm-" not in body["detail"]  # no server path
    return body


# ------------------------------------------------------------------------------------- sizes and 413


def test_lying_header_gets_413_and_a_clear_detail(client: TestClient, tmp_path: Path) -> None:
    lie = lying_nifti(tmp_path / "x.nii.gz").read_bytes()
    for endpoint in ("/report", "/embed", "/search"):
        body = error_body(post(client, endpoint, f"{NAME}.nii.gz", lie), 413)
        assert body["detail"].startswith(f"{NAME}.nii.gz: the header claims 1024 x 1024 x 1024")
    nrrd = lying_nrrd(tmp_path / "x.nrrd").read_bytes()
    assert len(nrrd) < 200
    error_body(post(client, "/vqa", "scan.nrrd", nrrd, question="Is there a lesion?"), 413)


def test_server_limits_are_lower_than_the_library_defaults(client: TestClient, tmp_path: Path) -> None:
    # 512 x 512 x 1100 voxels: within the library's limit (refused as truncated there), over the server's.
    lie = lying_nifti(tmp_path / "x.nii.gz", shape=(512, 512, 1100))
    with pytest.raises(inference.VolumeError, match="truncated"):
        inference.load_volume(lie)
    error_body(post(client, "/report", "x.nii.gz", lie.read_bytes()), 413)


def test_chunked_upload_over_the_limit_gets_413(client: TestClient) -> None:
    """Without Content-Length the body is counted as it arrives; FastAPI's 400 for the cut body is replaced."""
    boundary = "hostileboundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.npy"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    def chunks():
        yield head
        for _ in range(40):
            yield b"\0" * 65536  # 2.5 MB against a 1 MB limit
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/report", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    error_body(r, 413)
    error_body(post(client, "/report", "big.npy", b"\0" * (1024**2 + 10)), 413)  # with Content-Length


def test_error_bodies_have_one_shape(client: TestClient) -> None:
    error_body(post(client, "/report", "notes.txt", b"hello"), 415)
    body = error_body(post(client, "/report", "x.nii.gz", b"\x1f\x8bjunk", max_new_tokens="0"), 422)
    assert body["errors"] and body["errors"][0]["loc"][-1] == "max_new_tokens" and "input" not in body["errors"][0]
    error_body(client.post("/report"), 422)
    error_body(post(client, "/report", "x.nii.gz", b"\x1f\x8bjunk"), 400)
    error_body(client.get("/nowhere"), 404)
    error_body(client.get("/report"), 405)


# ------------------------------------------------------------------------------ clear errors, never 5xx


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("zero_affine", "zero voxel spacing"),
        ("nan_affine", "NaN or Inf"),
        ("one_voxel", "singleton axis"),
        ("two_volumes", "holds 2 volume files"),
        ("four_d", "a 4D image"),
    ],
)
def test_broken_uploads_are_400_on_every_endpoint(client: TestClient, tmp_path: Path, kind: str, needle: str) -> None:
    if kind == "zero_affine":
        name, content = "s.nii.gz", nifti_with_affine(tmp_path / "s.nii.gz", np.zeros((4, 4))).read_bytes()
    elif kind == "nan_affine":
        name, content = "s.nii", nifti_with_affine(tmp_path / "s.nii", np.full((4, 4), np.nan)).read_bytes()
    elif kind == "one_voxel":
        name, content = "s.npy", npy_bytes(np.zeros((1, 1, 1), np.float32))  # /embed accepted it before
    elif kind == "four_d":
        name, content = "s.nii.gz", lying_nifti(tmp_path / "s.nii.gz", shape=(8, 8, 8, 2)).read_bytes()
    else:
        one = lps_nifti(tmp_path / "a.nii.gz", hu_phantom((10, 24, 24)).astype(np.int16)).read_bytes()
        name, content = "s.zip", zip_of({"a.nii.gz": one, "b.nii.gz": one}, tmp_path / "two.zip").read_bytes()
    for endpoint in ("/report", "/embed", "/search"):
        body = error_body(post(client, endpoint, name, content), 400)
        assert body["detail"].startswith(f"{name}: ") and needle in body["detail"], body["detail"]


def test_error_paths_log_no_names_and_show_no_paths(client: TestClient, files: dict[str, Path], tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture) -> None:
    bad_zip = tmp_path / f"{NAME}.zip"
    series = write_dicom_series(tmp_path / "s" / NAME, hu_phantom((10, 24, 24)), patient_name="DOE^JANE")
    edit_dicom_series(series, lambda k, ds: (setattr(ds, "SeriesDescription", SECRET), setattr(ds, "PixelSpacing", [0.0, 0.0])))
    zip_folder(series, bad_zip)
    uploads = [
        (f"{NAME}.nii.gz", lying_nifti(tmp_path / "l.nii.gz").read_bytes()),
        (f"{NAME}.nii.gz", b"\x1f\x8b broken"),
        (f"{NAME}.nrrd", b"NRRD0004\ntype: short\n\n"),
        (f"{NAME}.mha", b"ObjectType = Image\n"),
        (f"{NAME}.dcm", b"\0" * 200),
        (f"{NAME}.zip", bad_zip.read_bytes()),
        (f"{NAME}.zip", b"PK\x03\x04 broken"),
    ]
    with caplog.at_level(logging.DEBUG):
        for name, content in uploads:
            for endpoint in ("/report", "/embed"):
                r = post(client, endpoint, name, content)
                assert 400 <= r.status_code < 500, r.text
                assert "/tmp" not in r.text and "med3dvlm-" not in r.text and SECRET not in r.text and "DOE" not in r.text
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err):
        assert NAME not in text and SECRET not in text and "DOE" not in text and "med3dvlm-api-" not in text


# ------------------------------------------------------------------------- what responses carry


def test_dicom_response_has_geometry_gaps_and_no_free_text(client: TestClient, files: dict[str, Path], caplog) -> None:
    with caplog.at_level(logging.DEBUG):
        r = post(client, "/report", "gap.zip", files["gap_zip"].read_bytes(), **TOKENS)
    assert r.status_code == 200, r.text
    pre = r.json()["preprocessing"]
    assert pre["input"]["meta"]["slice_gaps"]["missing_estimate"] == 1
    assert any(w.startswith("gap.zip: uneven slice gaps") for w in pre["warnings"])  # named by the upload, not a temp path
    assert pre["input"]["spacing"] == [2.5, 0.8, 0.8] and pre["input"]["modality"] == "CT"
    assert SECRET not in r.text and "series_uid" not in r.text and "DOE" not in r.text
    assert SECRET not in caplog.text


def test_strict_server_refuses_gaps(predictor: Predictor, files: dict[str, Path]) -> None:
    strict = Predictor(predictor.model, "vlm", strict=True)
    r = post(TestClient(create_app(strict, max_upload_mb=1)), "/report", "gap.zip", files["gap_zip"].read_bytes(), **TOKENS)
    assert error_body(r, 400)["detail"].startswith("gap.zip: ") and "refused under --strict" in r.json()["detail"]


def test_mr_is_a_visible_warning(client: TestClient, files: dict[str, Path]) -> None:
    r = post(client, "/report", "mr.zip", files["mr_zip"].read_bytes(), **TOKENS)
    assert r.status_code == 200 and any("modality MR, not CT" in w for w in r.json()["preprocessing"]["warnings"])


def test_embed_is_the_same_for_hu_and_normalized_input(client: TestClient, tmp_path: Path) -> None:
    """/embed skipped the preprocessing for .npy: cosine -0.40 between a volume in HU and the same volume min-maxed."""
    hu = np.round(hu_phantom((16, 40, 36)))
    as_hu = lps_nifti(tmp_path / "hu.nii.gz", hu.astype(np.int16)).read_bytes()
    as_unit = npy_bytes(((hu - hu.min()) / (hu.max() - hu.min())).astype(np.float32))
    a = np.array(post(client, "/embed", "hu.nii.gz", as_hu).json()["embedding"])
    b = np.array(post(client, "/embed", "unit.npy", as_unit).json()["embedding"])
    assert float(a @ b) >= 0.99
    hits = [post(client, "/search", n, c, k="4").json()["hits"] for n, c in (("hu.nii.gz", as_hu), ("unit.npy", as_unit))]
    assert [h["case"] for h in hits[0]] == [h["case"] for h in hits[1]]


def test_reads_are_bounded_by_a_semaphore(predictor: Predictor, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads ran outside the generation lock, so N parallel uploads held N volumes at once."""
    bounded = Predictor(predictor.model, "vlm", max_concurrent_reads=2)
    active, peak, lock = [0], [0], threading.Lock()
    real_load = inference.load_volume

    def slow_load(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        try:
            return real_load(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(inference, "load_volume", slow_load)
    threads = [threading.Thread(target=bounded.prepare, args=(files["nifti"],)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2


# ------------------------------------------------------------------------------- fuzzing, real volumes


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_with_real_volumes(predictor: Predictor, files: dict[str, Path], tmp_path: Path, mode: str) -> None:
    """Schema-generated requests, their file replaced by a real small volume (or a hostile one), never
    get a 5xx, match the documented schema, and do reach the model (200s on every model endpoint).

    Before, every generated file was named "file" with random bytes, so all 228 cases stopped at 415.
    """
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    hu = np.round(hu_phantom((12, 40, 36)))
    scans = [
        ("ct.nii.gz", files["nifti"].read_bytes()),
        ("ct.zip", files["zip"].read_bytes()),
        ("unit.npy", npy_bytes(((hu - hu.min()) / (hu.max() - hu.min())).astype(np.float32))),
        ("gap.zip", files["gap_zip"].read_bytes()),
        ("lie.nii.gz", lying_nifti(tmp_path / "lie.nii.gz").read_bytes()),
        ("flat.npy", npy_bytes(np.zeros((8, 8), np.float32))),
    ]
    app = create_app(predictor, max_upload_mb=1, max_new_tokens_limit=3, limits=ReadLimits(max_voxels=2**22))
    client = TestClient(app, raise_server_exceptions=False)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    statuses: Counter = Counter()
    multipart = ("POST /report", "POST /vqa", "POST /embed", "POST /search")
    for operation in (result.ok() for result in schema.get_all_operations()):
        if operation.method.upper() == "GET" and mode == "negative":
            continue  # no parameters to break
        if operation.label not in multipart:  # /health, the OpenAI-compatible /v1 routes: as schemathesis sends them
            @given(case=operation.as_strategy(GenerationMode(mode)))
            @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
            def plain(case) -> None:
                case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])

            plain()
            continue

        @given(case=operation.as_strategy(GenerationMode(mode)), scan=st.sampled_from(range(len(scans))) if mode == "positive" else st.just(None))
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        def check(case, scan) -> None:
            body = dict(case.body) if isinstance(case.body, dict) else {}
            upload = body.pop("file", None)
            files_arg = None
            if scan is not None and (upload is not None or operation.label != "POST /search"):
                files_arg = {"file": scans[scan]}
            elif upload is not None:
                files_arg = {"file": ("upload.bin", upload if isinstance(upload, bytes) else str(upload).encode())}
            data = {k: v if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v) for k, v in body.items() if v is not None}
            response = client.post(operation.path, data=data, files=files_arg)
            statuses[(operation.label, response.status_code)] += 1
            assert response.status_code < 500, response.text
            case.validate_response(response, excluded_checks=[schemathesis.checks.positive_data_acceptance])

        check()
    if mode == "positive":
        for label in ("POST /report", "POST /vqa", "POST /embed", "POST /search"):
            assert statuses[(label, 200)] > 0, statuses  # the fuzzer reached the model
