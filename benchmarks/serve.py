"""Batched serving: 1 client sending 8 requests one after another against 8 clients sending them at once.

A real `med3dvlm serve` runs in a subprocess with `--max-batch` (default 8); the clients are threads here. The
same 8 requests (different volumes; reports through /report, questions through /vqa, alternating) are sent first
sequentially, then all at once, and both rounds are timed from the first request sent to the last answer
received. Printed: each round's wall time, requests per second and mean latency, the batch sizes the server
reports (`timings.batch_size`), whether every answer is the same text in both rounds, and the speedup of the
concurrent round over the sequential one. A request before the rounds warms the server up and is not timed.

The model is the quickstart's (`runs/quickstart/model`, `med3dvlm quickstart`). Without it, a `med3dvlm_smollm2`
with the quickstart's small encoder is built (random vision encoder and projector, the embedded SmolLM2-135M),
saved to a temporary folder and served; the script says so. Volumes are the quickstart's phantom scans when its
data folder exists, else random arrays at the encoder's input size.

    python benchmarks/serve.py                                # the quickstart model, 8 clients, up to 256 new tokens
    python benchmarks/serve.py --threads 1 --max-new-tokens 16 --note "a training run on the same cores"
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

QUICKSTART = Path("runs/quickstart")
QUESTIONS = ["In which plane is this CT image acquired?", "Which contrast phase is this CT image?",
             "Which organ shows an abnormality?", "Is there a lesion in the liver?"]


def fallback_model(folder: Path) -> Path:
    """A `med3dvlm_smollm2` with the quickstart's encoder and projector sizes, untrained apart from the LLM."""
    import torch

    import med3dvlm
    from med3dvlm.quickstart import ENCODER

    torch.manual_seed(0)
    model = med3dvlm.create_model("med3dvlm_smollm2", vision_overrides=dict(ENCODER),
                                  projector_overrides={"low_tokens_out": [8, 8], "high_tokens_out": [4, 8]})
    model.save_pretrained(folder)
    return folder


def volumes(data: Path, n: int, size: list[int], folder: Path) -> list[Path]:
    """`n` different scans: the quickstart's phantom volumes when present, else random arrays saved as .npy."""
    found = sorted((data / "M3D_Cap_npy").rglob("*.npy")) if data.is_dir() else []
    if len(found) >= n:
        step = len(found) // n  # spread over the set rather than n neighbours of one case
        return found[::step][:n]
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        path = folder / f"random{i}.npy"
        np.save(path, rng.random(size, dtype=np.float32))
        out.append(path)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    command = [sys.executable, "-m", "med3dvlm", "serve", "-m", str(model), "--port", str(port),
               "--max-batch", str(args.max_batch), "--batch-window-ms", str(args.window_ms),
               "--max-new-tokens", str(args.max_new_tokens)]
    return subprocess.Popen(command, env=env)


