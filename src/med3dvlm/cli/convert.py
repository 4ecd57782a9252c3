"""`med3dvlm convert`: turn released original checkpoints into med3dvlm checkpoints."""

from __future__ import annotations

from . import app  # noqa: F401
