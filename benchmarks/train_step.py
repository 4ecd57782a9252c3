"""Stage-1 training step of the DCFormer encoder (forward + backward + AdamW): time and peak memory per path.

Paths, all at the same weights (an original-layout encoder built from a fixed seed, converted to ours):

- original: the mirthAI/Med3DVLM encoder as re-implemented in its own layout in tests/original_reference.py;
- plain: our DCFormer as it trains by default;
- fast: channels_last_3d activations (`set_channels_last`) on CPU; bf16 autocast (and the default layout,
  which cuDNN runs faster for these thin kernels) on CUDA. `--fast-bf16` adds bf16 autocast on CPU too;
- checkpointed: plain with activation checkpointing (`grad_checkpointing`);
- fast + checkpointed: both.

The loss is the mean square of the last two outputs, which is the same number for the original's token order
and ours, so equal weights must give an equal first loss (printed). Each path runs in its own fresh process.
On CPU "peak RSS" is the process's peak resident set size (`ru_maxrss`) and "step memory" its growth over the
resident size once the model, optimizer and input exist (activations, gradients, AdamW state); on CUDA both
are torch's peak allocation (before the first step, and over the steps). Times are the median of `--repeats`
steps after one warm-up step.

    python benchmarks/train_step.py                    # DCFormer-small, 128x256x256, batch 2 (minutes on 2 cores)
    python benchmarks/train_step.py --model dcformer_test --size 64 64 64 --repeats 2
    python benchmarks/train_step.py --device cuda --batch 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from queue import Empty

import torch

ROOT = Path(__file__).resolve().parents[1]
CASES = ["original", "plain", "fast", "checkpointed", "fast + checkpointed"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _build(case: str, model_name: str, device: str, fast_bf16: bool):
    """(model, autocast dtype or None) for one path, from the same seeded original-layout weights."""
    sys.path.insert(0, str(ROOT))
    import med3dvlm
    from med3dvlm.convert import convert_dcformer_checkpoint

    from tests.original_reference import OrigModel

    cfg = med3dvlm.get_config(model_name)
    torch.manual_seed(0)
    original = OrigModel(stem=cfg.stem_channels, dims=cfg.dims, depths=cfg.depths, kernels=cfg.kernel_sizes)
    if case == "original":
        return original.to(device).train(), None
    model = convert_dcformer_checkpoint(original.state_dict())
    del original
    autocast = None
    if "fast" in case:
        if device == "cpu":
            model.set_channels_last()
            autocast = torch.bfloat16 if fast_bf16 else None
        else:
            autocast = torch.bfloat16
    if "checkpointed" in case:
        model.set_grad_checkpointing()
    return model.to(device).train(), autocast


def _run_case(case: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    model, autocast = _build(case, args.model, device, args.fast_bf16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    torch.manual_seed(1)
    x = torch.rand(args.batch, 1, *args.size).to(device)
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=autocast) if autocast else contextlib.nullcontext():
            outputs = model(x)[-2:]
        loss = sum(o.float().square().mean() for o in outputs)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    step()  # warm-up: kernels picked, the allocator grows, AdamW state allocated
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({
        "case": case, "s": statistics.median(times), "times_s": times, "peak_mb": peak, "step_mb": peak - base,
        "base_mb": base, "first_loss": losses[0], "losses": losses,
    })


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dcformer_small")
    parser.add_argument("--size", type=int, nargs=3, default=(128, 256, 256), metavar=("D", "H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per case (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fast-bf16", action="store_true", help="on CPU, the fast path also runs under bf16 autocast")
    parser.add_argument("--cases", nargs="*", default=CASES, choices=CASES)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    ctx = mp.get_context("spawn")
    rows = []
    for case in args.cases:
        queue = ctx.Queue()
        proc = ctx.Process(target=_run_case, args=(case, args, queue))
        proc.start()
        result = None
        while result is None:
            try:
                result = queue.get(timeout=1.0)
            except Empty:
                if not proc.is_alive():
                    break
        proc.join()
        if proc.exitcode != 0 or result is None:
            print(f"{case}: failed (exit code {proc.exitcode})", file=sys.stderr)
            continue
        rows.append(result)
        print(f"  done: {case}: {result['s']:.3f} s/step, peak {result['peak_mb']:.0f} MB, losses {result['losses']}", file=sys.stderr)
    load_after = os.getloadavg()

    by = {r["case"]: r for r in rows}
    plain, original = by.get("plain"), by.get("original")
    threads = args.threads or torch.get_num_threads()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {threads} threads"
    size = "x".join(map(str, args.size))
    print(f"\nTraining step (fwd + bwd + AdamW): {args.model}, {size}, batch {args.batch}; {device}, torch {torch.__version__}, "
          f"median of {args.repeats}{', fast path with bf16 autocast' if args.fast_bf16 or args.device != 'cpu' else ''}")
    print(f"load average (1, 5, 15 min) before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}\n")
    mem = "peak allocated MB" if args.device == "cuda" else "peak RSS MB"
    print(f"| path | s / step | speed vs plain | speed vs original | {mem} | step memory MB | step memory vs plain | first loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        vs_plain = f"{plain['s'] / r['s']:.2f}x" if plain else "-"
        vs_orig = f"{original['s'] / r['s']:.2f}x" if original else "-"
        mem_ratio = f"{r['step_mb'] / plain['step_mb']:.2f}" if plain else "-"
        print(f"| {r['case']} | {r['s']:.3f} | {vs_plain} | {vs_orig} | {r['peak_mb']:.0f} | {r['step_mb']:.0f} | {mem_ratio} | {r['first_loss']:.6g} |")
    if args.json:
        print(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
