"""Report-generation and VQA evaluation of a Med3DVLM model, with the paper's protocol and more.

Xin et al., IEEE JBHI 2025 (https://ieeexplore.ieee.org/document/11145341); the original scripts are
`src/eval/eval_caption.py` and `src/eval/eval_vqa.py` (reference-facts §6):

- reports: the first 1000 items of `M3D_Cap.json["test"]`, one caption prompt per item (seeded), metrics per
  sample then averaged (Table 2 layout); VQA: the whole `M3D_VQA_test.csv`, closed-ended accuracy per question
  type (Table 3) and open-ended text metrics per question type (Table 4);
- generation: the original *sampled* at temperature 1.0 (`GenerationSettings.paper()`); the default here is
  greedy decoding, which is reproducible without a seed. Every result records the settings it came from.

Beyond the paper: corpus BLEU-4, ROUGE-L, a strict closed-ended scorer, bootstrap 95% intervals, the mean over
question types and over all questions. Outputs of one run, in its folder: `predictions.csv` (one row per
sample, with its scores), `summary.json`, `tables.md` and per-question-type bar plots (`*_by_type.png`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..generation import GenerationSettings
from ..metrics.nlg import (
    bootstrap_bleu4_ci,
    metric_settings,
    nlg_per_sample,
    resolve_bertscore_model,
    sentence_bleu_stats,
    summarize_scores,
)
from ..metrics.vqa import closed_vqa_metrics, open_vqa_by_type

# The rendering lives in generation_report; its names stay importable from here.
from .generation_report import (  # noqa: F401
    EXTRA_METRICS,
    closed_vqa_table,
    open_vqa_table,
    plot_by_type,
    report_table,
    settings_block,
    write_outputs,
)

logger = logging.getLogger(__name__)

PAPER_REPORT_LIMIT = 1000  # the original evaluates the first 1000 test reports
EVAL_SEED = 42  # the seed of evaluation runs that name none (the CLI's --seed default too)


def with_eval_seed(settings: GenerationSettings | None) -> GenerationSettings:
    """`settings` (default ones when None) with `EVAL_SEED` where no seed is given.

    Evaluation always seeds: the seed picks each item's caption prompt and makes sampled runs repeatable.
    """
    if settings is None:
        settings = GenerationSettings()
    return settings if settings.seed is not None else settings.replace(seed=EVAL_SEED)


def effective_generation_config(model: Any, settings: GenerationSettings) -> dict[str, Any]:
    """The decoding values generate() will really use: the LLM's generation_config overridden by ours."""
    config = getattr(getattr(model, "llm", None), "generation_config", None)
    base = config.to_dict() if config is not None else {}
    keys = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "num_beams", "eos_token_id", "max_new_tokens")
    out = {k: base.get(k) for k in keys}
    out.update(settings.generate_kwargs())
    out["eos_token_id"] = _eos_ids(model)
    if not out["do_sample"]:  # greedy ignores the sampling knobs
        out.update(temperature=None, top_p=None, top_k=None)
    return out


def _eos_ids(model: Any) -> list[int]:
    config = getattr(getattr(model, "llm", None), "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    tokenizer_eos = getattr(model.tokenizer, "eos_token_id", None)
    if tokenizer_eos is not None and tokenizer_eos not in ids:
        ids.append(tokenizer_eos)  # models built from a bare config have no generation eos
    return ids


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"image": torch.stack([it["image"] for it in items])}
    for key in items[0]:
        if key != "image":
            out[key] = [it[key] for it in items]
    return out


