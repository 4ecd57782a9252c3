"""The `med3dvlm` command line: one Typer app whose subcommands are thin wrappers over library functions."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import typer

app = typer.Typer(
    name="med3dvlm",
    help="3D medical vision-language models: encoders, training, evaluation and inference for CT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Each module adds its own commands; keep imports light so `med3dvlm --help` stays fast.
    from . import convert, data, eval, eval_generation, info, predict, quickstart, search, serve, train, vlm  # noqa: F401


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script passes it to sys.exit)."""
    _register()
    try:
        app(args=list(argv) if argv is not None else None, prog_name="med3dvlm")
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
