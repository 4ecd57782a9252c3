"""Where med3dvlm keeps what it derives from installed packages: one cache folder for the whole library.

The embedded LLM converted from its GGUF wheel and the nltk data for METEOR live under it, so one
environment variable, `MED3DVLM_CACHE`, moves them all (default ~/.cache/med3dvlm).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The library's cache folder: `$MED3DVLM_CACHE`, else ~/.cache/med3dvlm."""
    return Path(os.environ.get("MED3DVLM_CACHE", Path.home() / ".cache" / "med3dvlm"))
