"""The REST API: each endpoint, its 4xx answers, the OpenAPI schema, and a bounded schemathesis run.

Hostile input (lying headers, chunked bodies over the limit, error-path privacy, one preprocessing
path, the fuzz run with real volumes) is in test_api_hostile.py; the web app's handlers in test_app.py.
"""

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
from fastapi.testclient import TestClient  # noqa: E402

from med3dvlm.api import create_app  # noqa: E402
from med3dvlm.inference import Predictor  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from serving_helpers import indexed_predictor, serving_files  # noqa: E402

TOKENS = {"max_new_tokens": "5"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> dict[str, Path]:
    return serving_files(tmp_path_factory.mktemp("api"), tiny_tokenizer)


@pytest.fixture(scope="module")
def predictor(files: dict[str, Path]) -> Predictor:
    return indexed_predictor(files)


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


def test_question_spelling_the_image_placeholder_is_plain_text(client: TestClient, predictor: Predictor,
                                                               files: dict[str, Path]) -> None:
    question = "What does <im_patch> mean here?"  # was a 500: one image position more than the image has features
    r = client.post("/vqa", files=upload(files["nifti"]), data={"question": question, **TOKENS})
    assert r.status_code == 200, r.text
    assert r.json()["question"] == question and r.json()["text"] == predictor.predict(files["nifti"], question, max_new_tokens=5).text


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
