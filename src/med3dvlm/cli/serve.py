"""`med3dvlm serve` (REST API with FastAPI) and `med3dvlm app` (the gradio web app); localhost by default."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .data import read_limits
from .root import fail, root


SERVER_VOXELS_HELP = "Refuse uploads whose header claims more voxels (checked before reading; default 512*512*1024)."
SERVER_UNPACKED_HELP = "Refuse compressed uploads and zips that unpack to more MB (default 1024)."
READS_HELP = "Uploads read at once; each may hold a volume up to the limits, so this bounds memory."
BATCH_HELP = ("Greedy requests to /report, /vqa and /v1/chat/completions arriving together are generated in one call, "
              "up to this many; each answer is the one it gets alone. 1: one call per request.")
WINDOW_HELP = "How long the first of several concurrent requests waits for others before its batch starts."
MAX_WAIT_HELP = "How long, in all, it waits for requests whose uploads are still being read."


def _load(model: str, index: Optional[Path], max_new_tokens: int, device: Optional[str], max_voxels: Optional[int] = None,
          max_unpacked_mb: Optional[float] = None, max_reads: int = 2, strict: bool = False, max_batch: int = 1,
          batch_window_ms: float = 10.0, batch_max_wait_ms: float = 500.0):
    from ..data.limits import SERVER_LIMITS
    from ..inference import Predictor, prediction_settings
    from ..search import SearchIndexError

    limits = read_limits(max_voxels, max_unpacked_mb, base=SERVER_LIMITS)  # a server reads for many: lower limits
    try:
        return Predictor.from_dir(model, index_dir=index, settings=prediction_settings(max_new_tokens=max_new_tokens), device=device,
                                  limits=limits, strict=strict, max_concurrent_reads=max_reads, max_batch=max_batch,
                                  batch_window_ms=batch_window_ms, batch_max_wait_ms=batch_max_wait_ms)
    except (FileNotFoundError, SearchIndexError, TypeError, ValueError, OSError) as err:
        fail(str(err))


def _warn_if_public(host: str) -> None:
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}, reachable from other machines; this is a research tool, "
                   "not a medical device, and it has no authentication", err=True)


@root.command()
def serve(
    model: str = typer.Option(..., "--model", "-m", help="A saved VLM folder or a Hugging Face hub id (owner/name)."),
    index: Optional[Path] = typer.Option(None, "--index", help="A case index (`med3dvlm index build`) for /embed and /search."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; the default accepts local connections only."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    max_upload_mb: float = typer.Option(512, "--max-upload-mb", min=1, help="Larger requests get 413."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Default answer length."),
    device: Optional[str] = typer.Option(None, "--device"),
    max_voxels: Optional[int] = typer.Option(None, "--max-voxels", min=8, help=SERVER_VOXELS_HELP),
    max_unpacked_mb: Optional[float] = typer.Option(None, "--max-unpacked-mb", min=1, help=SERVER_UNPACKED_HELP),
    max_reads: int = typer.Option(2, "--max-concurrent-reads", min=1, help=READS_HELP),
    strict: bool = typer.Option(False, "--strict", help="Refuse uploads with uneven slice gaps or an assumed spacing."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help=BATCH_HELP),
    batch_window_ms: float = typer.Option(10.0, "--batch-window-ms", min=0, help=WINDOW_HELP),
    batch_max_wait_ms: float = typer.Option(500.0, "--batch-max-wait-ms", min=0, help=MAX_WAIT_HELP),
) -> None:
    """Serve /report, /vqa, /embed and /search over HTTP (OpenAPI schema at /openapi.json)."""
    import uvicorn

    from ..api import create_app

    predictor = _load(model, index, max_new_tokens, device, max_voxels, max_unpacked_mb, max_reads, strict, max_batch,
                      batch_window_ms, batch_max_wait_ms)
    _warn_if_public(host)
    # No access log: request lines are harmless, but keeping logs to what we write ourselves is simpler to audit.
    uvicorn.run(create_app(predictor, max_upload_mb=max_upload_mb, limits=predictor.limits), host=host, port=port, access_log=False)


@root.command("app")
def web_app(
    model: str = typer.Option(..., "--model", "-m", help="A saved VLM folder or a Hugging Face hub id (owner/name)."),
    index: Optional[Path] = typer.Option(None, "--index", help="A case index for similar cases."),
    examples: Optional[Path] = typer.Option(None, "--examples", help="A folder of example scans; default: generated phantoms."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; the default accepts local connections only."),
    port: int = typer.Option(7860, "--port", min=1, max=65535),
    max_upload_mb: float = typer.Option(512, "--max-upload-mb", min=1),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    device: Optional[str] = typer.Option(None, "--device"),
    max_voxels: Optional[int] = typer.Option(None, "--max-voxels", min=8, help=SERVER_VOXELS_HELP),
    max_unpacked_mb: Optional[float] = typer.Option(None, "--max-unpacked-mb", min=1, help=SERVER_UNPACKED_HELP),
    max_reads: int = typer.Option(2, "--max-concurrent-reads", min=1, help=READS_HELP),
    strict: bool = typer.Option(False, "--strict", help="Refuse uploads with uneven slice gaps or an assumed spacing."),
) -> None:
    """The web app: upload or pick a scan, browse its slices, generate a report, chat about it."""
    from ..app import launch

    predictor = _load(model, index, max_new_tokens, device, max_voxels, max_unpacked_mb, max_reads, strict)
    _warn_if_public(host)
    typer.echo(f"starting the web app on http://{host}:{port}/ (Ctrl+C to stop)", err=True)
    launch(predictor, host=host, port=port, max_upload_mb=max_upload_mb, examples=examples)
