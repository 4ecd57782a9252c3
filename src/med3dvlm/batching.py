"""Concurrent requests gathered into batches, so a server decodes them in one call (`med3dvlm serve --max-batch`).

Why: a decoding step reads every LLM weight once whatever the batch, so on a memory-bound machine B answers
decoded together cost little more than one. Requests arrive on separate threads (FastAPI runs each sync route
in its thread pool), each blocked until its answer is ready; `MicroBatcher.submit` is that blocking call.

How, with no background thread: each request joins a queue and waits. The oldest waiting request leads when no
batch is running: it waits until `window_s` after its own arrival (or until `max_batch` requests with its key
are queued), longer while other requests are still being read (`MicroBatcher.arriving`; uploads sent together
finish reading tens of milliseconds apart on a busy CPU) but never past `max_wait_s` after its arrival, takes up to `max_batch` queued requests with its key in arrival order, runs them as one call, and
hands each its own result. Then the next oldest waiting request leads. Under load the window has long passed by
the time a request leads, so gathering adds no wait; a lone request waits at most `window_s`. One batch runs at
a time: the model is not re-entrant.

Requests with different keys (settings that cannot share a call) are never mixed. When a batch call raises, its
requests are run again one at a time, so a request that cannot be answered fails alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class _Arrival:
    """One request on its way to `submit` (see `MicroBatcher.arriving`); settled once, when it joins or gives up."""

    def __init__(self, batcher: MicroBatcher) -> None:
        self._batcher: MicroBatcher | None = batcher

    def settle(self) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            with batcher._cond:
                batcher._arriving -= 1
                batcher._cond.notify_all()


# The arrivals of the running request (a context variable: FastAPI copies the context into the route's thread, so
# an arrival opened by a middleware is settled by the `submit` of the same request).
_ARRIVALS: contextvars.ContextVar[tuple[_Arrival, ...]] = contextvars.ContextVar("med3dvlm_batch_arrivals", default=())


def settle_arrivals() -> None:
    """The running request will not `submit` (it streams, samples, or failed): batches stop waiting for it."""
    for arrival in _ARRIVALS.get():
        arrival.settle()


class _Job:
    __slots__ = ("key", "item", "arrived", "done", "result", "error")

    def __init__(self, key: Hashable, item: Any) -> None:
        self.key, self.item, self.arrived = key, item, time.monotonic()
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class MicroBatcher(Generic[T, R]):
    """Runs `run(items) -> results` (one result per item, in order) over batches of concurrently submitted items.

    Args:
        run: answers a batch; every item in a call was submitted with the same key.
        max_batch: the most items in one call (1: every item alone, no waiting).
        window_s: how long the oldest waiting item waits for company before its batch starts.
        max_wait_s: how long it may wait in all for items still `arriving` (default `window_s`: not longer).
    """

    def __init__(self, run: Callable[[list[T]], Sequence[R]], max_batch: int, window_s: float,
                 max_wait_s: float | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if window_s < 0:
            raise ValueError(f"the batch window must not be negative, got {window_s}")
        self._run = run
        self.max_batch = int(max_batch)
        self.window_s = float(window_s)
        self.max_wait_s = max(self.window_s, float(max_wait_s if max_wait_s is not None else window_s))
        self._arriving = 0
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._busy = False
        # Sizes of the batches run, most recent last; bounded so a long-running server does not grow it.
        self.sizes: deque[int] = deque(maxlen=1024)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Wrap a request from its start (receiving, reading the upload) to its `submit`: a batch being gathered
        waits for it, up to `max_wait_s`. Its `submit` in the same context ends the wait as it joins the queue;
        `settle_arrivals` ends it for a request that will not submit; leaving the block ends it in any case."""
        arrival = _Arrival(self)
        with self._cond:
            self._arriving += 1
        token = _ARRIVALS.set((*_ARRIVALS.get(), arrival))
        try:
            yield
        finally:
            _ARRIVALS.reset(token)
            arrival.settle()

    def submit(self, key: Hashable, item: T) -> R:
        """`item`'s result, computed in a batch with other items of the same `key`; its own exception if it failed."""
        job = _Job(key, item)
        batch: list[_Job] | None = None
        leading = False
        with self._cond:
            self._queue.append(job)
            settle_arrivals()  # in the same locked step: a leader never sees this request neither arriving nor queued
            self._cond.notify_all()  # a leader gathering this key may now have a full batch
            try:
                while not job.done:
                    # A job taken into a running batch has left the queue, so only a waiting job can lead.
                    if not self._busy and self._queue and self._queue[0] is job:
                        leading = True
                        batch = self._gather(job)
                        break
                    self._cond.wait()
            except BaseException:  # interrupted while waiting or gathering: leave nothing that blocks the others
                if job in self._queue:
                    self._queue.remove(job)
                if leading and batch is None:  # interrupted in `_gather`, before anything was taken
                    self._busy = False
                self._cond.notify_all()
                raise
        if batch is not None:
            self._execute(batch)
        if job.error is not None:
            raise job.error
        return job.result

    def _gather(self, leader: _Job) -> list[_Job]:
        """Called holding the lock: wait out the window, then take the batch off the queue."""
        self._busy = True
        window_end = leader.arrived + self.window_s
        last = leader.arrived + self.max_wait_s
        while True:
            same = [j for j in self._queue if j.key == leader.key]
            now = time.monotonic()
            if len(same) >= self.max_batch or now >= last or (now >= window_end and not self._arriving):
                break
            self._cond.wait((window_end if now < window_end else last) - now)
        batch = same[: self.max_batch]
        taken = {id(j) for j in batch}
        self._queue = [j for j in self._queue if id(j) not in taken]
        return batch

    def _execute(self, batch: list[_Job]) -> None:
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            outcomes = self._outcomes([j.item for j in batch])
        except BaseException as err:  # e.g. KeyboardInterrupt in the leader's thread: no waiter may hang
            outcomes = [(None, err)] * len(batch)
            raise
        finally:
            with self._cond:
                for job, (result, error) in zip(batch, outcomes):
                    job.result, job.error, job.done = result, error, True
                self._busy = False
                self.sizes.append(len(batch))
                self._cond.notify_all()

    def _outcomes(self, items: list[T]) -> list[tuple[Any, BaseException | None]]:
        try:
            results = list(self._run(items))
            if len(results) != len(items):
                raise RuntimeError(f"a batch of {len(items)} gave {len(results)} results")
            return [(r, None) for r in results]
        except Exception as err:
            if len(items) == 1:
                return [(None, err)]
            logger.info("a batch of %d failed (%s); running its requests one at a time", len(items), type(err).__name__)
            return [self._outcomes([item])[0] for item in items]
