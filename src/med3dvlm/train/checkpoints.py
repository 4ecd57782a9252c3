"""The checkpoint store of the training loop: where checkpoints live and how to find the complete ones.

Checkpoints are ``<output_dir>/checkpoints/step-XXXXXXXX`` holding `Accelerator.save_state` plus
``trainer_state.json``. They are written into a hidden ``.tmp-step-*`` folder renamed into place when
complete, so only folders with a state file and the final name count as checkpoints here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"
_CKPT_RE = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at optimizer step `step`."""
    return f"step-{step:08d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `output_dir/checkpoints`, oldest first (temporary folders are ignored)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CKPT_RE.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(_CKPT_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def read_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; {checkpoint} is not a complete trainer checkpoint") from None


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where the platform cannot."""
    # Make the rename (and the files inside) durable before older checkpoints are deleted.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
