"""Batched serving: concurrent greedy requests share one generate call and get exactly their one-at-a-time answers.

The batcher alone (routing, keys, the batch bound, a failing request), then the `Predictor` with the tiny VLM,
then a live server taking /report, /vqa and /v1/chat/completions at once.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from med3dvlm.batching import MicroBatcher
from med3dvlm.inference import PreparedImage, Predictor

sys.path.insert(0, str(Path(__file__).parent))
from serving_helpers import hu_phantom, live_server, tiny_vlm_dir, write_nifti  # noqa: E402


def at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Each call on its own thread, released together; results (or the exception raised) in order."""
    barrier = threading.Barrier(len(calls))
    out: list[Any] = [None] * len(calls)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            out[i] = calls[i]()
        except Exception as err:  # noqa: BLE001 - the test looks at which exception each call got
            out[i] = err

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


# ------------------------------------------------------------------------------------------ the batcher


class Recorder:
    """A batch function that records each call and answers every item with a value only that item has."""

    def __init__(self, fail_on: object = None) -> None:
        self.calls: list[list[Any]] = []
        self.fail_on = fail_on

    def __call__(self, items: list[Any]) -> list[Any]:
        self.calls.append(list(items))
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"cannot answer {self.fail_on!r}")
        return [("answer", item) for item in items]


def test_concurrent_items_share_one_call_and_each_gets_its_own_result() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=6, window_s=5.0)
    results = at_once([lambda i=i: batcher.submit("k", i) for i in range(6)])
    assert results == [("answer", i) for i in range(6)]
    assert len(run.calls) == 1 and sorted(run.calls[0]) == list(range(6)) and list(batcher.sizes) == [6]


def test_batches_are_bounded_and_keys_never_mixed() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=3, window_s=0.5)
    keys = ["a", "b", "a", "a", "b", "a", "a"]
    results = at_once([lambda i=i, k=k: batcher.submit(k, (k, i)) for i, k in enumerate(keys)])
    assert results == [("answer", (k, i)) for i, k in enumerate(keys)]
    assert all(1 <= len(call) <= 3 for call in run.calls)
    assert all(len({k for k, _ in call}) == 1 for call in run.calls), run.calls
    assert sorted(item for call in run.calls for item in call) == sorted((k, i) for i, k in enumerate(keys))
    assert max(batcher.sizes) > 1  # batching really happened


def test_a_failing_item_fails_alone() -> None:
    run = Recorder(fail_on=2)
    batcher = MicroBatcher(run, max_batch=4, window_s=5.0)
    results = at_once([lambda i=i: batcher.submit("k", i) for i in range(4)])
    assert isinstance(results[2], ValueError) and "cannot answer 2" in str(results[2])
    assert [r for i, r in enumerate(results) if i != 2] == [("answer", i) for i in (0, 1, 3)]
    assert len(run.calls[0]) == 4 and sorted(len(c) for c in run.calls[1:]) == [1, 1, 1, 1]  # the retry, one by one


def test_a_lone_item_waits_only_the_window() -> None:
    batcher = MicroBatcher(Recorder(), max_batch=8, window_s=0.05)
    start = time.monotonic()
    assert batcher.submit("k", 1) == ("answer", 1)
    assert time.monotonic() - start < 2.0
    assert MicroBatcher(Recorder(), max_batch=1, window_s=60.0).submit("k", 1) == ("answer", 1)  # full at once


@pytest.mark.parametrize("announced", [True, False])
def test_a_batch_waits_for_items_still_arriving(announced: bool) -> None:
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=4, window_s=0.1, max_wait_s=10.0)

    def late() -> Any:
        with batcher.arriving() if announced else contextlib.nullcontext():
            time.sleep(0.6)  # a slow read, far past the window
        return batcher.submit("k", "late")

    results = at_once([lambda: batcher.submit("k", "early"), late])
    assert results == [("answer", "early"), ("answer", "late")]
    assert list(batcher.sizes) == ([2] if announced else [1, 1])


def test_a_batch_function_giving_too_few_results_is_an_error_for_each() -> None:
    batcher = MicroBatcher(lambda items: [], max_batch=2, window_s=5.0)
    results = at_once([lambda i=i: batcher.submit("k", i) for i in range(2)])
    assert all(isinstance(r, RuntimeError) for r in results)


