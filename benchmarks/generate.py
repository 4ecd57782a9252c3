"""Generation throughput of the VLM against the machine's limits: both decoding paths, in one run.

For each batch size the prompt embeddings (image features spliced into the question, what `Med3DVLM.generate`
hands to the LLM) are built once; then both paths decode from them:

- "hf": `llm.generate(inputs_embeds=...)`, Hugging Face's loop (what every greedy call used before);
- "fast": `models.decoding.greedy_generate`, the static-cache decoder `Med3DVLM.generate` now uses.

Every sequence gets the same number of new tokens (min = max, greedy), so every batch does the same work per
sequence. Decoding speed is measured apart from the prompt within each call: a streamer records when each token
arrives, and tokens/s = batch * (N - 1) / (time of token N - time of token 1). (A streamer makes the loop copy
each token to the host, as serving does.) Whether the two paths give the same tokens is checked and printed.

The limits come from the same run: a copy benchmark gives the memory bandwidth (bytes read + written per
second), a large matrix product the arithmetic rate. A decoding step reads every LLM weight once whatever the
batch, so the batch-1 limit is bandwidth / weight bytes; a batch of B is limited by the smaller of B times that
and arithmetic rate / (2 * parameters) per token. (The key/value cache reads are left out of both: at these
prompt lengths they are a few percent of the weights.)

    python benchmarks/generate.py                       # CPU, float32, the embedded SmolLM2-135M
    python benchmarks/generate.py --device cuda --dtype bfloat16 --model med3dvlm_qwen7b --random-llm TOKENIZER_DIR
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _best(fn: Callable[[], Any], repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


class _Clock:
    """A streamer that only notes when each batch of tokens arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def memory_bandwidth(device: str, mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second of `dst.copy_(src)` on buffers far larger than any cache (counting read + write)."""
    n = mib * 2**20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best(lambda: dst.copy_(src), repeats, device)


def matmul_rate(device: str, dtype: torch.dtype, size: int = 2048, repeats: int = 3) -> float:
    """Floating-point operations per second of a square matrix product."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / _best(lambda: a @ b, repeats, device)


def weight_bytes(llm: torch.nn.Module) -> tuple[int, int]:
    """(bytes, parameters) a decoding step reads: every weight once, except an input embedding that is not also
    the output head (a step reads only its B rows)."""
    embed = llm.get_input_embeddings().weight
    head = llm.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    seen, nbytes, count = set(), 0, 0
    for p in llm.parameters():
        if p.data_ptr() in seen or (p.data_ptr() == embed.data_ptr() and not tied):
            continue
        seen.add(p.data_ptr())
        nbytes += p.numel() * p.element_size()
        count += p.numel()
    return nbytes, count


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="med3dvlm_smollm2", help="registered VLM name or a saved VLM directory")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per case (the fastest decoding is kept)")
    parser.add_argument("--paths", nargs="+", default=["hf", "fast"], choices=["hf", "fast"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--random-llm", metavar="TOKENIZER_DIR", default=None,
                        help="build the LLM from its architecture with random weights and this tokenizer (throughput "
                             "does not depend on the weights; for machines without the embedded model)")
    parser.add_argument("--note", default="", help="printed under the table (e.g. what else was running)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import med3dvlm
    from med3dvlm.models import decoding
    from med3dvlm.models.fast import optimize_for_inference

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.random_llm:
        from transformers import AutoTokenizer

        from med3dvlm.models.llm import KNOWN_LLM_CONFIGS

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
    llm, proc = model.llm, model.processor
    size = model.vision.config.input_size
    questions = ["Which organ shows an abnormality?", "Describe the findings of the medical image you see."]

    bandwidth = memory_bandwidth(args.device)
    flops = matmul_rate(args.device, dtype)
    nbytes, nparams = weight_bytes(llm)
    limit_1 = bandwidth / nbytes
    print(f"measured: memory bandwidth {bandwidth / 1e9:.1f} GB/s (copy), matmul {flops / 1e9:.0f} GFLOP/s ({args.dtype}); "
          f"LLM weights read per step {nbytes / 1e6:.0f} MB ({nparams / 1e6:.1f} M parameters) -> batch-1 limit "
          f"{limit_1:.1f} tokens/s", flush=True)

    n = args.new_tokens
    rows = []
    for bs in args.batch_sizes:
        images = torch.rand(bs, 1, *size, device=args.device, dtype=dtype)
        batch = {k: v.to(args.device) for k, v in proc.generation_batch([questions[i % 2] for i in range(bs)]).items()}
        with torch.inference_mode():
            t0 = time.perf_counter()
            embeds = model.embed_inputs(batch["input_ids"], images)
            _sync(args.device)
            encode_s = time.perf_counter() - t0
        mask = batch["attention_mask"]
        limit = min(bs * limit_1, flops / (2 * nparams))
        outputs = {}
        for path in args.paths:
            def call(tokens: int, path: str = path) -> tuple[torch.Tensor, list[float]]:
                clock = _Clock()
                kwargs = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False, "streamer": clock,
                          "eos_token_id": [model.tokenizer.eos_token_id], "pad_token_id": model.tokenizer.pad_token_id}
                _sync(args.device)
                start = time.perf_counter()
                with torch.inference_mode():
                    if path == "hf":
                        out = llm.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
                    else:
                        out = decoding.greedy_generate(llm, embeds, mask, decoding.fast_greedy_plan(llm, kwargs))
                _sync(args.device)
                return out, [start, *clock.times[1:], time.perf_counter()]

            if bs == args.batch_sizes[0]:
                call(2)  # warm-up (lazy initialisation, allocator)
            best = None
            for _ in range(args.repeats):
                out, times = call(n)
                decode_s = times[-2] - times[1]  # token 1 to token N
                if best is None or decode_s < best[1]:
                    best = (times[1] - times[0], decode_s, times[-1] - times[0])
            outputs[path] = out
            first_s, decode_s, call_s = best
            rate = bs * (n - 1) / max(decode_s, 1e-9)
            rows.append({"batch": bs, "path": path, "prompt_s": first_s, "call_s": call_s, "encode_s": encode_s,
                         "decode_tokens_per_s": rate, "call_tokens_per_s": bs * n / call_s, "limit": limit})
            print(f"  batch {bs} {path}: prompt + 1st token {first_s:.2f} s, {n} tokens {call_s:.2f} s, "
                  f"decoding {rate:.1f} tokens/s", flush=True)
        if len(outputs) == 2:
            same = outputs["hf"].tolist() == outputs["fast"].tolist()
            print(f"  batch {bs}: fast tokens identical to hf: {same}", flush=True)
            for r in rows[-2:]:
                r["identical"] = same

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nGeneration benchmark: {args.model}, {device}, {args.dtype}, {n} new tokens per sequence, "
          f"prompt = {model.num_image_tokens} image tokens + question\n")
    print(f"memory bandwidth (copy) {bandwidth / 1e9:.1f} GB/s; matmul {flops / 1e9:.0f} GFLOP/s; "
          f"weights per step {nbytes / 1e6:.0f} MB; batch-1 limit {limit_1:.1f} tokens/s\n")
    base = {r["path"]: r["decode_tokens_per_s"] for r in rows if r["batch"] == args.batch_sizes[0]}
    hf = {r["batch"]: r["decode_tokens_per_s"] for r in rows if r["path"] == "hf"}
    print("| batch | path | prompt + 1st token s | decoding tokens / s | limit tokens / s | fraction of limit "
          f"| vs batch {args.batch_sizes[0]} | vs hf | whole call tokens / s | of which encoder s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        vs_hf = f"{r['decode_tokens_per_s'] / hf[r['batch']]:.2f}x" if r["batch"] in hf else "-"
        print(f"| {r['batch']} | {r['path']} | {r['prompt_s']:.2f} | {r['decode_tokens_per_s']:.1f} | {r['limit']:.1f} "
              f"| {r['decode_tokens_per_s'] / r['limit']:.0%} | {r['decode_tokens_per_s'] / base[r['path']]:.2f}x | {vs_hf} "
              f"| {r['call_tokens_per_s']:.1f} | {r['encode_s']:.2f} |")
    if args.note:
        print(f"\n{args.note}")
    return rows


if __name__ == "__main__":
    main()
