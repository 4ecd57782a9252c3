"""Checkpoints as `config.json` + `model.safetensors`, the layout of the Hugging Face hub.

`PretrainedModel` gives any registered model `save_pretrained(dir)` and `from_pretrained(dir)`.
The module-level `from_pretrained` reads `config.json` first and dispatches on its `model_type`,
so a directory is enough to rebuild whatever model it holds (like `AutoModel`).

`resolve_model_dir` turns a Hugging Face repo id (`owner/name`) into a local snapshot through
`huggingface_hub`, downloading only what the checkpoint's layout needs; every loader calls it first, so
a local folder and a hub id are accepted everywhere. Every save also writes a model card (`README.md`,
see `med3dvlm.modelcard`).

This module knows our format only. Released checkpoints in other layouts are read by `med3dvlm.convert`
and `med3dvlm.loading.from_pretrained` (what `med3dvlm.from_pretrained` is) chooses between the two, so
the models, which import this module, never reach the converters.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from safetensors.torch import load_model, save_model
from torch import nn

from .config import ModelConfig
from .fileio import write_atomic, write_json_atomic  # noqa: F401  (write_json_atomic: used by the models)
from .modelcard import CARD_NAME, write_model_card

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# `model_type`s of released layouts that `med3dvlm.convert` reads: the original Med3DVLM with Qwen2.5
# (MagicXin/Med3DVLM-Qwen-2.5-7B) and its stage-1 DCFormer-SigLIP (MagicXin/DCFormer_SigLIP, class DEC_CLIP).
RELEASED_MODEL_TYPES = ("vlm_qwen", "dec_clip")

P = TypeVar("P", bound="PretrainedModel")

# How deep we are in nested saves: a VLM saves its vision encoder and projector into sub-folders through
# their own save_pretrained, and only the outermost save should write the model card.
_SAVE_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("med3dvlm_save_depth", default=0)


def _with_model_card(save: Callable[..., Path]) -> Callable[..., Path]:
    @functools.wraps(save)
    def wrapper(self: nn.Module, directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
        token = _SAVE_DEPTH.set(_SAVE_DEPTH.get() + 1)
        try:
            path = save(self, directory, *args, **kwargs)
        finally:
            _SAVE_DEPTH.reset(token)
        if _SAVE_DEPTH.get() == 0:
            write_model_card(path if path is not None else directory, self)
        return path

    wrapper._writes_model_card = True  # type: ignore[attr-defined]
    return wrapper


class PretrainedModel(nn.Module):
    """Base class of every model built from a `ModelConfig`."""

    config_class: ClassVar[type[ModelConfig]] = ModelConfig

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Subclasses that save their own way (the VLM's sub-folders, the contrastive model's tokenizer) get
        # the model card too, without each having to remember to write it.
        super().__init_subclass__(**kwargs)
        save = cls.__dict__.get("save_pretrained")
        if save is not None and not getattr(save, "_writes_model_card", False):
            cls.save_pretrained = _with_model_card(save)  # type: ignore[method-assign]

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `config.json` and `model.safetensors` into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(directory / CONFIG_NAME, self.config.to_dict())
        # Write beside the target then rename, so an interrupted save never leaves a torn file.
        write_atomic(directory / WEIGHTS_NAME, lambda tmp: save_model(self, str(tmp)))
        return directory

    save_pretrained = _with_model_card(save_pretrained)

    @classmethod
    def from_pretrained(
        cls: type[P],
        name_or_path: str | os.PathLike,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **overrides: Any,
    ) -> P:
        """Rebuild a model from a folder written by `save_pretrained`, or a hub repo id of one.

        Keyword overrides change config fields that do not affect the weights' shapes.
        """
        directory = resolve_model_dir(name_or_path, revision, cache_dir, local_files_only, token)
        model = from_pretrained(directory, **overrides)
        if not isinstance(model, cls):
            raise TypeError(f"{directory} holds a {type(model).__name__}, not a {cls.__name__}")
        return model


def read_config(directory: str | os.PathLike) -> ModelConfig:
    from .registry import config_class_for

    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; is {directory} a med3dvlm checkpoint directory?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if "model_type" not in data:
        raise ValueError(f"{path}: has no 'model_type' key")
    return config_class_for(data["model_type"]).from_dict(data)


def from_pretrained(directory: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Load whatever model in our format `directory` holds, dispatching on `model_type` in its config."""
    from .registry import build_from_config, model_class_for

    if peek_model_type(directory) in RELEASED_MODEL_TYPES:
        raise ValueError(
            f"{directory}: a released checkpoint (model_type {peek_model_type(directory)!r}), not med3dvlm's format; "
            "load it with med3dvlm.from_pretrained"
        )
    config = read_config(directory)
    if overrides:
        config = config.replace(**overrides)
    model_class = model_class_for(config.model_type)
    if hasattr(model_class, "load_directory"):  # composite models (the VLM) keep their parts in sub-folders
        return model_class.load_directory(directory, config)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing weights file")
    model = build_from_config(config)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{weights}: weights do not match the config in {CONFIG_NAME}: {str(err)[:500]}") from None
    if missing or unexpected:
        raise ValueError(
            f"{weights}: weights do not match the config: missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    model.eval()
    return model


def peek_model_type(directory: str | os.PathLike) -> str | None:
    """`model_type` in `directory/config.json`, or None when it cannot be read (`read_config` says why)."""
    path = Path(directory) / CONFIG_NAME
    try:
        return json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # read_config reports the problem properly


# ------------------------------------------------------------------------------------ hub repo ids

# `owner/name` as the hub spells repo ids (letters, digits, "-", "_", "."); anything else is a path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Everything a layout reads besides weights: configs, safetensors indexes, tokenizer files, the card.
# (fnmatch's "*" also matches "/", so these reach the VLM's vision/, projector/ and llm/ sub-folders.)
_META_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", CARD_NAME]
_SAFETENSORS_PATTERNS = ["*.safetensors"]
# Pickled weights, only for a released repo without safetensors. The original repos also hold copies of
# parts of the model (vision_tower.bin, mm_projector.bin, pretrained_ViT.bin) that loading never reads.
_PICKLE_PATTERNS = ["pytorch_model*.bin"]


def is_repo_id(name_or_path: str | os.PathLike) -> bool:
    """True when `name_or_path` is not an existing path and reads as a hub id `owner/name`."""
    text = os.fspath(name_or_path)
    return not Path(text).exists() and bool(_REPO_ID.match(text))


def resolve_model_dir(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """A local checkpoint folder for `name_or_path`: the folder itself, or a hub snapshot of a repo id.

    For a repo id, `config.json` is fetched first and the rest by layout: configs, tokenizer files and
    safetensors weights, plus `pytorch_model*.bin` only for a released repo that has no safetensors.
    Offline (`HF_HUB_OFFLINE=1` or `local_files_only`), the cached snapshot is used.

    Raises:
        FileNotFoundError: a path that does not exist, a repo that does not exist, or a repo that is not
            cached while downloads are off; the message names it and says what to do.
        OSError: the hub could not be reached or refused the request.
    """
    if not is_repo_id(name_or_path):
        path = Path(name_or_path)
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: no such folder (a hub model is named owner/name, e.g. MagicXin/Med3DVLM-Qwen-2.5-7B)"
            )
        return path
    repo_id = os.fspath(name_or_path)
    common: dict[str, Any] = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                  token=token, library_name="med3dvlm")
    folder = _snapshot(repo_id, [CONFIG_NAME, *_META_PATTERNS], common)
    model_type = peek_model_type(folder)
    if model_type is None:
        raise FileNotFoundError(f"{repo_id}: the repository has no readable {CONFIG_NAME}, so it is not a model med3dvlm loads")
    folder = _snapshot(repo_id, _SAFETENSORS_PATTERNS, common)
    if model_type in RELEASED_MODEL_TYPES and not any(folder.glob("*.safetensors")):
        folder = _snapshot(repo_id, _PICKLE_PATTERNS, common)
    logger.info("%s (model_type %s) resolved to %s", repo_id, model_type, folder)
    return folder


def _snapshot(repo_id: str, patterns: list[str], common: dict[str, Any]) -> Path:
    """`snapshot_download` of `patterns`, with its errors turned into ones that say what to do."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {common['revision']!r}" if common["revision"] else ""
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, **common))
    except LocalEntryNotFoundError:
        offline = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "local_files_only=True"
        cache = common["cache_dir"] or constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"{repo_id}{at}: no local folder of that name, not in the Hugging Face cache ({cache}) and downloads are off ({offline}). "
            f"Download it once where the hub is reachable (`hf download {repo_id}`, or load it without "
            f"{offline}), point HF_HUB_CACHE (or cache_dir) at a cache that holds it, or pass a local folder."
        ) from None
    except GatedRepoError:
        raise OSError(f"{repo_id}: a gated repository; accept its terms on the hub and pass token= "
                      "(or log in with `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{repo_id}: no local folder of that name and no such model repository on the hub "
                                "(a private one needs token= or `hf auth login`)") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{repo_id}: no revision {common['revision']!r}") from None
    except (HfHubHTTPError, ConnectionError) as err:
        raise OSError(f"{repo_id}{at}: the hub could not be reached ({err}); set HF_HUB_OFFLINE=1 to use the "
                      "local cache") from None
