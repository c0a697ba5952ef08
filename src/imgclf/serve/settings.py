"""`serve`: the online service `imgclf serve` runs (not a result section: nothing here changes a model)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..schema import bounded


@dataclass(frozen=True)
class ShadowConfig:
    """--shadow: a second model scores what the service answered, off the response path (shadow.py)."""

    # Batches waiting for the shadow model; past this a batch is dropped (counted): answers never wait for it.
    queue: int = bounded(64, ge=1, le=100_000)
    flush_s: float = bounded(30.0, gt=0.0, le=86400.0)  # how often the shadow run's metrics and files are written
    keep_images: int = bounded(36, ge=0, le=10_000)  # disagreeing images kept per run (the latest), for the report
    max_answers: int = bounded(100_000, ge=0, le=10_000_000)  # rows of answers.csv per run; later ones only counted


@dataclass(frozen=True)
class ServeConfig:
    # Requests that wait while a forward pass runs are scored together in the next one, up to this many images.
    max_batch_size: int = bounded(64, ge=1, le=4096)
    # How long the first waiting request may wait for others to join it. 0: not at all (batches form from what
    # piles up during the pass before, so a lone request pays nothing; bench/serve.py measured both).
    max_wait_ms: float = bounded(0.0, ge=0.0, le=1000.0)
    # Images waiting to be scored; a request that would pass it is answered 503 with Retry-After.
    queue_size: int = bounded(1024, ge=1, le=1_000_000)
    # torch threads for the forward pass; 0: every core. One by default: the event loop, decoding and the clients
    # on the same machine need cores too (bench/serve.py, 2 cores, concurrency 32: about 1.8x the requests/s of 0).
    threads: int = bounded(1, ge=0, le=4096)
    poll_s: float = bounded(10.0, gt=0.0, le=86400.0)  # how often the followed alias (e.g. @production) is read
    top_k: int = bounded(3, ge=1, le=1000)
    max_body_mb: float = bounded(16.0, gt=0.0, le=1024.0)  # a larger request body is refused (413)
    max_files: int = bounded(256, ge=1, le=100_000)  # images in one multipart request
    body_timeout_s: float = bounded(30.0, gt=0.0, le=3600.0)  # a client this slow to send its body gets 408
    shadow: ShadowConfig = field(default_factory=ShadowConfig)
