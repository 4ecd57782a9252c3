"""Encoder speed and memory: DCFormer-small with and without the fast inference path, ViT3D, a training step.

Each case runs in its own process so peak memory is measured cleanly: on CPU as the growth of the peak
resident set size over the process's size once the model (and optimizer) and input exist, i.e. the
activation memory of a call; on CUDA as torch's peak allocation during the timed calls.
Times are the median of `--repeats` calls after one warm-up call.

    python benchmarks/encoder.py               # the full table (a few minutes on 2 cores)
    python benchmarks/encoder.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time

import torch

CASES = {
    # name: (model, input D H W, batch, mode)
    "dcformer_small eval": ("dcformer_small", (128, 256, 256), 1, "eval"),
    "dcformer_small eval, fast path": ("dcformer_small", (128, 256, 256), 1, "fast"),
    "dcformer_small eval, fast path bf16": ("dcformer_small", (128, 256, 256), 1, "fast-bf16"),
    "vit3d_base eval": ("vit3d_base", (32, 256, 256), 1, "eval"),
    "dcformer_small train step": ("dcformer_small", (128, 256, 256), 2, "train"),
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _run_case(name: str, device: str, repeats: int, queue: mp.Queue) -> None:
    import med3dvlm
    from med3dvlm.models.fast import optimize_for_inference

    model_name, size, batch, mode = CASES[name]
    torch.manual_seed(0)
    model = med3dvlm.create_model(model_name).to(device)
    x = torch.rand(batch, 1, *size, device=device)
    if mode == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = sum(o.float().square().mean() for o in model(x)[-2:])
            loss.backward()
            optimizer.step()
    else:
        model.eval()
        if mode.startswith("fast"):
            model = optimize_for_inference(model, dtype=torch.bfloat16 if mode.endswith("bf16") else None)

        def step():
            with torch.inference_mode():
                model(x)

    base = _rss_mb()  # model, optimizer state and input already allocated
    step()  # warm-up: oneDNN picks its kernels, the allocator grows
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
    queue.put({"case": name, "ms": statistics.median(times), "peak_mb": peak, "batch": batch})


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    ctx = mp.get_context("spawn")
    rows = []
    for name in args.cases:
        queue = ctx.Queue()
        proc = ctx.Process(target=_run_case, args=(name, args.device, args.repeats, queue))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            print(f"{name}: failed (exit code {proc.exitcode})", file=sys.stderr)
            continue
        rows.append(queue.get())
        print(f"  done: {name}", file=sys.stderr)

    base = next((r["ms"] for r in rows if r["case"] == "dcformer_small eval"), None)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nEncoder benchmark ({device}, torch {torch.__version__}, median of {args.repeats})\n")
    print("| case | input | batch | ms / call | ms / volume | peak MB | speed vs dcformer_small eval |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        size = "x".join(map(str, CASES[r["case"]][1]))
        ratio = f"{base / r['ms']:.2f}x" if base else "-"
        print(f"| {r['case']} | {size} | {r['batch']} | {r['ms']:.0f} | {r['ms'] / r['batch']:.0f} | {r['peak_mb']:.0f} | {ratio} |")
    if args.json:
        print(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
