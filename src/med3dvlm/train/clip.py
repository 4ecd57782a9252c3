"""Stage 1: contrastive image-report pre-training of DCFormer + a BERT text tower (DCFormer-SigLIP).

Recipe (reference-facts §2): every parameter trained (vision encoder, text encoder, both projections,
t' and b), SigLIP loss, AdamW lr 1e-4, weight decay 0.1, 3% warmup then cosine, per-device batch 64,
100 epochs, bf16, DeepSpeed ZeRO-2; `configs/clip_paper.yaml` holds it and `configs/clip_cpu.yaml` a small
CPU version on the phantom dataset. Run it with

    med3dvlm train clip --config configs/clip_cpu.yaml [--resume] [--set train.lr=3e-4 ...]
    accelerate launch --num_processes 8 $(which med3dvlm) train clip --config configs/clip_paper.yaml

Outputs under ``train.output_dir``: ``checkpoints/`` (resumable), ``model/`` (the whole Contrastive3D with
its tokenizer, `med3dvlm.from_pretrained` loads it), ``vision/`` (the DCFormer encoder alone, the
starting point of stage 2, like the original's ``pretrained_ViT.bin``), ``logs/`` (TensorBoard),
``metrics.jsonl`` and, when the recipe has an ``eval`` split, ``eval/`` (retrieval recall@K).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.collate import ImageTextCollate, TokenCounter
from .config import Recipe, to_plain
from .loop import TrainConfig, Trainer
from .sampling import sample_indices, seed_everything

logger = logging.getLogger(__name__)

@dataclass
class ClipModelSection:
    name: str = "clip_dcformer_small_minilm"  # a registered contrastive model (`med3dvlm info`)
    overrides: dict[str, Any] = field(default_factory=dict)  # ContrastiveConfig fields, e.g. vision_overrides
    text_overrides: dict[str, Any] = field(default_factory=dict)  # merged into the text tower's HF config dict
    init_from: str | None = None  # a saved Contrastive3D folder to start from instead of `name`
    tokenizer: str | None = None  # tokenizer folder; default: the text weights' folder, else MiniLM's
    # The text tower's learning rate relative to train.lr (pretrained text: < 1). 0 freezes it (LiT's locked
    # tower, on the text side): its outputs are then computed once per distinct report and the step is ~4x
    # cheaper, as the text tower is three quarters of a stage-1 step on a CPU.
    text_lr_scale: float = 1.0


@dataclass
class ClipDataSection:
    cap_json: str = "data/M3D_Cap/M3D_Cap.json"
    root: str | None = None  # folder item paths are relative to; default: found from cap_json
    split: str = "train"
    image_size: tuple[int, int, int] | None = None  # (D, H, W); default: the model's input_size
    augment: bool = True  # the paper's MONAI augmentations and random report truncation
    on_error: str = "raise"  # or "skip" unreadable items (logged and counted)
    limit: int | None = None  # a seeded random sample of N items (smoke runs)
    # The display window the (8-bit) training images were made with, a preset or {level, width}: stored in the
    # saved model's preprocessing, so raw HU scans are windowed alike at inference. null: not known.
    hu_window: str | dict[str, float] | None = None


@dataclass
class ClipLossSection:
    dist_impl: str = "gather"  # "gather" or "ring" (SigLIP only)
    chunk_size: int = 0  # SigLIP logits rows at a time (memory bound); 0 = all
    symmetric_logits: bool = False  # the original code's (L + L^T)/2 variant


@dataclass
class ClipEvalSection:
    split: str | None = "test"  # retrieval evaluation after training; null to skip
    cap_json: str | None = None  # the M3D_Cap.json to evaluate on; default: data.cap_json
    sizes: tuple[int, ...] = (100, 500, 1000, 2000)
    batch_size: int = 8


@dataclass
class ClipRecipe(Recipe):
    model: ClipModelSection = field(default_factory=ClipModelSection)
    data: ClipDataSection = field(default_factory=ClipDataSection)
    loss: ClipLossSection = field(default_factory=ClipLossSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: ClipEvalSection = field(default_factory=ClipEvalSection)


# Memo entries kept at most (~150 MB of 384-wide features): with random report truncation (`data.augment`) the
# distinct texts grow with the epochs; past the limit new ones are computed each time, with the same result.
TEXT_MEMO_LIMIT = 100_000


class ContrastiveTask(nn.Module):
    """Model + loss: ``forward(batch)`` -> {"loss", "logit_scale", "logit_bias"} for the trainer.

    With ``text_lr_scale == 0`` the text tower is frozen in eval mode and its pooled output is memoized per
    distinct text. Each text is encoded alone, unpadded, so its features do not depend on which batch first
    held it, and a resumed run computes the same bits as an uninterrupted one.
    """

    def __init__(self, model: nn.Module, loss: nn.Module, text_lr_scale: float = 1.0) -> None:
        super().__init__()
        self.model, self.loss, self.text_lr_scale = model, loss, text_lr_scale
        self.frozen_text = text_lr_scale == 0.0
        self._text_cache: dict[bytes, torch.Tensor] = {}
        if self.frozen_text:
            model.text.requires_grad_(False)
            model.text.eval()

    def train(self, mode: bool = True) -> ContrastiveTask:
        super().train(mode)
        if self.frozen_text:
            self.model.text.eval()  # no dropout in features that are computed once
        return self

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]] | None:
        """The default decay/no-decay split, with the text tower's groups at `text_lr_scale` x lr."""
        if self.text_lr_scale in (0.0, 1.0):  # a frozen tower has no trainable parameters to group
            return None
        from .loop import scaled_param_groups

        return scaled_param_groups(self, weight_decay, [(self.model.text, self.text_lr_scale)])

    @torch.no_grad()
    def _frozen_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        rows = []
        for i in range(input_ids.shape[0]):
            ids = input_ids[i] if attention_mask is None else input_ids[i][attention_mask[i].bool()]
            key = ids.cpu().numpy().tobytes()
            features = self._text_cache.get(key)
            if features is None:
                features = self.model.text(ids[None], torch.ones_like(ids)[None])[0]
                if len(self._text_cache) < TEXT_MEMO_LIMIT:
                    self._text_cache[key] = features
            rows.append(features)
        return torch.stack(rows)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.frozen_text:
            out = self.model(batch["images"], text_pooled=self._frozen_text(batch["input_ids"], batch.get("attention_mask")))
        else:
            out = self.model(batch["images"], batch["input_ids"], batch.get("attention_mask"))
        loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
        logs = {"loss": loss, "logit_scale": out["logit_scale"].detach()}
        if out["logit_bias"] is not None:
            logs["logit_bias"] = out["logit_bias"].detach()
        return logs


