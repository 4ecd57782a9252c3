"""Atomic file writes: a reader never sees a half-written file under the final name.

Every writer in the library (checkpoints, configs, dataset JSON, indexes, evaluation summaries, cached
assets) goes through `write_atomic`, which writes beside the target and renames.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it to `path`.

    The rename is atomic on one file system, so an interrupted write never leaves a torn file where a
    reader (a resumed run, a loader) would take it for a complete one. The temporary file is removed
    when `write` fails.
    """
    path = Path(path)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False) as handle:
        tmp = Path(handle.name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (see `write_atomic`)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 2, default: Callable[[Any], Any] | None = None) -> Path:
    """Write `data` as JSON (and a final newline) to `path` atomically (see `write_atomic`)."""
    return write_text_atomic(path, json.dumps(data, indent=indent, default=default) + "\n")
