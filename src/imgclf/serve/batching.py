"""Dynamic batching: requests that arrive together are scored in one forward pass.

A request's images wait in a bounded queue; one scorer task takes the first waiting request, gathers more
for at most `max_wait_s` or until `max_batch` images, and runs the model in a worker thread (the event loop
keeps accepting requests meanwhile). A request that would overfill the queue is refused at once (`QueueFull`:
the service answers 503 with Retry-After) instead of waiting without bound.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np


class QueueFull(RuntimeError):
    """More images waiting than the queue holds."""


@dataclass
class _Waiting:
    images: np.ndarray  # uint8 (N, C, H, W) or float32 in [0, 1]
    future: asyncio.Future
    since: float = field(default_factory=time.perf_counter)


# score(images) -> (probabilities (N, K), what answered): the model is chosen per batch, so a swap never
# splits one batch between two models.
Scorer = Callable[[np.ndarray], tuple[np.ndarray, Any]]


class Batcher:
    def __init__(self, score: Scorer, max_batch: int, max_wait_s: float, queue_size: int,
                 on_batch: Optional[Callable[[int, float], None]] = None):
        self.score, self.max_batch, self.max_wait_s, self.queue_size = score, max_batch, max_wait_s, queue_size
        self.on_batch = on_batch  # (images in the batch, seconds its forward pass took): for /metrics
        self.waiting: asyncio.Queue[_Waiting] = asyncio.Queue()
        self.queued = 0  # images waiting (a request counts all its images)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="scorer")  # one forward pass at a time
        self.task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=True)

    async def submit(self, images: np.ndarray) -> tuple[np.ndarray, Any]:
        """The images' probabilities and what answered, once their batch is scored."""
        if self.queued + len(images) > self.queue_size:
            raise QueueFull(f"{self.queued} images already wait (serve.queue_size {self.queue_size})")
        item = _Waiting(images, asyncio.get_running_loop().create_future())
        self.queued += len(images)
        self.waiting.put_nowait(item)
        return await item.future

    async def _gather(self) -> list[_Waiting]:
        batch = [await self.waiting.get()]
        size, deadline = len(batch[0].images), time.perf_counter() + self.max_wait_s
        while size < self.max_batch:
            try:
                item = self.waiting.get_nowait()  # already waiting: no reason to sleep
            except asyncio.QueueEmpty:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.waiting.get(), left)
                except TimeoutError:
                    break
            batch.append(item)
            size += len(item.images)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            self.queued -= sum(len(b.images) for b in batch)
            live = [b for b in batch if not b.future.done()]  # a client that hung up is not scored
            if not live:
                continue
            images = np.concatenate([b.images for b in live]) if len(live) > 1 else live[0].images
            t0 = time.perf_counter()
            try:
                probs, answered = await loop.run_in_executor(self.pool, self.score, images)
            except Exception as exc:  # noqa: BLE001 - every request of the batch learns why
                for b in live:
                    if not b.future.done():
                        b.future.set_exception(exc)
                continue
            if self.on_batch is not None:
                self.on_batch(len(images), time.perf_counter() - t0)
            start = 0
            for b in live:
                n = len(b.images)
                if not b.future.done():
                    b.future.set_result((probs[start:start + n], answered))
                start += n