@torch.no_grad()
def generate_answers(
    model: Any,
    dataset: Dataset,
    settings: GenerationSettings,
    caption: bool = False,
    num_workers: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per item: its fields (question, answer, ...) without the image, plus "prediction".

    Prompts are batched with left padding; the model returns only the new tokens, decoded without special
    tokens and stripped (as the original).
    """
    from tqdm.auto import tqdm

    if model.processor is None:
        raise ValueError("the model has no tokenizer/processor; load a saved VLM folder")
    settings = with_eval_seed(settings)
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.vision.parameters()).dtype
    torch.manual_seed(settings.seed)
    kwargs = {**settings.generate_kwargs(), "eos_token_id": _eos_ids(model)}
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate)
    rows: list[dict[str, Any]] = []
    for batch in tqdm(loader, desc="generate", unit="batch", disable=not progress):
        enc = model.processor.generation_batch(batch["question"], caption=caption)
        new = model.generate(
            batch["image"].to(device=device, dtype=dtype), enc["input_ids"].to(device), enc["attention_mask"].to(device), **kwargs
        )
        for i, prediction in enumerate(model.processor.decode(new)):
            rows.append({**{k: v[i] for k, v in batch.items() if k != "image"}, "prediction": prediction})
    return rows


def _limited(dataset: Dataset, limit: int | None) -> Dataset:
    if limit is None or limit >= len(dataset):  # type: ignore[arg-type]
        return dataset
    return Subset(dataset, range(limit))


def evaluate_reports(
    model: Any,
    cap_json: str | os.PathLike,
    split: str = "test",
    limit: int | None = PAPER_REPORT_LIMIT,
    settings: GenerationSettings | None = None,
    bertscore: bool = True,
    bertscore_model: str | os.PathLike | None = None,
    n_resamples: int = 1000,
    root: str | os.PathLike | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate reports for the first `limit` items of a split and score them; returns (rows, summary)."""
    from ..data.datasets import CaptionDataset

    settings = with_eval_seed(settings)
    if bertscore:
        resolve_bertscore_model(bertscore_model)  # fail before generating, not after
    size = tuple(model.vision.config.input_size)
    dataset = CaptionDataset(cap_json, split=split, root=root, size=size, train=False, seed=settings.seed)  # type: ignore[arg-type]
    if len(dataset) == 0:
        raise ValueError(f"{cap_json}: split {split!r} is empty")
    dataset = _limited(dataset, limit)
    t0 = time.perf_counter()
    rows = generate_answers(model, dataset, settings, caption=True, num_workers=num_workers, progress=progress)
    gen_seconds = time.perf_counter() - t0
    preds, refs = [r["prediction"] for r in rows], [r["answer"] for r in rows]
    per = nlg_per_sample(preds, refs, bertscore=bertscore, bertscore_model=bertscore_model)
    for name, values in per["scores"].items():
        for row, value in zip(rows, values):
            row[name] = value
    summary = summarize_scores(per["scores"], n_resamples)
    summary["bleu4_corpus"] = bootstrap_bleu4_ci(sentence_bleu_stats(preds, refs), n_resamples)
    return rows, {
        "task": "report",
        "data": {"cap_json": str(cap_json), "split": split, "limit": limit, "samples": len(rows)},
        "metrics": summary,
        "metric_settings": metric_settings(per, n_resamples, 0.95, 0),
        "generation": asdict(settings),
        "generation_effective": effective_generation_config(model, settings),
        "generation_seconds": round(gen_seconds, 1),
    }


def evaluate_vqa(
    model: Any,
    vqa_csv: str | os.PathLike,
    modes: Sequence[str] = ("closed", "open"),
    limit: int | None = None,
    settings: GenerationSettings | None = None,
    bertscore: bool = True,
    bertscore_model: str | os.PathLike | None = None,
    n_resamples: int = 1000,
    root: str | os.PathLike | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Closed- and/or open-ended VQA over a M3D-VQA CSV (its first `limit` rows); returns (rows, summary)."""
    from ..data.datasets import VQADataset

    settings = with_eval_seed(settings)
    if bertscore:
        resolve_bertscore_model(bertscore_model)  # fail before generating, not after
    size = tuple(model.vision.config.input_size)
    all_rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {
        "task": "vqa",
        "data": {"vqa_csv": str(vqa_csv), "limit": limit},
        "generation": asdict(settings),
        "generation_effective": effective_generation_config(model, settings),
    }
    for mode in modes:
        if mode not in ("open", "closed"):
            raise ValueError(f"mode must be 'open' or 'closed', got {mode!r}")
        dataset = _limited(VQADataset(vqa_csv, root=root, mode=mode, size=size, seed=settings.seed), limit)  # type: ignore[arg-type]
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError(f"{vqa_csv}: no questions to evaluate")
        t0 = time.perf_counter()
        rows = generate_answers(model, dataset, settings, caption=False, num_workers=num_workers, progress=progress)
        types = [int(r["question_type"]) for r in rows]
        if mode == "closed":
            result = closed_vqa_metrics(
                [r["prediction"] for r in rows], [r["answer_choice"] for r in rows], types,
                [r["choices"] for r in rows], n_resamples=n_resamples,
            )
            for key in ("loose", "strict", "chosen"):
                for row, value in zip(rows, result["per_sample"][key]):
                    row[f"correct_{key}" if key != "chosen" else "chosen_letter"] = value
            summary["closed"] = {k: result[k] for k in ("loose", "strict")}
        else:
            per = nlg_per_sample([r["prediction"] for r in rows], [r["answer"] for r in rows], bertscore, bertscore_model)
            for name, values in per["scores"].items():
                for row, value in zip(rows, values):
                    row[name] = value
            summary["open"] = open_vqa_by_type(per["scores"], types, n_resamples=n_resamples)
            summary["metric_settings"] = metric_settings(per, n_resamples, 0.95, 0)
        summary.setdefault("samples", {})[mode] = len(rows)
        summary.setdefault("generation_seconds", {})[mode] = round(time.perf_counter() - t0, 1)
        for row in rows:
            row["mode"] = mode
        all_rows.extend(rows)
    return all_rows, summary


def load_model(model_dir: str | os.PathLike, device: str | None = None) -> Any:
    """A saved VLM folder (ours, LoRA or merged) on `device` (default: cuda if available), in eval mode."""
    from ..loading import load_for_inference

    return load_for_inference(model_dir, device, requires=("generate", "processor"), kind="a VLM with its tokenizer")
