"""Stages 2 and 3 of Med3DVLM: projector pre-training, then LoRA fine-tuning (reference-facts §4.4).

- Stage 2 trains the projector only; the vision encoder (from stage 1) and the LLM are frozen, and the
  frozen encoder stays in eval mode, so its BatchNorm statistics do not drift. Data: captions + closed
  and open VQA (no yes/no). Paper recipe: 3 epochs, per-device batch 16, lr 1e-4, cosine, 3% warmup.
- Stage 3 adds LoRA (r 16, alpha 32, dropout 0.05) on every Linear layer of the LLM and keeps training
  the projector. Data: as stage 2 plus the yes/no questions. Paper: 5 epochs, batch 8, lr 5e-5.
- `stage.original_code: true` reproduces what the released code trained instead (mirthAI/Med3DVLM#10): the
  input embeddings in stage 2, and the vision tower, embeddings and lm_head next to LoRA in stage 3.

Runs on the same engine as stage 1 (Accelerate, DeepSpeed config, atomic checkpoints, `--resume`):

    med3dvlm train vlm --config configs/vlm_stage2_cpu.yaml
    med3dvlm train vlm --config configs/vlm_stage3_cpu.yaml
    med3dvlm merge-lora runs/vlm_stage3_cpu/model --out runs/vlm_merged
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
from torch.utils.data import ConcatDataset, Subset

from ..models.vlm import base_llm, has_lora
from ..prompts import VLMProcessor
from .config import section_from_dict, to_plain
from .engine import TrainConfig, Trainer, sample_indices, seed_everything

logger = logging.getLogger(__name__)


@dataclass
class VLMModelSection:
    name: str = "med3dvlm_smollm2"  # a registered VLM (`med3dvlm info`)
    overrides: dict[str, Any] = field(default_factory=dict)  # VLMConfig fields (vision_overrides, projector_overrides, ...)
    vision_from: str | None = None  # stage-1 encoder folder (train clip's `vision/`) to start from
    init_from: str | None = None  # a saved VLM folder (stage 2's `model/`) to continue from instead of `name`
    tokenizer: str | None = None  # tokenizer folder, for models built from an LLM config without one
    # The LLM's attention kernel while training ("sdpa", "eager", ...; null keeps the loaded one). On a CPU the
    # speed of SDPA's kernel depends on the values it sees: for some models' batches "eager" was 1.3x faster per
    # step, for others equal or 7 % slower (benchmarks/vlm_step.py, docs/benchmarks.md).
    # Not saved (the Hugging Face config does not store it); generation has its own kernel (models.decoding).
    llm_attention: str | None = None


@dataclass
class VLMDataSection:
    cap_json: str | None = "data/M3D_Cap/M3D_Cap.json"  # captions (report generation); null to skip
    vqa_csv: str | None = "data/M3D-VQA/M3D_VQA_train.csv"  # used twice: closed- and open-ended
    yes_no_csv: str | None = None  # stage 3 only in the paper
    root: str | None = None  # folder the image paths are relative to; default: found from cap_json
    split: str = "train"
    image_size: tuple[int, int, int] | None = None  # (D, H, W); default: the encoder's input_size
    augment: bool = True
    on_error: str = "raise"  # or "skip" (logged and counted)
    limit: int | None = None  # a seeded random sample of at most N items from each source (smoke runs)
    caption_repeats: int = 1  # the captions count this many times: a report is one item, like one short question
    closed_answer: str = "letter"  # closed questions answered "A. text" (M3D) or "text" (see VQADataset)
    vqa_modes: tuple[str, ...] = ("closed", "open")  # which forms of the vqa_csv questions to train on
    question_types: tuple[int, ...] | None = None  # keep only these M3D question types (1-5) of the VQA CSVs
    # The display window of the (8-bit) training images, as in the stage-1 recipe; null keeps the encoder's.
    hu_window: str | dict[str, float] | None = None


@dataclass
class StageSection:
    stage: int = 2  # 2: projector pre-training, 3: LoRA fine-tuning
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    original_code: bool = False  # also train what the original code trained (see the module docstring)
    # > 0: fine-tune the vision encoder too, at this fraction of train.lr, its BatchNorm statistics kept from
    # stage 1 (batches of 8 would make them noisy). 0 keeps it frozen, as the paper does.
    vision_lr_scale: float = 0.0


@dataclass
class VLMRecipe:
    model: VLMModelSection = field(default_factory=VLMModelSection)
    data: VLMDataSection = field(default_factory=VLMDataSection)
    stage: StageSection = field(default_factory=StageSection)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLMRecipe:
        source = data.get("_source", "recipe")
        return section_from_dict(cls, {k: v for k, v in data.items() if not k.startswith("_")}, where=str(source))


class VLMTask(nn.Module):
    """The VLM with its language-model loss: ``forward(batch)`` -> {"loss"}.

    Frozen sub-modules are kept in eval mode whatever mode the trainer sets, so a frozen encoder's
    BatchNorm statistics (and dropout) do not change.
    """

    def __init__(self, model: nn.Module, vision_lr_scale: float = 0.0) -> None:
        super().__init__()
        self.model, self.vision_lr_scale = model, vision_lr_scale

    def train(self, mode: bool = True) -> VLMTask:
        super().train(mode)
        for part in (self.model.vision, self.model.projector):
            if not any(p.requires_grad for p in part.parameters()):
                part.eval()
        if self.vision_lr_scale > 0:
            for module in self.model.vision.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]] | None:
        """The default groups, with a fine-tuned encoder's at `vision_lr_scale` x lr."""
        if self.vision_lr_scale in (0.0, 1.0):
            return None
        from .loop import scaled_param_groups

        return scaled_param_groups(self, weight_decay, [(self.model.vision, self.vision_lr_scale)])

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.model(
            input_ids=batch["input_ids"], images=batch["images"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        return {"loss": out.loss}


class VLMCollate:
    """Tokenize (prompt, answer) pairs with the model's processor and stack the images."""

    def __init__(self, processor: VLMProcessor) -> None:
        self.processor = processor

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = [
            self.processor.encode_example(it["question"], it["answer"], caption=it.get("task") == "caption") for it in items
        ]
        batch = self.processor.collate(encoded)
        batch["images"] = torch.stack([it["image"] for it in items])
        return batch


def build_vlm_model(section: VLMModelSection) -> nn.Module:
    from ..loading import from_pretrained
    from ..models.vlm import Med3DVLM
    from ..registry import create_model

    model = from_pretrained(section.init_from, **section.overrides) if section.init_from else create_model(section.name, **section.overrides)
    if not isinstance(model, Med3DVLM):
        raise TypeError(f"{section.init_from or section.name!r} is a {type(model).__name__}, not a Med3DVLM")
    if section.tokenizer:
        from transformers import AutoTokenizer

        model.set_tokenizer(AutoTokenizer.from_pretrained(section.tokenizer))
    if section.vision_from:
        vision = from_pretrained(section.vision_from)
        if vision.config != model.vision.config.replace(preprocess=vision.config.preprocess):
            raise ValueError(f"{section.vision_from}: encoder {vision.config} does not match the VLM's {model.vision.config}")
        model.vision.load_state_dict(vision.state_dict())
        if vision.config.preprocess is not None:  # stage 1's stored preprocessing (its hu_window) travels with it
            model.vision.config = model.vision.config.replace(preprocess=vision.config.preprocess)
    return model


def set_trainable(model: nn.Module, stage: StageSection) -> nn.Module:
    """Freeze and unfreeze as the stage prescribes; stage 3 wraps the LLM in LoRA. Returns the model."""
    if stage.stage not in (2, 3):
        raise ValueError(f"stage.stage must be 2 or 3, got {stage.stage}")
    model.requires_grad_(False)
    if stage.stage == 3 and not has_lora(model.llm):
        from peft import LoraConfig, get_peft_model

        targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.llm.named_modules()
                          if isinstance(m, nn.Linear) and "lm_head" not in name})
        lora = LoraConfig(r=stage.lora_r, lora_alpha=stage.lora_alpha, lora_dropout=stage.lora_dropout,
                          target_modules=targets, bias="none", task_type="CAUSAL_LM")
        model.llm = get_peft_model(model.llm, lora)  # freezes the base LLM, LoRA weights trainable
    elif stage.stage == 3:
        # Continuing from a saved stage-3 model: peft loads its adapter frozen, and training would otherwise
        # move the projector alone.
        for name, param in model.llm.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
    model.projector.requires_grad_(True)
    if stage.vision_lr_scale > 0:
        model.vision.requires_grad_(True)
    if stage.original_code:
        model.llm.get_input_embeddings().requires_grad_(True)
        if stage.stage == 3:
            model.vision.requires_grad_(True)
            model.llm.get_output_embeddings().requires_grad_(True)
    return model


