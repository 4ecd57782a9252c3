"""The OpenAI-compatible endpoints, called with the official `openai` client against a live local server."""

from __future__ import annotations

import base64
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from med3dvlm.api import create_app  # noqa: E402
from med3dvlm.inference import Predictor  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from serving_helpers import hu_phantom, live_server, tiny_vlm_dir, write_dicom_series, write_nifti, zip_folder  # noqa: E402

MODEL = "vlm"  # the saved folder's name, which the server lists as its model id


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("openai")
    series = write_dicom_series(root / "dicom" / "series", hu_phantom(seed=4))
    return {
        "vlm": tiny_vlm_dir(root / MODEL, tiny_tokenizer),
        "nifti": write_nifti(root / "scan.nii.gz", hu_phantom(seed=1)),
        "zip": zip_folder(series, root / "series.zip"),
    }


@pytest.fixture(scope="module")
def predictor(files: dict[str, Path]) -> Predictor:
    return Predictor.from_dir(files["vlm"])


@pytest.fixture(scope="module")
def client(predictor: Predictor) -> Iterator[openai.OpenAI]:
    with live_server(create_app(predictor, max_upload_mb=2, max_new_tokens_limit=32)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def file_part(path: Path, data_url: str | None = None, filename: str | None = None) -> dict:
    data = base64.b64encode(path.read_bytes()).decode()
    return {"type": "file", "file": {"file_data": f"data:{data_url};base64,{data}" if data_url else data,
                                     "filename": filename if filename is not None else path.name}}


def ask(client: openai.OpenAI, content: list[dict], **kwargs):
    if "max_tokens" not in kwargs:  # the older name, tested on its own
        kwargs.setdefault("max_completion_tokens", 6)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kwargs)


def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_report_for_a_volume_without_question(client: openai.OpenAI, predictor: Predictor, files: dict[str, Path]) -> None:
    reply = ask(client, [file_part(files["nifti"])])
    text = reply.choices[0].message.content
    assert text == predictor.predict(files["nifti"], max_new_tokens=6).text and text
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.choices[0].message.role == "assistant"
    processor = predictor.model.processor
    prompt = len(processor.prompt_ids(processor.caption_prompt(), caption=True))
    assert reply.usage.prompt_tokens == prompt and prompt > predictor.model.num_image_tokens
    assert reply.usage.completion_tokens == len(processor.tokenizer(text, add_special_tokens=False).input_ids)
    assert reply.usage.total_tokens == prompt + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_vqa_answer_from_a_zipped_series_as_a_data_url(client: openai.OpenAI, predictor: Predictor, files: dict[str, Path]) -> None:
    question = "Is there a cyst in the left kidney?"
    reply = ask(client, [{"type": "text", "text": question}, file_part(files["zip"], data_url="application/zip", filename="")],
                max_tokens=5)
    assert reply.choices[0].message.content == predictor.predict(files["zip"], question, max_new_tokens=5).text
    assert reply.usage.prompt_tokens == len(predictor.model.processor.prompt_ids(question))


def test_streamed_text_equals_the_non_streamed_text(client: openai.OpenAI, files: dict[str, Path]) -> None:
    content = [file_part(files["nifti"])]  # the tiny model's report has spaces, so the streamer sends pieces
    whole = ask(client, content, max_completion_tokens=12, temperature=0)
    chunks = list(ask(client, content, max_completion_tokens=12, temperature=0, stream=True,
                      stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content and streamed
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, streamed  # really in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_multi_turn_answers_the_last_question_about_the_earlier_volume(client: openai.OpenAI, predictor: Predictor,
                                                                        files: dict[str, Path]) -> None:
    follow_up = "Which plane is this image?"
    reply = client.chat.completions.create(model=MODEL, max_completion_tokens=5, messages=[
        {"role": "system", "content": "You are a radiologist."},
        {"role": "user", "content": [file_part(files["nifti"]), {"type": "text", "text": "Describe the findings."}]},
        {"role": "assistant", "content": "No abnormality."},
        {"role": "user", "content": follow_up},
    ])
    assert reply.choices[0].message.content == predictor.predict(files["nifti"], follow_up, max_new_tokens=5).text


def test_sampling_with_a_seed_is_reproducible(client: openai.OpenAI, files: dict[str, Path]) -> None:
    content = [file_part(files["nifti"])]
    a, b = (ask(client, content, temperature=1.0, top_p=0.9, seed=5).choices[0].message.content for _ in range(2))
    assert a == b


def test_a_broken_volume_is_a_bad_request_naming_the_reason(client: openai.OpenAI, tmp_path: Path) -> None:
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"this is not a NIfTI file at all" * 10)
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, [file_part(broken), {"type": "text", "text": "Any lesion?"}])
    error = err.value.body
    assert err.value.status_code == 400 and error["code"] == "unreadable_volume" and error["type"] == "invalid_request_error"
    assert error["message"].startswith("broken.nii.gz: ") and len(error["message"]) > len("broken.nii.gz: ") + 10
    assert error["param"] == "messages[0].content[0]"


