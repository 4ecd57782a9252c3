"""Stopping a training run cleanly on SIGINT/SIGTERM: finish the optimizer step, checkpoint, return."""

from __future__ import annotations

import logging
import signal
from typing import Any

logger = logging.getLogger(__name__)


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next optimizer step and returns.

    A second SIGINT raises KeyboardInterrupt at once, for when the user really wants out.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: Python delivers signals to the main thread only
                logger.warning(
                    "training outside the main thread: %s will not stop the run cleanly (no checkpoint first)",
                    signal.Signals(sig).name,
                )
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("signal %d: will save a checkpoint at the next optimizer step and stop", signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