def build_dataset(section: VLMDataSection, stage: int, image_size: tuple[int, int, int], seed: int):
    from ..data.datasets import CaptionDataset, VQADataset

    common = dict(size=image_size, seed=seed, on_error=section.on_error)
    parts = []
    if section.cap_json:
        parts.append(CaptionDataset(section.cap_json, split=section.split, root=section.root, train=section.augment, **common))
    types = tuple(section.question_types) if section.question_types else None
    if section.vqa_csv:
        for mode in section.vqa_modes:
            parts.append(VQADataset(section.vqa_csv, root=section.root, mode=mode, train=section.augment,
                                    closed_answer=section.closed_answer, question_types=types, **common))
    if section.yes_no_csv:
        if stage == 2:
            logger.warning("stage 2 of the paper uses no yes/no questions, but data.yes_no_csv is set; using it")
        parts.append(VQADataset(section.yes_no_csv, root=section.root, mode="open", train=section.augment,
                                question_types=types, **common))
    if not parts:
        raise ValueError("the recipe names no data: set data.cap_json, data.vqa_csv or data.yes_no_csv")
    if section.limit is not None:
        # A seeded random sample of each source, not its first rows: the M3D CSVs are ordered by image, so the
        # first N rows would cover a handful of images only.
        parts = [Subset(p, sample_indices(len(p), section.limit, seed)) for p in parts]
    if section.cap_json and section.caption_repeats > 1:
        parts = [parts[0]] * section.caption_repeats + parts[1:]
    return ConcatDataset(parts)