# ------------------------------------------------------------------------------------------ the predictor

QUESTIONS = [None, "Which organ is abnormal?", "Is there a cyst in the left kidney?", None, "Which plane is this image?"]
TOKENS = 8


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("batching")
    scans = [write_nifti(root / f"scan{i}.nii.gz", hu_phantom(seed=i)) for i in range(len(QUESTIONS))]
    return {"vlm": tiny_vlm_dir(root / "vlm", tiny_tokenizer), "scans": scans}


@pytest.fixture(scope="module")
def alone(files: dict[str, Any]) -> Predictor:
    """The reference: no batching, one generate call per request."""
    return Predictor.from_dir(files["vlm"])


@pytest.fixture(scope="module")
def prepared(alone: Predictor, files: dict[str, Any]) -> list[PreparedImage]:
    return [alone.prepare(p) for p in files["scans"]]


@pytest.fixture(scope="module")
def sequential(alone: Predictor, prepared: list[PreparedImage]) -> list[dict[str, Any]]:
    out = [alone.predict(p, q, max_new_tokens=TOKENS).to_dict() for p, q in zip(prepared, QUESTIONS)]
    # Different volumes and questions give different texts, so a result handed to the wrong request shows.
    assert len({o["text"] for o in out}) >= 4, [o["text"] for o in out]
    return out


def without_timings(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "timings"}


def test_concurrent_predictions_equal_sequential_ones(files: dict[str, Any], prepared: list[PreparedImage],
                                                      sequential: list[dict[str, Any]]) -> None:
    batched = Predictor.from_dir(files["vlm"], max_batch=len(QUESTIONS), batch_window_ms=5000)
    # Paths for some, so reading before queueing is exercised too; a seed on one (greedy ignores it).
    images: list[Any] = [files["scans"][0], prepared[1], files["scans"][2], prepared[3], prepared[4]]
    seeds = [None, 7, None, None, None]
    results = at_once([lambda i=i: batched.predict(images[i], QUESTIONS[i], max_new_tokens=TOKENS, seed=seeds[i])
                       for i in range(len(QUESTIONS))])
    assert list(batched.batcher.sizes) == [len(QUESTIONS)]  # one generate call for all of them
    for i, (result, reference) in enumerate(zip(results, sequential)):
        got = result.to_dict()
        expected = {**reference, "generation": {**reference["generation"], "seed": seeds[i]}}
        assert without_timings(got) == without_timings(expected), i
        assert got["timings"]["batch_size"] == len(QUESTIONS) and got["timings"]["queue_s"] >= 0


def test_different_lengths_and_sampling_are_not_batched_together(files: dict[str, Any], alone: Predictor,
                                                                 prepared: list[PreparedImage]) -> None:
    batched = Predictor.from_dir(files["vlm"], max_batch=4, batch_window_ms=1500)
    calls = [
        lambda: batched.predict(prepared[0], QUESTIONS[0], max_new_tokens=4),
        lambda: batched.predict(prepared[1], QUESTIONS[1], max_new_tokens=9),
        lambda: batched.predict(prepared[2], QUESTIONS[2], max_new_tokens=4),
        lambda: batched.predict(prepared[3], None, max_new_tokens=6, do_sample=True, seed=3),
    ]
    results = at_once(calls)
    expected = [
        alone.predict(prepared[0], QUESTIONS[0], max_new_tokens=4),
        alone.predict(prepared[1], QUESTIONS[1], max_new_tokens=9),
        alone.predict(prepared[2], QUESTIONS[2], max_new_tokens=4),
        alone.predict(prepared[3], None, max_new_tokens=6, do_sample=True, seed=3),
    ]
    assert [r.text for r in results] == [e.text for e in expected]
    assert sorted(batched.batcher.sizes) == [1, 2]  # the two 4-token requests together; the sample never queued
    assert "batch_size" not in results[3].timings


