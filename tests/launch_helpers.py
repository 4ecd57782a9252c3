"""Running `med3dvlm` under torchrun from a test: a free rendezvous port, and a run that cannot hang the suite."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_killable(cmd: Sequence[str], env: Mapping[str, str], timeout: float) -> tuple[int, str]:
    """(exit code, stderr) of `cmd`; past `timeout` seconds the test fails and the run is killed with every
    worker process it started (it runs in a session of its own, so not only torchrun dies)."""
    proc = subprocess.Popen(list(cmd), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(cmd[-6:])} did not finish within {timeout:.0f} s")
    return proc.returncode, stderr