def item_lengths(dataset: ConcatDataset) -> list[int]:
    """Text length of every item of a stage's dataset, read without loading images."""
    lengths = []
    for part in dataset.datasets:
        base, indices = (part.dataset, part.indices) if isinstance(part, Subset) else (part, range(len(part)))
        lengths.extend(base.text_length(i) for i in indices)
    return lengths


def main(recipe: dict[str, Any], resume: bool | str | os.PathLike = False) -> dict[str, Any]:
    """Run stage 2 or 3 from a recipe dict; returns a summary (paths, steps, first and last loss)."""
    cfg = VLMRecipe.from_dict(recipe)
    seed_everything(cfg.train.seed)  # before the projector, the LoRA weights and the data subset are drawn
    model = set_trainable(build_vlm_model(cfg.model), cfg.stage)
    if cfg.data.hu_window is not None:
        from ..data.preprocess import with_hu_window

        model.vision.config = with_hu_window(model.vision.config, cfg.data.hu_window)  # saved in model/vision/
    if model.processor is None:
        raise ValueError("the VLM has no tokenizer; build it from a registered name with an LLM or a saved folder")
    if cfg.model.llm_attention is not None:
        base_llm(model.llm).set_attn_implementation(cfg.model.llm_attention)
    image_size = tuple(cfg.data.image_size or model.vision.config.input_size)
    dataset = build_dataset(cfg.data, cfg.stage.stage, image_size, cfg.train.seed)  # type: ignore[arg-type]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("stage %d: %d samples at %s, %.2f M of %.1f M parameters trainable", cfg.stage.stage, len(dataset),
                "x".join(map(str, image_size)), trainable / 1e6, sum(p.numel() for p in model.parameters()) / 1e6)
    lengths = item_lengths(dataset) if cfg.train.group_by_length else None
    trainer = Trainer(VLMTask(model, cfg.stage.vision_lr_scale), dataset, cfg.train, VLMCollate(model.processor), recipe=to_plain(cfg), lengths=lengths)
    t0 = time.perf_counter()
    result = trainer.train(resume=resume)
    out = Path(cfg.train.output_dir)
    summary: dict[str, Any] = {
        "stage": cfg.stage.stage,
        "output_dir": str(out),
        "global_step": result.global_step,
        "total_steps": result.total_steps,
        "completed": result.completed,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "first_loss": result.history[0]["train/loss"] if result.history else None,
        "final_loss": result.history[-1]["train/loss"] if result.history else None,
        "trainable_parameters": trainable,
    }
    if result.completed and trainer.accelerator.is_main_process:
        trained = result.task.model.eval()
        trained.save_pretrained(out / "model")
        summary["model_dir"] = str(out / "model")
        logger.info("saved %s", out / "model")
    trainer.accelerator.wait_for_everyone()
    return summary