@pytest.mark.parametrize(
    "content, kwargs, message",
    [
        ([{"type": "text", "text": "Any lesion?"}], {}, "no volume"),
        (["FILE:scan.txt"], {}, "file type '.txt' is not accepted"),
        (["FILE:"], {}, "no file type (give file.filename"),
        ([{"type": "file", "file": {"file_data": "%%%not base64%%%", "filename": "a.nii.gz"}}], {}, "not valid base64"),
        ([{"type": "file", "file": {"file_id": "file-123"}}], {}, "file_id is not supported"),
        ([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}], {}, "content type 'image_url' is not supported"),
        (["FILE:scan.nii.gz"], {"n": 2}, "only n=1 is supported"),
        (["FILE:scan.nii.gz"], {"max_completion_tokens": 33}, "over this server's limit of 32"),
        (["FILE:scan.nii.gz"], {"temperature": 5}, "temperature"),
    ],
)
def test_invalid_requests_are_openai_errors(client: openai.OpenAI, files: dict[str, Path], content: list, kwargs: dict,
                                            message: str) -> None:
    content = [file_part(files["nifti"], filename=c[5:]) if isinstance(c, str) else c for c in content]
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, content, **kwargs)
    assert message in err.value.body["message"] and err.value.body["type"] == "invalid_request_error"


def test_another_model_name_is_not_found(client: openai.OpenAI, files: dict[str, Path]) -> None:
    with pytest.raises(openai.NotFoundError, match="this server serves 'vlm'"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": [file_part(files["nifti"])]}])


def test_a_volume_over_the_upload_limit_is_413(client: openai.OpenAI, tmp_path: Path) -> None:
    big = tmp_path / "big.npy"
    big.write_bytes(b"\0" * (1600 * 1024))  # its base64 is over the server's 2 MB limit
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [file_part(big)]}])
    assert err.value.status_code == 413
    # OpenAI's error JSON, like every other /v1 error (the body limit answers before the body is read).
    assert err.value.response.json() == {"error": {
        "message": "the request is larger than the upload limit of 2 MB", "type": "invalid_request_error",
        "param": None, "code": "request_too_large"}}
    # ... which the client reads: its message and code, not a dump of an unknown body.
    assert err.value.message == "Error code: 413 - the request is larger than the upload limit of 2 MB"
    assert err.value.code == "request_too_large"


def test_a_chunked_body_over_the_limit_is_an_openai_413(client: openai.OpenAI) -> None:
    import httpx

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts the bytes as they arrive
        yield b'{"model": "vlm", "messages": [{"role": "user", "content": "'
        for _ in range(3):
            yield b"x" * (1024 * 1024)
        yield b'"}]}'

    r = httpx.post(f"{client.base_url}chat/completions", content=chunks(), headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and "content-length" not in {k.lower() for k in r.request.headers}
    assert r.json()["error"]["code"] == "request_too_large" and set(r.json()["error"]) == {"message", "type", "param", "code"}
    # Other paths keep the REST API's error shape.
    other = httpx.post(f"{str(client.base_url)[:-len('v1/')]}report", content=b"x" * (3 * 1024 * 1024), timeout=60)
    assert other.status_code == 413 and other.json()["code"] == "too_large"
