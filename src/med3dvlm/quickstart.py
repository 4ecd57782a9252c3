"""The main job on the embedded default: data, the three training stages, evaluation and a results page.

`med3dvlm quickstart` runs, on a CPU and offline, everything the paper does at small scale:

1. a phantom CT dataset in the M3D-Cap / M3D-VQA formats (`med3dvlm data phantom`);
2. stage 1, SigLIP pre-training of a narrow DCFormer with the embedded all-MiniLM-L6-v2 text tower;
3. stage 2, projector pre-training with the embedded SmolLM2-135M-Instruct, encoder and LLM frozen;
4. stage 3, LoRA fine-tuning, then the LoRA merged into a standalone model;
5. evaluation: retrieval recall@K, report generation and closed/open VQA with the paper's metrics;
6. `results.md`: tables, plots, slice images and example predictions.

Every step is skipped when its output exists and training resumes from its last checkpoint, so re-running
the command after an interruption continues where it stopped. The recipes are the CPU recipes of
`configs/` made smaller; the models are toys, the pipeline is the real one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

VOLUME = [32, 64, 64]
ENCODER = {"stem_channels": 16, "dims": [32, 64, 128, 256], "depths": [1, 1, 2, 1], "kernel_sizes": [7, 5, 5, 3],
           "input_size": VOLUME}


def _train_section(out: Path, **kw: Any) -> dict[str, Any]:
    base = {"output_dir": str(out), "warmup_ratio": 0.03, "scheduler": "cosine", "save_every": 10, "keep_last": 1,
            "log_every": 2, "seed": 42, "num_workers": 0, "log_with": "tensorboard"}
    return {**base, **kw}


def clip_recipe(data: Path, out: Path, epochs: int) -> dict[str, Any]:
    return {
        "model": {
            "name": "clip_dcformer_small_minilm",
            "overrides": {"vision_overrides": ENCODER, "embed_dim": 128, "text_pooling": "mean", "max_text_length": 128,
                          "init_logit_scale": 2.302585, "init_logit_bias": -10.0},
            "text_overrides": {"num_hidden_layers": 2},
            "text_lr_scale": 0.3,
        },
        "data": {"cap_json": str(data / "M3D_Cap.json"), "split": "train", "image_size": VOLUME, "augment": False},
        "train": _train_section(out, lr=1e-3, weight_decay=0.05, epochs=epochs, batch_size=16),
        "eval": {"split": "test", "sizes": [100], "batch_size": 32},
    }


def vlm_recipe(data: Path, out: Path, stage: int, start: Path, limit: int) -> dict[str, Any]:
    vqa = data / "M3D-VQA"
    model = ({"name": "med3dvlm_smollm2", "vision_from": str(start),
              "overrides": {"vision_overrides": ENCODER, "max_length": 160,
                            "projector_overrides": {"low_tokens_out": [8, 8], "high_tokens_out": [4, 8]}}}
             if stage == 2 else {"init_from": str(start)})
    return {
        "model": model,
        "data": {"cap_json": str(data / "M3D_Cap.json"), "vqa_csv": str(vqa / "M3D_VQA_train.csv"),
                 "yes_no_csv": str(vqa / "M3D_VQA_yn_train.csv") if stage == 3 else None, "augment": False, "limit": limit},
        "stage": {"stage": stage},
        "train": _train_section(out, lr=1e-3 if stage == 2 else 5e-4, epochs=1, batch_size=8),
    }


def run_quickstart(
    out: str | Path = "runs/quickstart",
    cases: int = 240,
    seed: int = 0,
    clip_epochs: int = 10,
    vlm_limit: int = 120,
    eval_limit: int = 32,
) -> Path:
    """Run every step (skipping finished ones) and return the path of `results.md`."""
    from .data.phantom import write_phantom_dataset
    from .train import clip as stage1
    from .train import vlm as stages23

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    data = out / "data"

    def step(name: str, done: Path, fn) -> None:
        if done.exists():
            logger.info("quickstart: %s already done (%s)", name, done)
            return
        logger.info("quickstart: %s", name)
        t0 = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - t0, 1)

    step("phantom dataset", data / "M3D_Cap.json",
         lambda: write_phantom_dataset(data, n=cases, seed=seed, size=tuple(VOLUME)))  # type: ignore[arg-type]
    step("stage 1: contrastive pre-training", out / "stage1" / "model",
         lambda: _check(stage1.main(clip_recipe(data, out / "stage1", clip_epochs), resume=True)))
    step("stage 2: projector pre-training", out / "stage2" / "model",
         lambda: _check(stages23.main(vlm_recipe(data, out / "stage2", 2, out / "stage1" / "vision", vlm_limit), resume=True)))
    step("stage 3: LoRA fine-tuning", out / "stage3" / "model",
         lambda: _check(stages23.main(vlm_recipe(data, out / "stage3", 3, out / "stage2" / "model", vlm_limit), resume=True)))
    step("merge LoRA", out / "model", lambda: _merge(out / "stage3" / "model", out / "model"))
    step("evaluation", out / "eval" / "vqa" / "summary.json", lambda: _evaluate(out, data, eval_limit))
    _write_timings(out, timings)
    from .quickstart_report import write_results_page

    return write_results_page(out)


def _check(summary: dict[str, Any]) -> None:
    if not summary.get("completed"):
        raise RuntimeError(f"training stopped early at step {summary.get('global_step')}; run quickstart again to resume")


def _merge(src: Path, dst: Path) -> None:
    from .hub import from_pretrained

    from_pretrained(src).merge_lora().save_pretrained(dst)


def _evaluate(out: Path, data: Path, limit: int) -> None:
    from .eval.generation import GenerationSettings, evaluate_reports, evaluate_vqa, load_model, write_outputs
    from .models.text import minilm_dir

    model = load_model(out / "model", device="cpu")
    bert = str(minilm_dir())  # roberta-large is not available offline; the embedded MiniLM scores BERTScore here
    settings = GenerationSettings(max_new_tokens=48, batch_size=8)
    rows, summary = evaluate_reports(model, data / "M3D_Cap.json", limit=limit, settings=settings,
                                     bertscore_model=bert, n_resamples=200)
    write_outputs(rows, summary, out / "eval" / "report", name="quickstart")
    short = GenerationSettings(max_new_tokens=16, batch_size=8)
    rows, summary = evaluate_vqa(model, data / "M3D-VQA" / "M3D_VQA_test.csv", limit=limit, settings=short,
                                 bertscore_model=bert, n_resamples=200)
    write_outputs(rows, summary, out / "eval" / "vqa", name="quickstart")


def _write_timings(out: Path, timings: dict[str, float]) -> None:
    path = out / "timings.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    known.update(timings)
    path.write_text(json.dumps(known, indent=2) + "\n")
