"""Generation throughput of the VLM: tokens/s at batch 1 against batch 8 and 16, in one run.

The embedded default (DCFormer-small at 128x256x256 + 2xMLP-Mixer-H + SmolLM2-135M-Instruct) generates a
fixed number of new tokens per sequence (min = max, greedy), so every batch size produces the same work per
sequence. Reported: wall time of the whole call (encoder + prefill + decoding), generated tokens per second,
and the speed-up over batch 1. The encoder's share is measured separately.

    python benchmarks/generate.py                     # CPU, float32
    python benchmarks/generate.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="med3dvlm_smollm2", help="registered VLM name or a saved VLM directory")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--random-llm", metavar="TOKENIZER_DIR", default=None,
                        help="build the LLM from its architecture with random weights and this tokenizer (throughput "
                             "does not depend on the weights; for machines without the embedded model)")
    args = parser.parse_args(argv)

    import med3dvlm
    from med3dvlm.models.fast import optimize_for_inference

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.random_llm:
        from transformers import AutoTokenizer

        from med3dvlm.models.vlm import KNOWN_LLM_CONFIGS

        config = med3dvlm.get_config(args.model)
        with torch.device(args.device):  # a 7B LLM is built straight on the GPU
            model = med3dvlm.create_model(args.model, llm_config=dict(KNOWN_LLM_CONFIGS[config.llm]))
        model.set_tokenizer(AutoTokenizer.from_pretrained(args.random_llm))
    elif "/" in args.model:
        model = med3dvlm.from_pretrained(args.model)
    else:
        model = med3dvlm.create_model(args.model)
    model = model.eval().to(args.device)
    model.llm.to(dtype)
    model.projector.to(dtype)
    model.vision = optimize_for_inference(model.vision, dtype=None if dtype == torch.float32 else dtype)
    proc = model.processor
    size = model.vision.config.input_size
    questions = ["Which organ shows an abnormality?", "Describe the findings of the medical image you see."]

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    rows = []
    for bs in args.batch_sizes:
        images = torch.rand(bs, 1, *size, device=args.device, dtype=dtype)
        batch = {k: v.to(args.device) for k, v in proc.generation_batch([questions[i % 2] for i in range(bs)]).items()}
        run = lambda: model.generate(images, **batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     do_sample=False)
        run()  # warm-up
        times, enc = [], []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.encode_images(images)
            sync()
            enc.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = run()
            sync()
            times.append(time.perf_counter() - t0)
        assert out.shape == (bs, args.new_tokens), out.shape
        t = statistics.median(times)
        rows.append({"batch": bs, "seconds": t, "encode_s": statistics.median(enc), "tokens_per_s": bs * args.new_tokens / t})
        print(f"  batch {bs}: {t:.2f} s", flush=True)

    base = rows[0]["tokens_per_s"]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nGeneration benchmark: {args.model}, {device}, {args.dtype}, {args.new_tokens} new tokens per sequence, "
          f"prompt = {model.num_image_tokens} image tokens + question\n")
    print("| batch | s / call | of which encoder | generated tokens / s | vs batch 1 |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['seconds']:.2f} | {r['encode_s']:.2f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
