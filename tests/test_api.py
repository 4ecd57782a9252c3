"""The REST API: each endpoint, its 4xx answers, the OpenAPI schema, and a bounded schemathesis run."""

from __future__ import annotations

import io
import json
import logging
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from med3dvlm.api import create_app  # noqa: E402
from med3dvlm.inference import Predictor  # noqa: E402
from med3dvlm.search import CaseIndex, build_index  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from clip_helpers import tiny_model_dir  # noqa: E402
from serving_helpers import (  # noqa: E402
    hu_phantom,
    tiny_vlm_dir,
    write_dicom_series,
    write_nifti,
    zip_folder,
)

TOKENS = {"max_new_tokens": "5"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api")
    scans = root / "scans"
    rng = np.random.default_rng(0)
    for i in range(4):  # prepared [0, 1] volumes at the tiny contrastive model's size, one case each
        (scans / f"case{i}").mkdir(parents=True)
        np.save(scans / f"case{i}" / "ct.npy", rng.random((16, 32, 32), dtype=np.float32))
    clip = tiny_model_dir(root / "clip")
    build_index(clip, scans, root / "index", progress=False)
    series = write_dicom_series(root / "dicom" / "series", hu_phantom(seed=4))
    return {
        "vlm": tiny_vlm_dir(root / "vlm", tiny_tokenizer),
        "index": root / "index",
        "nifti": write_nifti(root / "Smith_John_1961.nii.gz", hu_phantom(seed=1)),
        "zip": zip_folder(series, root / "series.zip"),
        "query": scans / "case2" / "ct.npy",
    }


@pytest.fixture(scope="module")
def predictor(files: dict[str, Path]) -> Predictor:
    p = Predictor.from_dir(files["vlm"])
    p.index = CaseIndex(files["index"], device="cpu")
    return p


@pytest.fixture(scope="module")
def client(predictor: Predictor) -> TestClient:
    return TestClient(create_app(predictor, max_upload_mb=1))


def upload(path: Path, name: str | None = None) -> dict:
    return {"file": (name or path.name, path.read_bytes(), "application/octet-stream")}


def test_report_on_nifti(client: TestClient, predictor: Predictor, files: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        r = client.post("/report", files=upload(files["nifti"]), data=TOKENS)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "report" and body["source"] == "Smith_John_1961.nii.gz"
    assert body["text"] == predictor.predict(files["nifti"], max_new_tokens=5).text
    assert body["generation"]["max_new_tokens"] == 5
    assert body["preprocessing"]["output"]["shape"] == [1, 64, 64, 64]
    assert "tmp" not in json.dumps(body["preprocessing"]["input"])  # the temporary upload path never shows
    assert "Smith" not in caplog.text  # file names can identify patients: never logged


def test_vqa_on_zipped_dicom(client: TestClient, files: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        r = client.post("/vqa", files=upload(files["zip"]), data={"question": "Is there a lesion?", "seed": "3", **TOKENS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "vqa" and body["question"] == "Is there a lesion?"
    assert body["preprocessing"]["input"]["modality"] == "CT" and body["preprocessing"]["input"]["meta"]["num_slices"] == 20
    assert "DOE" not in caplog.text and "PID-0042" not in caplog.text and "DOE" not in r.text


def test_embed_and_search(client: TestClient, files: dict[str, Path]) -> None:
    r = client.post("/embed", files=upload(files["query"]))
    assert r.status_code == 200, r.text
    vector = np.array(r.json()["embedding"])
    assert r.json()["dim"] == vector.size and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    r = client.post("/search", files=upload(files["query"]), data={"k": "3"})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert r.json()["query"] == "image" and [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["case"] == "case2" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)  # finds itself first
    r = client.post("/search", data={"text": "cyst in the liver", "k": "2"})
    assert r.status_code == 200 and len(r.json()["hits"]) == 2 and r.json()["query"] == "text"


def test_health_and_openapi(client: TestClient) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["input_size"] == [64, 64, 64] and health["index_items"] == 4
    schema = client.get("/openapi.json").json()
    assert {"/report", "/vqa", "/embed", "/search", "/health"} <= set(schema["paths"])
    responses = schema["paths"]["/embed"]["post"]["responses"]
    assert {"200", "400", "413", "415", "422", "503"} <= set(responses)


@pytest.mark.parametrize(
    "name, content, data, status, detail",
    [
        ("notes.txt", b"hello", {}, 415, "notes.txt: file type '.txt' is not accepted"),
        ("scan", b"\0" * 100, {}, 415, "a file without a type suffix"),
        ("empty.nii.gz", b"", {}, 400, "empty.nii.gz: the file is empty"),
        ("bad.nii.gz", b"\x1f\x8bnot gzip at all", {}, 400, "bad.nii.gz: "),
        ("bad.zip", b"PK\x03\x04 broken", {}, 400, "bad.zip: not a readable zip archive"),
        ("flat.npy", None, {}, 400, "flat.npy: a 2D image"),
        ("big.npy", b"\0" * (1024**2 + 10), {}, 413, "larger than the limit of 1 MB"),
        ("ok.nii.gz", "nifti", {"max_new_tokens": "0"}, 422, None),
        ("ok.nii.gz", "nifti", {"seed": "minus one"}, 422, None),
    ],
)
def test_report_4xx(client: TestClient, files: dict[str, Path], name: str, content, data: dict, status: int, detail: str | None) -> None:
    if content is None:
        buffer = io.BytesIO()
        np.save(buffer, np.zeros((8, 8), np.float32))
        content = buffer.getvalue()
    elif content == "nifti":
        content = files["nifti"].read_bytes()
    r = client.post("/report", files={"file": (name, content, "application/octet-stream")}, data=data)
    assert r.status_code == status, r.text
    if detail is not None:
        assert detail in r.json()["detail"]


def test_other_4xx(client: TestClient, files: dict[str, Path], predictor: Predictor) -> None:
    assert client.post("/vqa", files=upload(files["nifti"])).status_code == 422  # no question
    assert client.post("/vqa", files=upload(files["nifti"]), data={"question": "x" * 2001}).status_code == 422
    assert client.post("/report").status_code == 422  # no file
    r = client.post("/search", data={"k": "2"})
    assert r.status_code == 400 and "exactly one of a file or a text" in r.json()["detail"]
    assert client.post("/search", data={"text": "mass", "k": "0"}).status_code == 422
    # A zip holding a path that climbs out of its folder is refused before anything is written.
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../outside.dcm", b"x")
    r = client.post("/report", files={"file": ("evil.zip", evil.getvalue(), "application/zip")})
    assert r.status_code == 400 and "unsafe path" in r.json()["detail"]
    # Without an index, /embed and /search say so.
    bare = TestClient(create_app(Predictor(predictor.model, "vlm"), max_upload_mb=1))
    for endpoint, kwargs in [("/embed", {"files": upload(files["query"])}), ("/search", {"data": {"text": "mass"}})]:
        r = bare.post(endpoint, **kwargs)
        assert r.status_code == 503 and "no case index is loaded" in r.json()["detail"]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_fuzz(predictor: Predictor, mode: str) -> None:
    """Schema-generated requests (valid, then invalid) never cause a 5xx; responses match the documented schema."""
    from hypothesis import given
    from schemathesis import GenerationMode

    app = create_app(predictor, max_upload_mb=1, max_new_tokens_limit=4)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /report", "POST /vqa", "POST /embed", "POST /search", "GET /health"}
    for operation in operations:
        if mode == "negative" and operation.label in ("GET /health", "GET /v1/models"):
            continue  # no parameters to break

        @given(case=operation.as_strategy(GenerationMode(mode)))
        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        def check(case) -> None:
            # A schema cannot say "a readable CT volume", so schema-valid random bytes are rightly refused
            # (400/415); every other check (no 5xx, documented status codes and bodies) applies.
            case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])

        check()


def test_app_lists_similar_cases(predictor: Predictor, files: dict[str, Path]) -> None:
    """The web app's similar-case panel (its event handlers called directly; the browser test covers the page)."""
    gr = pytest.importorskip("gradio")
    from med3dvlm.app import create_demo

    demo = create_demo(predictor)
    assert "Find similar cases" in {b.value for b in demo.blocks.values() if isinstance(b, gr.Button)}
    handlers = {f.fn.__name__: f.fn for f in demo.fns.values()}
    loaded = handlers["load"](str(files["query"]))[0]
    assert not loaded.is_hu  # prepared [0, 1] data: plain display, no HU presets
    rows = handlers["similar"](loaded)
    assert [r[0] for r in rows] == [1, 2, 3, 4] and rows[0][2] == "case2" and rows[0][1] == pytest.approx(1.0, abs=1e-4)


def test_app_display_windows() -> None:
    pytest.importorskip("gradio")
    from med3dvlm.app import AUTO, to_uint8

    hu = np.array([[-1000.0, -600.0, 40.0, 1000.0]])
    assert to_uint8(hu, "lung", True).tolist() == [[59, 127, 236, 255]]  # [-1350, 150] HU
    assert to_uint8(hu, "soft_tissue", True).tolist() == [[0, 0, 127, 255]]
    assert to_uint8(hu, "lung", False).tolist() == to_uint8(hu, AUTO, True).tolist()  # not HU: min-max
    assert to_uint8(np.full((3, 3), 7.0), AUTO, True).max() == 0  # constant slice: black, no division by zero
