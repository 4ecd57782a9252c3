"""`med3dvlm serve` (REST API with FastAPI) and `med3dvlm app` (the gradio web app); localhost by default."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .root import fail, root


def _load(model: str, index: Optional[Path], max_new_tokens: int, device: Optional[str]):
    from ..inference import Predictor, prediction_settings
    from ..search import SearchIndexError

    try:
        return Predictor.from_dir(model, index_dir=index, settings=prediction_settings(max_new_tokens=max_new_tokens), device=device)
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
) -> None:
    """Serve /report, /vqa, /embed and /search over HTTP (OpenAPI schema at /openapi.json)."""
    import uvicorn

    from ..api import create_app

    predictor = _load(model, index, max_new_tokens, device)
    _warn_if_public(host)
    # No access log: request lines are harmless, but keeping logs to what we write ourselves is simpler to audit.
    uvicorn.run(create_app(predictor, max_upload_mb=max_upload_mb), host=host, port=port, access_log=False)


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
) -> None:
    """The web app: upload or pick a scan, browse its slices, generate a report, chat about it."""
    from ..app import launch

    predictor = _load(model, index, max_new_tokens, device)
    _warn_if_public(host)
    typer.echo(f"starting the web app on http://{host}:{port}/ (Ctrl+C to stop)", err=True)
    launch(predictor, host=host, port=port, max_upload_mb=max_upload_mb, examples=examples)
