"""The model card (`README.md`) written beside every saved checkpoint, as the Hugging Face hub expects.

The hub shows a repository's `README.md` as its page and reads the YAML block at its top for the
library, tags and license. We fill it from what the checkpoint itself knows: the architecture (its
config), the parameter count, how volumes must be prepared (the preprocessing spec stored in the
config, or the M3D default when none is stored), and, when the model was saved by a training run, the
run's recipe (`recipe.json`, which the trainer writes in the run folder, the parent of `model/`) and
metrics (`metrics.json` there or in the model folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .fileio import write_text_atomic

CARD_NAME = "README.md"
RECIPE_NAME = "recipe.json"
METRICS_NAME = "metrics.json"


def _read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable (a card is never worth failing a save)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _preprocess_of(model: Any) -> tuple[dict[str, Any] | None, str]:
    """The stored preprocessing spec (the model's, else its vision encoder's) and where it came from."""
    for owner, where in ((model, "config"), (getattr(model, "vision", None), "vision encoder config")):
        spec = getattr(getattr(owner, "config", None), "preprocess", None)
        if spec:
            return spec, where
    return None, ""


def _input_size(model: Any) -> Any:
    for owner in (model, getattr(model, "vision", None)):
        size = getattr(getattr(owner, "config", None), "input_size", None)
        if size is not None:
            return list(size)
    return None


def _version() -> str:
    # From the installed metadata: importing the package here would make a circle (it imports the hub).
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("med3dvlm")
    except PackageNotFoundError:
        return "(not installed)"


def _block(data: Any) -> str:
    return "```json\n" + json.dumps(data, indent=2, sort_keys=True, default=str) + "\n```"


def model_card(
    model: Any,
    recipe: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    name: str = "",
) -> str:
    """The text of the model card for `model` (any `PretrainedModel`)."""
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tags = ["med3dvlm", "medical-imaging", "3d", "ct", config.model_type]
    spec, where = _preprocess_of(model)
    lines = [
        "---",
        "library_name: med3dvlm",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
        f"# {name or type(model).__name__}",
        "",
        f"A `{type(model).__name__}` (model_type `{config.model_type}`) saved by med3dvlm {_version()}. "
        "Research use only: not a medical device.",
        "",
        "```python",
        "import med3dvlm",
        'model = med3dvlm.from_pretrained("<this folder or hub id>")',
        "```",
        "",
        "## Architecture",
        "",
        f"- parameters: {n_params:,} ({n_params / 1e6:.2f} M; {n_trainable:,} trainable when saved)",
        f"- input size (D, H, W): {_input_size(model)}",
        "",
        "The full configuration (`config.json`):",
        "",
        _block({k: v for k, v in config.to_dict().items() if k != "preprocess"}),
        "",
        "## Preprocessing",
        "",
    ]
    if spec:
        lines += [f"Volumes are prepared with this spec (stored in the {where}; `med3dvlm data inspect` shows each step):",
                  "", _block(spec)]
    else:
        lines += ["No spec is stored: med3dvlm applies the M3D default (reorient to LPS, min-max to [0, 1], "
                  "crop the foreground, resize to the input size)."]
    lines += ["", "## Training", ""]
    lines += ["The recipe of the run that produced these weights:", "", _block(recipe)] if recipe else ["Not recorded."]
    lines += ["", "## Metrics", ""]
    lines += [_block(metrics)] if metrics else ["None recorded with this checkpoint."]
    return "\n".join(lines) + "\n"


def write_model_card(
    directory: str | os.PathLike,
    model: Any,
    recipe: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write `README.md` into `directory`; recipe and metrics default to the run folder's JSON files."""
    directory = Path(directory)
    if recipe is None:
        recipe = _read_json(directory.parent / RECIPE_NAME)
    if metrics is None:
        metrics = _read_json(directory / METRICS_NAME) or _read_json(directory.parent / METRICS_NAME)
    text = model_card(model, recipe=recipe, metrics=metrics, name=directory.resolve().name)
    return write_text_atomic(directory / CARD_NAME, text)