def wait_healthy(client: Any, url: str, server: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            if client.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become healthy")


def send(client: Any, url: str, path: Path, question: str | None) -> dict[str, Any]:
    """One request; its answer and its latency."""
    files = {"file": (path.name, path.read_bytes(), "application/octet-stream")}
    start = time.perf_counter()
    if question is None:
        r = client.post(f"{url}/report", files=files, timeout=3600)
    else:
        r = client.post(f"{url}/vqa", files=files, data={"question": question}, timeout=3600)
    seconds = time.perf_counter() - start
    if r.status_code != 200:
        raise SystemExit(f"{r.status_code}: {r.text}")
    body = r.json()
    return {"text": body["text"], "latency_s": seconds, "batch_size": body["timings"].get("batch_size", 1)}


def sequential(url: str, requests: list[tuple[Path, str | None]]) -> tuple[float, list[dict[str, Any]]]:
    import httpx

    with httpx.Client() as client:
        start = time.perf_counter()
        results = [send(client, url, p, q) for p, q in requests]
        return time.perf_counter() - start, results


def concurrent(url: str, requests: list[tuple[Path, str | None]]) -> tuple[float, list[dict[str, Any]]]:
    import httpx

    results: list[Any] = [None] * len(requests)
    barrier = threading.Barrier(len(requests) + 1)

    def client_thread(i: int) -> None:
        with httpx.Client() as client:
            barrier.wait()
            try:
                results[i] = send(client, url, *requests[i])
            except BaseException as err:  # noqa: BLE001 - reported below, after every thread ended
                results[i] = err

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise SystemExit(f"{len(failed)} concurrent request(s) failed, the first: {failed[0]!r}")
    return seconds, results


def row(name: str, clients: int, seconds: float, results: list[dict[str, Any]]) -> str:
    sizes = sorted(int(r["batch_size"]) for r in results)
    mean = sum(r["latency_s"] for r in results) / len(results)
    return (f"| {name} | {clients} | {seconds:.2f} | {len(results) / seconds:.3f} | {mean:.2f} | "
            f"{', '.join(map(str, sizes))} |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=QUICKSTART / "model", help="a saved VLM folder")
    parser.add_argument("--data", type=Path, default=QUICKSTART / "data", help="the quickstart's data folder (volumes)")
    parser.add_argument("--clients", type=int, default=8, help="requests per round, all at once in the concurrent one")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    parser.add_argument("--window-ms", type=float, default=10.0, help="the server's --batch-window-ms")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the server's --max-new-tokens (its default)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the server (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    parser.add_argument("--note", default="", help="printed under the table (e.g. what else was running)")
    args = parser.parse_args(argv)

    import httpx

    with tempfile.TemporaryDirectory(prefix="med3dvlm-bench-serve-") as tmp:
        model = args.model
        origin = f"the saved model {model}"
        if not (model / "config.json").is_file():
            model = fallback_model(Path(tmp) / "model")
            origin = (f"NO TRAINED MODEL at {args.model}: a med3dvlm_smollm2 with the quickstart's encoder sizes, random "
                      "vision encoder and projector, the embedded SmolLM2-135M")
        config = json.loads((model / "config.json").read_text())
        size = config.get("vision_overrides", {}).get("input_size", [32, 64, 64])
        scans = volumes(args.data, args.clients, size, Path(tmp))
        requests = [(p, None if i % 2 == 0 else QUESTIONS[(i // 2) % len(QUESTIONS)]) for i, p in enumerate(scans)]

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(model, port, args)
        try:
            with httpx.Client() as client:
                wait_healthy(client, url, server)
                send(client, url, *requests[0])  # warm-up, not timed
            seq_s, seq = sequential(url, requests)
            conc_s, conc = concurrent(url, requests)
        finally:
            server.terminate()
            server.wait(30)

    same = sum(a["text"] == b["text"] for a, b in zip(seq, conc))
    speedup = seq_s / conc_s
    print(f"\nServing benchmark: {origin}; {args.clients} requests ({len([r for r in requests if r[1] is None])} /report, "
          f"{len([r for r in requests if r[1] is not None])} /vqa), --max-new-tokens {args.max_new_tokens}, "
          f"--max-batch {args.max_batch}, --batch-window-ms {args.window_ms:g}, OMP_NUM_THREADS={args.threads or 'unset'}, "
          f"{os.cpu_count()} CPUs\n")
    print("| round | clients | wall s | requests / s | mean latency s | batch sizes seen |")
    print("|---|---:|---:|---:|---:|---|")
    print(row("sequential", 1, seq_s, seq))
    print(row("concurrent", args.clients, conc_s, conc))
    print(f"\nsame text in both rounds: {same}/{len(seq)}")
    print(f"speedup of {args.clients} concurrent over {args.clients} sequential requests: {speedup:.2f}x")
    if args.note:
        print(f"note: {args.note}")
    result = {"model": origin, "sequential_s": seq_s, "concurrent_s": conc_s, "speedup": speedup, "same_text": same,
              "sequential": seq, "concurrent": conc, "args": {k: str(v) for k, v in vars(args).items()}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
