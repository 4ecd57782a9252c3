"""The `med3dvlm` command line: one Typer app whose subcommands are thin wrappers over library functions.

This is the top layer: it may import any library module, and no library module imports it.
"""

from __future__ import annotations

from collections.abc import Sequence

from .root import fail, root

__all__ = ["fail", "main", "root"]


def _register() -> None:
    # Each module adds its own commands; keep imports light so `med3dvlm --help` stays fast.
    from . import convert, data, eval, eval_generation, info, predict, quickstart, search, serve, train  # noqa: F401
    from . import merge_lora  # noqa: F401  (last, so `--help` lists the commands in their usual order)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script passes it to sys.exit)."""
    _register()
    try:
        root(args=list(argv) if argv is not None else None, prog_name="med3dvlm")
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