def test_a_request_that_cannot_be_generated_fails_alone(files: dict[str, Any], alone: Predictor,
                                                        prepared: list[PreparedImage],
                                                        sequential: list[dict[str, Any]]) -> None:
    # A volume not prepared at the model's size (a caller's own tensor): the encoder and projector refuse it.
    bad = dataclasses.replace(prepared[0], tensor=prepared[0].tensor[:, ::2, ::2, ::2].contiguous())
    with pytest.raises(RuntimeError):
        alone.predict(bad, QUESTIONS[0], max_new_tokens=TOKENS)
    batched = Predictor.from_dir(files["vlm"], max_batch=3, batch_window_ms=5000)
    results = at_once([lambda: batched.predict(prepared[0], QUESTIONS[0], max_new_tokens=TOKENS),
                       lambda: batched.predict(bad, QUESTIONS[2], max_new_tokens=TOKENS),
                       lambda: batched.predict(prepared[1], QUESTIONS[1], max_new_tokens=TOKENS)])
    assert isinstance(results[1], RuntimeError)
    assert [results[0].text, results[2].text] == [sequential[0]["text"], sequential[1]["text"]]


def test_max_batch_one_does_not_batch(files: dict[str, Any]) -> None:
    assert Predictor.from_dir(files["vlm"], max_batch=1).batcher is None


# ------------------------------------------------------------------------------------------ the server


@pytest.fixture
def server(files: dict[str, Any]) -> Iterator[tuple[str, Predictor]]:
    pytest.importorskip("uvicorn")
    from med3dvlm.api import create_app

    predictor = Predictor.from_dir(files["vlm"], max_batch=3, batch_window_ms=5000)
    with live_server(create_app(predictor, max_upload_mb=2, max_new_tokens_limit=32)) as url:
        yield url, predictor


def test_report_vqa_and_chat_completions_at_once_equal_sequential(server: tuple[str, Predictor], files: dict[str, Any],
                                                                  sequential: list[dict[str, Any]]) -> None:
    import httpx

    url, predictor = server
    scans = files["scans"]

    def report() -> str:
        r = httpx.post(f"{url}/report", files={"file": (scans[0].name, scans[0].read_bytes())},
                       data={"max_new_tokens": str(TOKENS)}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["text"]

    def vqa() -> str:
        r = httpx.post(f"{url}/vqa", files={"file": (scans[1].name, scans[1].read_bytes())},
                       data={"question": QUESTIONS[1], "max_new_tokens": str(TOKENS)}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["text"]

    def chat() -> str:
        part = {"type": "file", "file": {"file_data": base64.b64encode(scans[2].read_bytes()).decode(), "filename": scans[2].name}}
        body = {"model": "vlm", "max_completion_tokens": TOKENS,
                "messages": [{"role": "user", "content": [part, {"type": "text", "text": QUESTIONS[2]}]}]}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    assert at_once([report, vqa, chat]) == [sequential[i]["text"] for i in range(3)]
    assert list(predictor.batcher.sizes) == [3]


def test_a_request_still_being_received_joins_the_batch(files: dict[str, Any], sequential: list[dict[str, Any]]) -> None:
    """The middleware counts a request from its first byte: a batch waits for an upload still on the wire."""
    pytest.importorskip("uvicorn")
    import httpx

    from med3dvlm.api import create_app

    predictor = Predictor.from_dir(files["vlm"], max_batch=2, batch_window_ms=10, batch_max_wait_ms=20000)
    scans = files["scans"]
    with live_server(create_app(predictor, max_upload_mb=2, max_new_tokens_limit=32)) as url:
        slow = httpx.Request("POST", f"{url}/vqa", files={"file": (scans[1].name, scans[1].read_bytes())},
                             data={"question": QUESTIONS[1], "max_new_tokens": str(TOKENS)})
        body = slow.read()
        headers = {"content-type": slow.headers["content-type"]}

        def trickle() -> Iterator[bytes]:
            yield body[: len(body) // 2]
            time.sleep(1.0)  # far past the window: without the middleware the other request would run alone
            yield body[len(body) // 2:]

        def late() -> str:
            r = httpx.post(f"{url}/vqa", content=trickle(), headers=headers, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["text"]

        def prompt() -> str:
            time.sleep(0.3)  # after the slow upload has begun
            r = httpx.post(f"{url}/report", files={"file": (scans[0].name, scans[0].read_bytes())},
                           data={"max_new_tokens": str(TOKENS)}, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["text"]

        assert at_once([late, prompt]) == [sequential[1]["text"], sequential[0]["text"]]
    assert list(predictor.batcher.sizes) == [2]
