"""An OpenAI-compatible face of `med3dvlm serve`: `POST /v1/chat/completions` and `GET /v1/models`.

Clients built for vLLM, SGLang, `transformers serve` or the official `openai` package work unchanged:

    client.chat.completions.create(model="<GET /v1/models>", messages=[{"role": "user", "content": [
        {"type": "file", "file": {"file_data": "<base64, or a data: URL>", "filename": "scan.nii.gz"}},
        {"type": "text", "text": "Is there a lesion in the liver?"}]}])

The volume is a `file` content part in any format the other endpoints take (the filename's suffix says
which: .nii/.nii.gz/.nrrd/.mha/.npy/.dcm, or a .zip of a DICOM series), read and preprocessed by the same
`Predictor`. The text parts of the message form the question; a volume without a question asks for the
findings report.

Multi-turn messages: Med3DVLM answers one question about one volume; it was never trained on dialogues.
So the question is the text of the *last* user message, the volume is the most recent `file` part of any
user message (a follow-up question may leave it out and resend the history), and earlier turns, assistant
answers and system/developer messages are not shown to the model. Each answer therefore depends only on
the volume and the latest question, as it does on /vqa.

Decoding: greedy unless `temperature` > 0, which samples at that temperature with `top_p`; `seed` makes
sampling reproducible. `max_completion_tokens` (or the older `max_tokens`) caps the answer, up to the
server's limit; `n` must be 1. `stream: true` sends server-sent events in OpenAI's chunk format, ending in
`data: [DONE]`; with `stream_options.include_usage` a last chunk carries the usage. Token counts: the
prompt counts the image placeholder tokens and the question (or report instruction); the completion is
the answer re-tokenized. A non-streamed response also carries `preprocessing` (not an OpenAI field): the
steps applied to the volume (a raw HU scan given to a model trained on windowed images is windowed first,
see `PreprocessSpec.hu_window`), their warnings, and the HU window when one was applied.

Errors are OpenAI's error JSON (`{"error": {"message", "type", "param", "code"}}`): 400 for an invalid
request or an unreadable volume (the message names the file and the reason), 404 for another model name,
413 for a request body or a decoded volume over the upload limit (the server's body limit answers before the
body is read, in this format on /v1 paths: `is_openai_path`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .data.volume import VolumeError
from .inference import PreparedImage, Predictor
from .uploads import UPLOAD_SUFFIXES, upload_suffix

logger = logging.getLogger(__name__)

PREFIX = "/v1"
# A data: URL's media type, when the file part has no filename to take the type from.
_MEDIA_SUFFIXES = {"application/zip": ".zip", "application/x-zip-compressed": ".zip", "application/dicom": ".dcm",
                   "application/x-npy": ".npy"}
_DATA_URL = re.compile(r"^data:(?P<media>[\w.+-]+/[\w.+-]+)?(?:;[\w.+-]+=[\w.+-]+)*(?P<b64>;base64)?,", re.I)


# ------------------------------------------------------------------------------------------ schema


class FileObject(BaseModel):
    model_config = ConfigDict(extra="allow")
    file_data: Optional[str] = Field(None, description="The volume as base64, or a data: URL (data:<type>;base64,...).")
    filename: Optional[str] = Field(None, description="Its name; the suffix says the format (e.g. scan.nii.gz, series.zip).")
    file_id: Optional[str] = Field(None, description="Not supported: this server keeps no files.")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(description='"text" or "file" (other types are refused).')
    text: Optional[str] = None
    file: Optional[FileObject] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[ContentPart], None] = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request this server uses; others are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=0, le=2**31 - 1)
    n: int = Field(1, ge=1)


class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="What went wrong and what to change.")
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class OpenAIErrorOut(BaseModel):
    error: OpenAIErrorDetail


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OpenAIErrorOut, "description": "An invalid request, or a volume that cannot be read (the message names it and says why)."},
    404: {"model": OpenAIErrorOut, "description": "The request names another model than the one served (see GET /v1/models)."},
    413: {"model": OpenAIErrorOut, "description": "The request or the volume is larger than the upload limit."},
}
_COMPLETION_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "A `chat.completion` object, or with `stream: true` server-sent `chat.completion.chunk` events.",
          "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}}},
}


class OpenAIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def is_openai_path(path: str) -> bool:
    """Whether a request path is one of this module's, whose errors are OpenAI's error JSON."""
    return path.startswith(PREFIX + "/")


def too_large(max_bytes: int) -> OpenAIError:
    """The 413 for a request body over `max_bytes`, as OpenAI's error JSON."""
    return OpenAIError(413, f"the request is larger than the upload limit of {max_bytes / 1024**2:g} MB",
                       code="request_too_large")


# ------------------------------------------------------------------------------------------ request