def build_clip_model(section: ClipModelSection) -> nn.Module:
    """The Contrastive3D to train: a saved folder (`init_from`) or a registered name with overrides."""
    from ..loading import from_pretrained
    from ..models.clip import Contrastive3D
    from ..registry import create_model, get_config

    if section.init_from:
        if section.text_overrides:
            raise ValueError("model.text_overrides cannot change a saved model (model.init_from); drop one of them")
        model = from_pretrained(section.init_from, **section.overrides)
    else:
        overrides = dict(section.overrides)
        if section.text_overrides:
            # Merged, not replaced: e.g. {num_hidden_layers: 2} keeps MiniLM's other settings, and
            # from_pretrained then loads its first two layers.
            base = overrides.get("text_config") or get_config(section.name).text_config  # type: ignore[attr-defined]
            overrides["text_config"] = {**base, **section.text_overrides}
        model = create_model(section.name, **overrides)
    if not isinstance(model, Contrastive3D):
        raise TypeError(f"model {section.init_from or section.name!r} is a {type(model).__name__}, not a Contrastive3D")
    return model.train()


def load_model_tokenizer(section: ClipModelSection, model: nn.Module) -> Any:
    from ..models.text import load_tokenizer, minilm_dir

    source = section.tokenizer or section.init_from or model.config.text_pretrained or minilm_dir()
    try:
        return load_tokenizer(source)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{source}: no tokenizer could be loaded ({err}); set model.tokenizer in the recipe") from None


