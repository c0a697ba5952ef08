"""Trials as local processes that split the cores: a pool of `parallel` long-lived workers, so torch and
MLflow are imported once per worker, not once per trial.

Workers die with the sweep (PR_SET_PDEATHSIG; a worker whose sweep died while it was starting ends at once):
a killed sweep leaves no training running on its own, and the heartbeats it stopped recording let the next
run fail and retry those trials.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import multiprocessing
import os
import signal
from typing import Any

from .trial import run_trial

_PR_SET_PDEATHSIG = 1


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _init_worker(level: int, sweep_pid: int) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: a worker outlives a SIGKILLed sweep until its trial ends
        pass
    # The death signal only covers a parent that dies after it is set. A sweep killed while this worker was
    # still starting (Python, then this module's imports) has already gone: the worker would wait forever on
    # a queue nobody writes, holding its memory. It has been re-parented by then, so it ends here.
    if os.getppid() != sweep_pid:
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the sweep's to handle: it fails and requeues trials
    from ..console import setup_logging

    setup_logging(level <= logging.DEBUG)


def _warm(tracking, storage_url: str) -> float:
    """What every trial's first seconds would otherwise pay in each new process: imports, the tracking and study
    databases' engines, and torch's first optimiser step (it imports torch._dynamo) and first convolution."""
    import time

    t0 = time.perf_counter()
    import torch

    from ..tracking.store import connect
    from .study import storage

    connect(tracking)
    storage(storage_url, heartbeat=False)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 2))
    opt = torch.optim.AdamW(net.parameters())
    net(torch.zeros(2, 1, 8, 8)).sum().backward()
    opt.step()
    return time.perf_counter() - t0


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    """A trial with its number on every log line: two trials' epochs interleave on one terminal."""
    prefix = logging.Filter()
    prefix.filter = lambda record: setattr(record, "msg", f"trial {spec['number']}: {record.msg}") or True
    handlers = logging.getLogger().handlers
    for h in handlers:
        h.addFilter(prefix)
    try:
        return run_trial(spec)
    finally:
        for h in handlers:
            h.removeFilter(prefix)


class LocalLauncher:
    """`submit(spec)` runs a trial in one of the pool's processes; each gets an equal share of the cores."""

    def __init__(self, parallel: int):
        self.parallel = parallel
        self.threads = max(1, cores() // parallel)
        self.pool = concurrent.futures.ProcessPoolExecutor(
            parallel, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
            initargs=(logging.getLogger("imgclf").getEffectiveLevel(), os.getpid()))
        self.warming: list[concurrent.futures.Future] = []

    def warm(self, tracking, storage_url: str) -> None:
        """Start every worker now, while the sweep opens its study and parent run (the imports take a while,
        so each worker takes one of these)."""
        self.warming = [self.pool.submit(_warm, tracking, storage_url) for _ in range(self.parallel)]

    def start_seconds(self) -> list[float]:
        """Each worker's start: once per worker, not per trial."""
        return [f.result() for f in self.warming]

    def overrides(self) -> dict[str, Any]:
        return {"runtime.threads": self.threads}

    def submit(self, spec: dict[str, Any]) -> concurrent.futures.Future:
        return self.pool.submit(_run, spec)

    def close(self, abort: bool = False) -> None:
        if abort:  # the trials in flight are given up: stop them now rather than after their last epoch
            for proc in list(getattr(self.pool, "_processes", {}).values()):
                proc.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)