def _parts(message: ChatMessage) -> list[ContentPart]:
    if message.content is None:
        return []
    if isinstance(message.content, str):
        return [ContentPart(type="text", text=message.content)]
    return message.content


def question_and_file(messages: list[ChatMessage], max_text: int) -> tuple[Optional[str], FileObject, str]:
    """The question (None: write the report), the volume's file part, and where it was (for errors).

    See the module docstring for how several messages are treated.
    """
    user = [(i, m) for i, m in enumerate(messages) if m.role == "user"]
    if not user:
        raise OpenAIError(400, "no user message: send the volume and the question in a message with role 'user'", "messages")
    found: tuple[FileObject, str] | None = None
    for i, message in user:
        for j, part in enumerate(_parts(message)):
            where = f"messages[{i}].content[{j}]"
            if part.type == "file":
                if part.file is None or not part.file.file_data:
                    detail = "file_id is not supported (this server keeps no files)" if part.file and part.file.file_id else "it has no file.file_data"
                    raise OpenAIError(400, f"{where}: {detail}; send the volume inline as file.file_data", where)
                found = (part.file, where)
            elif part.type not in ("text", "input_text"):
                raise OpenAIError(400, f"{where}: content type {part.type!r} is not supported; send the volume as a "
                                       "'file' part and the question as 'text' parts", where, "unsupported_content_type")
    if found is None:
        raise OpenAIError(400, "no volume: add a content part {\"type\": \"file\", \"file\": {\"file_data\": ..., "
                               "\"filename\": \"scan.nii.gz\"}} to a user message", "messages", "missing_file")
    last_index, last = user[-1]
    texts = [p.text or "" for p in _parts(last) if p.type in ("text", "input_text")]
    question = "\n".join(t.strip() for t in texts if t.strip()) or None
    if question is not None and len(question) > max_text:
        raise OpenAIError(400, f"the question has {len(question)} characters; the limit is {max_text}", f"messages[{last_index}]")
    return question, found[0], found[1]


def decode_file(file: FileObject, where: str, max_bytes: int) -> tuple[bytes, str, str]:
    """The volume's bytes, its type suffix and the name to show, from a `file` part."""
    data = file.file_data or ""
    media = None
    match = _DATA_URL.match(data)
    if match:
        if not match.group("b64"):
            raise OpenAIError(400, f"{where}: a data: URL must be base64 (data:<type>;base64,...)", where)
        media, data = (match.group("media") or "").lower(), data[match.end():]
    name = PurePath((file.filename or "").replace("\\", "/")).name
    suffix = upload_suffix(name) if name else _MEDIA_SUFFIXES.get(media or "", "")
    if suffix not in UPLOAD_SUFFIXES:
        shown = f"file type {suffix!r}" if suffix else "no file type (give file.filename, e.g. scan.nii.gz)"
        raise OpenAIError(400, f"{name or where}: {shown} is not accepted; send one of {', '.join(UPLOAD_SUFFIXES)} "
                               "(a DICOM series as a .zip of its slices)", where, "unsupported_file_type")
    if len(data) > max_bytes * 4 // 3 + 8:  # base64 is 4/3 the size: refuse before decoding
        raise OpenAIError(413, f"{name or where}: the volume is larger than the limit of {max_bytes / 1024**2:g} MB", where)
    try:
        raw = base64.b64decode(re.sub(r"\s+", "", data), validate=True)
    except (binascii.Error, ValueError):
        raise OpenAIError(400, f"{name or where}: file_data is not valid base64", where, "invalid_base64") from None
    if not raw:
        raise OpenAIError(400, f"{name or where}: the file is empty (0 bytes)", where)
    return raw, suffix, name or f"upload{suffix}"


# ------------------------------------------------------------------------------------------ the routes


def _strip_stream(pieces: Iterator[str]) -> Iterator[str]:
    """The pieces of a text, with its leading and trailing whitespace dropped (as the non-streamed answer is).

    Trailing whitespace of a piece is held back until more text follows, so nothing is sent that the
    stripped answer would not contain.
    """
    started, held = False, ""
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            if not piece:
                continue
            started = True
        text = held + piece
        body = text.rstrip()
        held = text[len(body):]
        if body:
            yield body


