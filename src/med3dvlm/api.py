"""The REST API (`med3dvlm serve`): reports, VQA, embeddings and case search over HTTP, with FastAPI.

Every endpoint takes one multipart upload: a volume file (NIfTI, NRRD, MHA, .npy, a multi-frame DICOM)
or a zip of a DICOM series. Responses are JSON and documented in the OpenAPI schema (`/openapi.json`).
Errors are 4xx with a `detail` that says what to fix: 413 for a body over the upload limit (with or
without Content-Length) or a volume over the read limits, 415 for a file type the API cannot read, 422
for missing or out-of-range fields, 400 when the file itself is unreadable (naming it and the reason),
503 for /embed and /search when no case index is loaded. Every error body has the same JSON shape,
`ErrorOut`: {"detail": str, "code": str, "status": int, "errors": list | null}; details never show a
server path. The OpenAI-compatible /v1 routes (`med3dvlm.openai_api`) answer in OpenAI's error JSON instead,
the body-limit 413 included.

Uploads are stored under a neutral temporary name and deleted after the request; logs carry shapes
and timings, never file names or DICOM fields, which can identify patients. Reads are bounded by
`ReadLimits` (the lower `SERVER_LIMITS` by default) and by the predictor's read semaphore.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import traceback
from pathlib import Path, PurePath
from typing import Any, Optional

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .data.limits import SERVER_LIMITS, ReadLimits
from .data.volume import VolumeError, VolumeTooLarge
from .inference import Predictor
from .openai_api import is_openai_path, mount_openai, too_large
from .uploads import UPLOAD_SUFFIXES, scrub_paths, upload_suffix

logger = logging.getLogger(__name__)

MAX_TEXT = 2000  # characters in a question or a search text


class ErrorOut(BaseModel):
    """The one shape of every error body, whatever the status."""

    detail: str = Field(description="What went wrong and what to change.")
    code: str = Field(description="A stable machine-readable name of the error (see ERROR_CODES).")
    status: int = Field(description="The HTTP status, repeated.")
    errors: Optional[list[dict[str, Any]]] = Field(None, description="For 422: each invalid field (loc, msg); else null.")


ERROR_CODES = {
    400: "unreadable_input", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
    415: "unsupported_type", 422: "invalid_request", 500: "internal_error", 503: "no_index",
}


def error_response(status: int, detail: str, errors: Optional[list[dict[str, Any]]] = None) -> JSONResponse:
    """An `ErrorOut` body; the detail has any server path replaced by "<path>"."""
    body = ErrorOut(detail=scrub_paths(detail), code=ERROR_CODES.get(status, f"http_{status}"), status=status, errors=errors)
    return JSONResponse(body.model_dump(), status_code=status)


class PredictionOut(BaseModel):
    source: str = Field(description="The uploaded file's name.")
    task: str = Field(description='"report" or "vqa".')
    question: Optional[str]
    text: str = Field(description="The generated report or answer.")
    preprocessing: dict[str, Any] = Field(description="What was read and every preprocessing step applied.")
    generation: dict[str, Any] = Field(description="The decoding settings used.")
    timings: dict[str, float] = Field(description="Seconds spent reading and generating.")
    model: str


class EmbeddingOut(BaseModel):
    embedding: list[float] = Field(description="Unit-norm image embedding of the contrastive model.")
    dim: int
    model: str


class HitOut(BaseModel):
    rank: int
    score: float = Field(description="Cosine similarity.")
    id: str
    image: str
    case: str
    report: Optional[str]


class SearchOut(BaseModel):
    query: str = Field(description='"image" or "text".')
    hits: list[HitOut]


class HealthOut(BaseModel):
    status: str
    version: str
    model: str
    input_size: list[int]
    index_items: Optional[int] = Field(description="Cases in the loaded index; null when none is loaded.")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "The file cannot be read as a volume (the detail names the file and the reason).",
        413: "The request body is larger than the upload limit, or the volume larger than the read limits.",
        415: "The file type is not one the API reads.",
        422: "A field is missing or out of range (`errors` lists them).",
        503: "No case index is loaded on this server.",
    }
    return {code: {"model": ErrorOut, "description": text[code]} for code in (*codes, 422)}


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware answering 413 for bodies over `max_bytes`, before they are stored anywhere.

    Content-Length is checked first; a chunked body without it (or one longer than it says) is
    counted as it arrives. The app's own answer to a body cut short (FastAPI turns any failure while
    parsing a form into a 400) is dropped, and the 413 sent in its place.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        seen = 0
        over = False
        started = False

        async def counted_receive() -> dict:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    raise _TooLarge
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if over and not started:
                return  # the app's answer to a body we cut short; the 413 below replaces it
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not over or started:
                raise
        if over and not started:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: dict, receive: Any, send: Any) -> None:
        if is_openai_path(scope.get("path", "")):  # OpenAI clients parse {"error": {...}}, like every other /v1 error
            response = too_large(self.max_bytes).response()
        else:
            response = error_response(413, f"the upload is larger than the limit of {self.max_bytes / 1024**2:g} MB")
        await response(scope, receive, send)


BATCHED_PATHS = frozenset({"/report", "/vqa", "/v1/chat/completions"})


class BatchArrivals:
    """ASGI middleware: a request to a batched endpoint counts as arriving from its first byte (see
    `batching.MicroBatcher.arriving`), so a batch being gathered waits while uploads sent with it are still
    received, parsed and read; on a busy CPU those finish tens of milliseconds apart."""

    def __init__(self, app: Any, predictor: Predictor) -> None:
        self.app, self.predictor = app, predictor

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        batcher = self.predictor.batcher
        if batcher is None or scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in BATCHED_PATHS:
            await self.app(scope, receive, send)
            return
        with batcher.arriving():
            await self.app(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Every error as an `ErrorOut` body: HTTP errors, invalid fields, unreadable volumes, and the unexpected.

    Validation errors keep each field's location and message but not its input, which for a file
    field would echo the upload. An unexpected exception is a 500 whose log line carries its type and
    where it was raised, not its message (messages can quote paths and file contents).
    """

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]
        summary = "; ".join(f"{'.'.join(e['loc'][1:]) or 'request'}: {e['msg']}" for e in errors[:5])
        return error_response(422, f"invalid request: {summary}", errors)

    @app.exception_handler(VolumeError)
    async def _volume(request: Request, exc: VolumeError) -> JSONResponse:
        return error_response(413 if isinstance(exc, VolumeTooLarge) else 400, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f"{Path(frame.filename).name}:{frame.lineno}" if frame else "?"
        logger.error("internal error in %s %s: %s at %s", request.method, request.url.path, type(exc).__name__, where)
        return error_response(500, f"internal error ({type(exc).__name__}); the server log has where it happened")


def create_app(
    predictor: Predictor,
    max_upload_mb: float = 512,
    max_new_tokens_limit: int = 1024,
    limits: ReadLimits = SERVER_LIMITS,
) -> FastAPI:
    """A FastAPI app serving `predictor`; uploads over `max_upload_mb` are refused with 413.

    `limits` bound each read (the claimed voxel count and unpacked size, see `ReadLimits`); the default
    is lower than the library's, since a server reads for many clients.
    """
    max_bytes = int(max_upload_mb * 1024**2)
    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from the package, not from a CDN.
    app = FastAPIOffline(
        title="med3dvlm",
        version=__version__,
        description="Report generation, visual question answering, embeddings and similar-case search for 3D CT. "
        "Upload a NIfTI/NRRD/MHA/.npy/multi-frame DICOM file or a zip of a DICOM series. Research use only.",
    )
    app.add_middleware(BodyLimit, max_bytes=max_bytes)
    app.add_middleware(BatchArrivals, predictor=predictor)
    install_error_handlers(app)
    default_tokens = min(predictor.settings.max_new_tokens, max_new_tokens_limit)

    def stored(upload: UploadFile, folder: str) -> tuple[Path, str]:
        """The upload saved under a neutral name in `folder`, and its original base name for messages."""
        name = PurePath((upload.filename or "").replace("\\", "/")).name
        suffix = upload_suffix(name)
        if suffix not in UPLOAD_SUFFIXES:
            shown = f"file type {suffix!r}" if suffix else "a file without a type suffix"
            raise HTTPException(415, f"{name or 'upload'}: {shown} is not accepted; send one of {', '.join(UPLOAD_SUFFIXES)} "
                                     "(a DICOM series as a .zip of its slices)")
        path = Path(folder) / f"upload{suffix}"
        with open(path, "wb") as out:
            shutil.copyfileobj(upload.file, out, 1 << 20)
        if path.stat().st_size == 0:
            raise HTTPException(400, f"{name}: the file is empty (0 bytes)")
        return path, name

    def with_upload(upload: UploadFile, action: Any) -> Any:
        """`action(path, name)` on the stored upload; unreadable volumes become 400, oversized ones 413."""
        with tempfile.TemporaryDirectory(prefix="med3dvlm-api-") as folder:
            path, name = stored(upload, folder)
            try:
                return action(path, name)
            except VolumeError as err:
                logger.info("rejected an unreadable upload (%s)", type(err).__name__)
                status = 413 if isinstance(err, VolumeTooLarge) else 400
                raise HTTPException(status, scrub_paths(str(err), {folder: "", str(path): name})) from None

    def generate(upload: UploadFile, question: Optional[str], settings: dict[str, Any], series_uid: Optional[str]) -> PredictionOut:
        prepared = with_upload(upload, lambda path, name: predictor.prepare(path, series_uid=series_uid, name=name, limits=limits))
        return PredictionOut(**predictor.predict(prepared, question, **settings).to_dict())

    @app.get("/health", response_model=HealthOut)
    def health() -> HealthOut:
        """What this server has loaded."""
        info = predictor.describe()
        return HealthOut(status="ok", version=__version__, model=info["model"], input_size=info["input_size"],
                         index_items=info["index"]["items"] if info["index"] else None)

    @app.post("/report", response_model=PredictionOut, responses=_errors(400, 413, 415))
    def report(
        file: UploadFile = File(..., description="The scan: .nii/.nii.gz/.nrrd/.mha/.npy/.dcm, or a .zip of a DICOM series."),
        max_new_tokens: int = Form(default_tokens, ge=1, le=max_new_tokens_limit),
        do_sample: bool = Form(False, description="Sample (top-p) instead of greedy decoding."),
        seed: Optional[int] = Form(None, ge=0, le=2**31 - 1),
        series_uid: Optional[str] = Form(None, max_length=128, description="Which series, when a zip holds several."),
    ) -> PredictionOut:
        """Write the findings report for a scan."""
        return generate(file, None, {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "seed": seed}, series_uid)

    @app.post("/vqa", response_model=PredictionOut, responses=_errors(400, 413, 415))
    def vqa(
        file: UploadFile = File(..., description="The scan, as for /report."),
        question: str = Form(..., min_length=1, max_length=MAX_TEXT),
        max_new_tokens: int = Form(default_tokens, ge=1, le=max_new_tokens_limit),
        do_sample: bool = Form(False),
        seed: Optional[int] = Form(None, ge=0, le=2**31 - 1),
        series_uid: Optional[str] = Form(None, max_length=128),
    ) -> PredictionOut:
        """Answer a question about a scan."""
        if not question.strip():
            raise HTTPException(400, "the question is blank")
        return generate(file, question, {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "seed": seed}, series_uid)

    def require_index() -> None:
        if not predictor.has_index:
            raise HTTPException(503, "no case index is loaded; start the server with --index DIR "
                                     "(built by `med3dvlm index build`) to use /embed and /search")

    @app.post("/embed", response_model=EmbeddingOut, responses=_errors(400, 413, 415, 503))
    def embed(file: UploadFile = File(..., description="The scan, as for /report.")) -> EmbeddingOut:
        """The contrastive image embedding of a scan (the index's model)."""
        require_index()
        vector = with_upload(file, lambda path, name: predictor.embed_image(path, name=name, limits=limits))
        return EmbeddingOut(embedding=vector, dim=len(vector), model=Path(predictor.index.meta["model_dir"]).name)

    @app.post("/search", response_model=SearchOut, responses=_errors(400, 413, 415, 503))
    def search(
        file: Optional[UploadFile] = File(None, description="Search with this scan ..."),
        text: Optional[str] = Form(None, min_length=1, max_length=MAX_TEXT, description="... or with this text."),
        k: int = Form(5, ge=1, le=100),
    ) -> SearchOut:
        """The k most similar cases of the index to a scan or a text (exactly one of them)."""
        require_index()
        if (file is None) == (text is None):
            raise HTTPException(400, "give exactly one of a file or a text to search with")
        if file is not None:
            hits = with_upload(file, lambda path, name: predictor.search(path=path, k=k, name=name, limits=limits))
            return SearchOut(query="image", hits=[HitOut(**h) for h in hits])
        try:
            hits = predictor.search(text=text, k=k)
        except ValueError as err:  # e.g. the index's model was saved without a tokenizer
            raise HTTPException(400, str(err)) from None
        return SearchOut(query="text", hits=[HitOut(**h) for h in hits])

    mount_openai(app, predictor, max_bytes, max_new_tokens_limit, default_tokens, MAX_TEXT)  # /v1: see openai_api
    return app

