"""Stage-3 training step of the quickstart's VLM (LoRA, bf16 autocast): time per step for each training setting.

The model is the quickstart's (its narrow DCFormer, the 2xMLP-Mixer-H projector with 16 image tokens, the
embedded SmolLM2-135M-Instruct with LoRA r 16 on every linear layer), with random encoder and projector weights:
the step's cost does not depend on them. Batches are 8 phantom items of one kind, as length-grouped training
makes them: closed questions (~50 tokens) and reports (~80 tokens).

Settings: LoRA dropout 0.05 (the paper's) or 0, the LLM's attention kernel, "sdpa" (the default) or "eager"
(`model.llm_attention` in a stage-2/3 recipe), and whether the frozen linear weights are cast to bf16 once
(`train.cast_frozen_once`, the trainer's default) or by autocast at every step. Each row is the median of `--repeats` forward + backward passes
after two warm-up passes, in this one process; the ratio is against the first row. The first loss is printed
too: the two kernels differ by bf16 rounding only, and dropout does not act on the first step (LoRA's B is zero).

    python benchmarks/vlm_step.py                # a minute or two on 2 cores
    python benchmarks/vlm_step.py --repeats 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SETTINGS = [("sdpa", 0.05, False), ("sdpa", 0.0, False), ("eager", 0.05, False), ("eager", 0.0, False), ("eager", 0.0, True)]


def build(attention: str, dropout: float):
    from med3dvlm.models.vlm import base_llm
    from med3dvlm.quickstart import ENCODER
    from med3dvlm.train.sampling import seed_everything
    from med3dvlm.train.vlm import StageSection, VLMModelSection, build_vlm_model, set_trainable

    seed_everything(0)
    section = VLMModelSection(name="med3dvlm_smollm2", overrides={
        "vision_overrides": ENCODER, "max_length": 160,
        "projector_overrides": {"low_tokens_out": [8, 8], "high_tokens_out": [4, 8]}})
    model = set_trainable(build_vlm_model(section), StageSection(stage=3, lora_dropout=dropout))
    base_llm(model.llm).set_attn_implementation(attention)
    model.train()
    model.vision.eval()
    return model


def batches(model, folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    from med3dvlm.data.datasets import CaptionDataset, VQADataset
    from med3dvlm.data.phantom import write_phantom_dataset
    from med3dvlm.quickstart import VOLUME
    from med3dvlm.train.vlm import VLMCollate

    write_phantom_dataset(folder, n=24, seed=0, size=tuple(VOLUME), progress=False)
    closed = VQADataset(folder / "M3D-VQA" / "M3D_VQA_train.csv", mode="closed", size=tuple(VOLUME), closed_answer="text")
    reports = CaptionDataset(folder / "M3D_Cap.json", size=tuple(VOLUME), train=False)
    collate = VLMCollate(model.processor)
    return {"closed VQA": collate([closed[i] for i in range(8)]), "reports": collate([reports[i] for i in range(8)])}


def time_step(model, batch: dict[str, torch.Tensor], repeats: int, cast_once: bool) -> tuple[float, float]:
    from torch.func import functional_call

    from med3dvlm.train.precision import frozen_linear_copies

    copies = frozen_linear_copies(model, torch.bfloat16) if cast_once else {}
    inputs = {k: batch[k] for k in ("input_ids", "images", "attention_mask", "labels")}

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = functional_call(model, copies, (), inputs, tie_weights=False, strict=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    first = step()
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 8, bf16 autocast")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = None
        for attention, dropout, cast_once in SETTINGS:
            model = build(attention, dropout)
            data = data or batches(model, Path(tmp))
            for kind, batch in data.items():
                seconds, loss = time_step(model, batch, args.repeats, cast_once)
                rows.append((kind, attention, dropout, cast_once, tuple(batch["input_ids"].shape), seconds, loss))
            del model
    base = {kind: s for kind, a, d, c, _, s, _ in rows if (a, d, c) == SETTINGS[0]}
    print(f"{'batch':<11} {'attention':<9} {'dropout':>7} {'cast once':>9} {'tokens':>8} {'s/step':>7} {'vs first':>8} {'first loss':>10}")
    for kind, attention, dropout, cast_once, shape, seconds, loss in sorted(rows, key=lambda r: r[0]):
        print(f"{kind:<11} {attention:<9} {dropout:>7} {str(cast_once):>9} {shape[0]}x{shape[1]:<6} {seconds:>7.3f}"
              f" {base[kind] / seconds:>7.2f}x {loss:>10.4f}")


if __name__ == "__main__":
    main()