def mount_openai(app: FastAPI, predictor: Predictor, max_upload_bytes: int, max_new_tokens_limit: int,
                 default_tokens: int, max_text: int) -> None:
    """Add /v1/chat/completions and /v1/models to `app`, with OpenAI-format errors on those paths."""
    created = int(time.time())
    model_id = predictor.model_name or "med3dvlm"

    async def openai_errors(request: Request, exc: Exception) -> JSONResponse:
        return exc.response()  # type: ignore[attr-defined]

    # Errors FastAPI raises itself (a body that is not JSON, fields out of range) are OpenAI errors on /v1 and
    # whatever the app already answered elsewhere: the handlers registered before ours keep the other paths.
    previous_validation = app.exception_handlers.get(RequestValidationError, request_validation_exception_handler)
    previous_http = app.exception_handlers.get(StarletteHTTPException, http_exception_handler)

    def on_v1(request: Request) -> bool:
        return is_openai_path(request.url.path)

    async def validation_errors(request: Request, exc: RequestValidationError) -> Any:
        if not on_v1(request):
            return await previous_validation(request, exc)
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return OpenAIError(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param).response()

    async def http_errors(request: Request, exc: StarletteHTTPException) -> Any:
        if not on_v1(request) or exc.status_code >= 500:
            return await previous_http(request, exc)
        return OpenAIError(exc.status_code, str(exc.detail)).response()

    app.add_exception_handler(OpenAIError, openai_errors)
    app.add_exception_handler(RequestValidationError, validation_errors)
    app.add_exception_handler(StarletteHTTPException, http_errors)

    @app.get(PREFIX + "/models", tags=["openai"])
    def list_models() -> dict[str, Any]:
        """The model this server serves (OpenAI's model list)."""
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "med3dvlm"}]}

    def settings_of(body: ChatCompletionRequest) -> dict[str, Any]:
        if body.n != 1:
            raise OpenAIError(400, f"n={body.n}: only n=1 is supported", "n")
        tokens = body.max_completion_tokens or body.max_tokens or default_tokens
        if tokens > max_new_tokens_limit:
            param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            raise OpenAIError(400, f"{param}={tokens} is over this server's limit of {max_new_tokens_limit}", param)
        sample = body.temperature is not None and body.temperature > 0
        return {"max_new_tokens": tokens, "do_sample": sample, "temperature": body.temperature if sample else None,
                "top_p": body.top_p if sample else None, "seed": body.seed}

    def prepare(file: FileObject, where: str) -> PreparedImage:
        raw, suffix, name = decode_file(file, where, max_upload_bytes)
        with tempfile.TemporaryDirectory(prefix="med3dvlm-openai-") as folder:
            path = Path(folder) / f"upload{suffix}"  # a neutral name: the client's may identify the patient
            path.write_bytes(raw)
            try:
                return predictor.prepare(path, name=name)
            except VolumeError as err:
                logger.info("rejected an unreadable volume (%s)", type(err).__name__)
                raise OpenAIError(400, str(err), where, "unreadable_volume") from None

    def usage(question: Optional[str], text: str) -> dict[str, int]:
        processor = predictor.model.processor
        prompt = question if question is not None else processor.caption_prompt()
        prompt_tokens = len(processor.prompt_ids(prompt, caption=question is None))
        completion = len(processor.tokenizer(text, add_special_tokens=False).input_ids) if text else 0
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}

    @app.post(PREFIX + "/chat/completions", tags=["openai"], responses={**_COMPLETION_RESPONSE, **_ERRORS})
    def chat_completions(body: ChatCompletionRequest) -> Any:
        """OpenAI's chat completion over one volume: a report, or the answer to the last user question."""
        if body.model != model_id:
            raise OpenAIError(404, f"the model {body.model!r} does not exist; this server serves {model_id!r} "
                                   "(GET /v1/models)", "model", "model_not_found")
        question, file, where = question_and_file(body.messages, max_text)
        settings = settings_of(body)
        prepared = prepare(file, where)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())

        def finish(counts: dict[str, int]) -> str:
            return "length" if counts["completion_tokens"] >= settings["max_new_tokens"] else "stop"

        if not body.stream:
            text = predictor.predict(prepared, question, **settings).text
            counts = usage(question, text)
            return {
                "id": completion_id, "object": "chat.completion", "created": now, "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                             "finish_reason": finish(counts), "logprobs": None}],
                "usage": counts, "system_fingerprint": None,
                # Not in OpenAI's schema (clients keep unknown fields): what was done to the volume, e.g. the HU window.
                "preprocessing": {k: prepared.preprocessing.get(k) for k in ("steps", "warnings", "hu_window")},
            }

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict[str, Any], finish_reason: Optional[str] = None, counts: Any = None, choices: bool = True) -> str:
            data: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": now, "model": model_id,
                                    "system_fingerprint": None,
                                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
                                    if choices else []}
            if include_usage:
                data["usage"] = counts
            return f"data: {json.dumps(data)}\n\n"

        def events() -> Iterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            parts: list[str] = []
            for piece in _strip_stream(predictor.stream(prepared, question, **settings)):
                parts.append(piece)
                yield chunk({"content": piece})
            counts = usage(question, "".join(parts))
            yield chunk({}, finish(counts))
            if include_usage:
                yield chunk({}, counts=counts, choices=False)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
