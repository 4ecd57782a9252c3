"""`med3dvlm serve` (REST API) and `med3dvlm app` (web app)."""
from __future__ import annotations

from . import app  # noqa: F401
