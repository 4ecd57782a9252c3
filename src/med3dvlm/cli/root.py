"""The root of the `med3dvlm` command line: the Typer object every subcommand module adds itself to, and `fail`.

It imports no subcommand, so those modules can import it without a circle; `med3dvlm.cli.main` imports
them all before it runs.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from collections.abc import Iterator
from typing import NoReturn

import typer

root = typer.Typer(
    name="med3dvlm",
    help="3D medical vision-language models: encoders, training, evaluation and inference for CT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Set by the root callback on every run; `fail` reads it (the logging level cannot tell: under a test
# runner or after a first run, `logging.basicConfig` leaves the level as it was).
_verbose = False


@root.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    global _verbose
    _verbose = verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def error_message(err: BaseException) -> str:
    """The message of `err` as a user should read it: its first argument (a KeyError's without quotes)."""
    return str(err.args[0] if err.args else err)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` and exit with `code`.

    Under `-v` the traceback of the exception being handled (if any) follows, so a developer sees where
    an error that the command reports in one line really came from.
    """
    typer.echo(f"error: {message}", err=True)
    if _verbose and sys.exc_info()[0] is not None:
        typer.echo(traceback.format_exc().rstrip(), err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send whatever runs inside to stderr when it writes to stdout, so stdout keeps only the command's JSON.

    Libraries imported while training print there: DeepSpeed's logger, for one, holds a stdout handler and
    announces its accelerator when it is first imported. Loggers and handlers created inside keep stderr.
    """
    with contextlib.redirect_stdout(sys.stderr):
        yield