def build_dataset(section: ClipDataSection, image_size: tuple[int, int, int], tokenizer: Any, max_tokens: int, seed: int):
    from torch.utils.data import Subset

    from ..data.datasets import ImageReportDataset

    dataset = ImageReportDataset(
        section.cap_json,
        split=section.split,
        root=section.root,
        size=image_size,
        train=section.augment,
        max_tokens=max_tokens,
        count_tokens=TokenCounter(tokenizer),
        seed=seed,
        on_error=section.on_error,
    )
    if section.limit is not None:
        dataset = Subset(dataset, sample_indices(len(dataset), section.limit, seed))
    return dataset


def main(recipe: dict[str, Any], resume: bool | str | os.PathLike = False) -> dict[str, Any]:
    """Run stage 1 from a recipe dict (see `load_recipe`); returns a summary (paths, steps, metrics)."""
    cfg = ClipRecipe.from_dict(recipe)
    seed_everything(cfg.train.seed)  # before anything random is built: weights, projections, data order
    model = build_clip_model(cfg.model)
    if cfg.data.hu_window is not None:
        from ..data.preprocess import with_hu_window

        # Both saved configs: model/ (read by the index and /embed) and vision/ (the start of stage 2).
        model.config = with_hu_window(model.config, cfg.data.hu_window)
        model.vision.config = with_hu_window(model.vision.config, cfg.data.hu_window)
    tokenizer = load_model_tokenizer(cfg.model, model)
    image_size = tuple(cfg.data.image_size or model.config.input_size)
    text_len = model.text_length
    dataset = build_dataset(cfg.data, image_size, tokenizer, text_len, cfg.train.seed)  # type: ignore[arg-type]
    loss = model.loss_fn(**_loss_kwargs(cfg.loss, model.config.loss))
    task = ContrastiveTask(model, loss, cfg.model.text_lr_scale)
    logger.info(
        "stage 1: %s (%.1f M parameters), %d training pairs at %s, text <= %d tokens",
        cfg.model.init_from or cfg.model.name, model.num_parameters() / 1e6, len(dataset), "x".join(map(str, image_size)), text_len,
    )
    trainer = Trainer(task, dataset, cfg.train, ImageTextCollate(tokenizer, text_len), recipe=to_plain(cfg))
    t0 = time.perf_counter()
    result = trainer.train(resume=resume)
    out = Path(cfg.train.output_dir)
    summary: dict[str, Any] = {
        "output_dir": str(out),
        "global_step": result.global_step,
        "total_steps": result.total_steps,
        "completed": result.completed,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
        "final_loss": result.history[-1]["train/loss"] if result.history else None,
    }
    if not result.completed:
        logger.warning("stopped at step %d of %d; continue with --resume", result.global_step, result.total_steps)
        return summary
    acc = trainer.accelerator
    trained = result.task.model
    if acc.is_main_process:
        trained.eval()
        trained.save_pretrained(out / "model", tokenizer=tokenizer)
        trained.vision.save_pretrained(out / "vision")  # stage 2 starts from this encoder
        summary.update(model_dir=str(out / "model"), vision_dir=str(out / "vision"))
        logger.info("saved %s and %s", out / "model", out / "vision")
        if cfg.eval.split:
            summary["eval"] = _evaluate(cfg, trained, tokenizer, image_size, out / "eval")
    acc.wait_for_everyone()
    return summary


def _loss_kwargs(section: ClipLossSection, kind: str) -> dict[str, Any]:
    if kind == "clip":
        return {}
    return {"dist_impl": section.dist_impl, "chunk_size": section.chunk_size, "symmetric_logits": section.symmetric_logits}


def _evaluate(cfg: ClipRecipe, model: nn.Module, tokenizer: Any, image_size: tuple[int, ...], out: Path) -> dict[str, Any]:
    from ..eval.retrieval import evaluate_retrieval, write_retrieval_report

    result = evaluate_retrieval(
        model, tokenizer, cfg.eval.cap_json or cfg.data.cap_json, split=cfg.eval.split or "test", sizes=cfg.eval.sizes, root=cfg.data.root,
        image_size=image_size, batch_size=cfg.eval.batch_size,  # type: ignore[arg-type]
    )
    write_retrieval_report({cfg.eval.split or "test": result}, out)
    return result

