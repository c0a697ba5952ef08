"""Shadow traffic: `imgclf serve --shadow challenger` scores every answered batch on a second model too, off the
response path, and records how the two agreed in an MLflow run of kind `shadow`.

The primary scorer hands each batch (its images and probabilities, the model that answered, its forward
seconds) to a bounded queue and goes on; a thread of its own scores the batch on the shadow model and counts.
A full queue drops the batch (counted in the run and in /metrics): the shadow may fall behind, an answer
never waits for it. One run per pair of versions, tagged with both (registry/shadow.py names the tags): when
either alias moves, that run ends FINISHED and the new pair gets a run of its own; a shadow that is the
served version is not scored. Every serve.shadow.flush_s, and when the service stops, the run's metrics
(images, agreed, agreement, dropped, both forward latencies) and files (shadow/summary.json, answers.csv,
disagreements.npz, disagreements.png) are written: a killed service loses at most that much.
"""

from __future__ import annotations

import collections
import copy
import csv
import dataclasses
import hashlib
import logging
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..config import Tracking
from ..console import one_line
from ..registry.shadow import (
    ARTIFACTS,
    PRIMARY_NAME,
    PRIMARY_URI,
    PRIMARY_VERSION,
    RUN_KIND,
    SHADOW_NAME,
    SHADOW_URI,
    SHADOW_VERSION,
    experiment_name,
)
from .following import Follower, Served
from .settings import ShadowConfig

log = logging.getLogger("imgclf")


LATENCY_WINDOW = 100_000  # batches whose forward-pass times a run's percentiles are of


def percentile_ms(seconds, q: float) -> float:
    return float(np.percentile(seconds, q) * 1000.0) if seconds else 0.0


class Tally:
    """What one (primary, shadow) pair of versions did on the same images."""

    def __init__(self, primary: Served, shadow: Served, settings: ShadowConfig):
        self.primary, self.shadow, self.settings = primary, shadow, settings
        self.classes = (list(primary.model.classes), list(shadow.model.classes))
        where = {c: j for j, c in enumerate(self.classes[1])}
        self.same = np.array([where.get(c, -1) for c in self.classes[0]])  # primary class i is shadow class same[i]
        self.confusion = np.zeros((len(self.classes[0]), len(self.classes[1])), np.int64)
        self.images = self.agreed = self.dropped = 0
        self.batches = 0
        # forward pass per batch, primary and shadow: the latest LATENCY_WINDOW, so a service up for weeks keeps
        # a bounded tally (the percentiles are of those)
        self.seconds = (collections.deque(maxlen=LATENCY_WINDOW), collections.deque(maxlen=LATENCY_WINDOW))
        self.answers: list[tuple] = []
        # the latest distinct images they disagreed on: (image, both answers, times seen)
        self.disagreements: collections.OrderedDict = collections.OrderedDict()
        self.run: dict[str, Optional[str]] = {"id": None}  # shared with its snapshots: the writer creates the run once
        self.started = time.time()

    def snapshot(self) -> "Tally":
        """A copy to write while this one goes on counting (the writer thread never sees a tally change)."""
        snap = copy.copy(self)
        snap.confusion, snap.answers = self.confusion.copy(), list(self.answers)
        snap.seconds, snap.disagreements = (self.seconds[0].copy(), self.seconds[1].copy()), self.disagreements.copy()
        return snap

    def add(self, images: np.ndarray, primary: np.ndarray, shadow: np.ndarray, primary_s: float,
            shadow_s: float) -> int:
        """Count one batch; returns how many of its images both models gave the same class."""
        p, s = primary.argmax(1), shadow.argmax(1)
        agree = self.same[p] == s
        np.add.at(self.confusion, (p, s), 1)
        self.images += len(p)
        self.agreed += int(agree.sum())
        self.batches += 1
        self.seconds[0].append(primary_s)
        self.seconds[1].append(shadow_s)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        room = self.settings.max_answers - len(self.answers)
        for i in range(min(room, len(p))):
            self.answers.append((stamp, self.classes[0][p[i]], f"{primary[i, p[i]]:.6f}", self.classes[1][s[i]],
                                 f"{shadow[i, s[i]]:.6f}", int(agree[i])))
        for i in np.flatnonzero(~agree):
            image = np.clip(np.rint(images[i] * 255.0), 0, 255).astype(np.uint8)
            key = hashlib.blake2b(image.tobytes(), digest_size=16).digest()
            seen = self.disagreements.pop(key, (None,) * 5 + (0,))[5]  # a repeated image: once, the latest, counted
            self.disagreements[key] = (image, int(p[i]), float(primary[i, p[i]]), int(s[i]), float(shadow[i, s[i]]),
                                       seen + 1)
            if len(self.disagreements) > self.settings.keep_images:
                self.disagreements.popitem(last=False)
        return int(agree.sum())

    def metrics(self) -> dict[str, float]:
        return {"images": self.images, "agreed": self.agreed, "agreement": self.agreed / max(self.images, 1),
                "dropped": self.dropped, "batches": self.batches,
                **{f"{who}_forward_ms_p{q}": percentile_ms(self.seconds[k], q)
                   for k, who in enumerate(("primary", "shadow")) for q in (50, 99)}}

    def tags(self) -> dict[str, str]:
        p, s = self.primary, self.shadow
        return {"run_kind": RUN_KIND, PRIMARY_NAME: p.name or "", PRIMARY_VERSION: p.version or "", PRIMARY_URI: p.uri,
                SHADOW_NAME: s.name or "", SHADOW_VERSION: s.version or "", SHADOW_URI: s.uri,
                "primary.model.weights_sha256": p.model.weights_sha256,
                "shadow.model.weights_sha256": s.model.weights_sha256}

    def summary(self) -> dict:
        per_class = {}
        for i, name in enumerate(self.classes[0]):
            n = int(self.confusion[i].sum())
            agreed = int(self.confusion[i, self.same[i]]) if self.same[i] >= 0 else 0
            per_class[name] = {"images": n, "agreed": agreed}
        return {**self.metrics(), "primary": self.primary.describe(), "shadow": self.shadow.describe(),
                "classes": {"primary": self.classes[0], "shadow": self.classes[1]},
                "confusion": self.confusion.tolist(), "per_class": per_class,
                "answers_listed": len(self.answers)}

    def write(self, folder: Path) -> None:
        from ..files import write_json
        from .shadow_report import disagreement_figure

        summary = self.summary()
        write_json(folder / "summary.json", summary)
        with open(folder / "answers.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["utc", "primary_class", "primary_probability", "shadow_class", "shadow_probability", "agree"])
            w.writerows(self.answers)
        kept = list(self.disagreements.values())
        c, h, wd = self.primary.model.in_shape
        arrays = {"images": np.stack([k[0] for k in kept]) if kept else np.zeros((0, c, h, wd), np.uint8),
                  "primary": np.array([k[1] for k in kept], np.int64),
                  "primary_probability": np.array([k[2] for k in kept], np.float32),
                  "shadow": np.array([k[3] for k in kept], np.int64),
                  "shadow_probability": np.array([k[4] for k in kept], np.float32),
                  "seen": np.array([k[5] for k in kept], np.int64)}
        np.savez_compressed(folder / "disagreements.npz", **arrays)
        disagreement_figure(summary, arrays, folder / "disagreements.png")


class Shadow:
    """`offer()` from the scorer; `start()` and `stop()` from the service's lifespan. Two threads: one scores
    and counts, the other writes snapshots to MLflow, so a slow or absent tracking server (a run's files take
    a second to write) never stalls the scoring and never fills the queue."""

    STOP = object()

    def __init__(self, follower: Follower, tracking: Tracking, settings: ShadowConfig,
                 on_scored: Optional[Callable[[int, int], None]] = None,
                 on_dropped: Optional[Callable[[], None]] = None):
        self.follower, self.tracking, self.settings = follower, tracking, settings
        self.on_scored, self.on_dropped = on_scored, on_dropped  # for /metrics: (images, agreed); one dropped batch
        self.waiting: queue.Queue = queue.Queue(maxsize=settings.queue)
        self.to_write: queue.Queue = queue.Queue()  # (snapshot, end the run); the writer keeps the latest per run
        self.tally: Optional[Tally] = None
        self.scorer = threading.Thread(target=self._score_all, name="shadow", daemon=True)
        self.writer = threading.Thread(target=self._write_all, name="shadow-writer", daemon=True)
        self._client = None

    def offer(self, images: np.ndarray, probs: np.ndarray, served: Served, seconds: float) -> None:
        try:
            self.waiting.put_nowait((images, probs, served, seconds))
        except queue.Full:
            if self.tally is not None:
                self.tally.dropped += 1
            if self.on_dropped is not None:
                self.on_dropped()

    def start(self) -> None:
        self.scorer.start()
        self.writer.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Score what waits, write every run once more and end it FINISHED."""
        if self.scorer.is_alive():
            self.waiting.put(self.STOP)
            self.scorer.join(timeout)
        if self.writer.is_alive():
            self.writer.join(timeout)

    def _hand(self, tally: Optional[Tally], end: bool) -> None:
        if tally is not None and tally.images:
            self.to_write.put((tally.snapshot(), end))

    def _score_all(self) -> None:
        due = time.monotonic() + self.settings.flush_s
        while True:
            try:
                item = self.waiting.get(timeout=max(0.0, due - time.monotonic()))
            except queue.Empty:
                item = None
            if item is self.STOP:
                break
            if item is not None:
                try:
                    self._score(*item)
                except Exception as exc:  # noqa: BLE001 - the shadow never takes the service down
                    log.warning("serve: the shadow model could not score a batch: %s", one_line(exc))
            if time.monotonic() >= due:
                self._hand(self.tally, end=False)
                due = time.monotonic() + self.settings.flush_s
        self._hand(self.tally, end=True)
        self.to_write.put(self.STOP)

    def _score(self, images: np.ndarray, probs: np.ndarray, served: Served, seconds: float) -> None:
        import torch

        shadow = self.follower.current
        if shadow is None or shadow.uri == served.uri:  # still loading, or the very version that answered
            return
        if self.tally is None or (self.tally.primary.uri, self.tally.shadow.uri) != (served.uri, shadow.uri):
            self._hand(self.tally, end=True)  # either alias moved: that pair's run is complete
            self.tally = Tally(served, shadow, self.settings)
        t0 = time.perf_counter()
        with torch.no_grad():
            theirs = shadow.model.module(torch.from_numpy(images)).float().numpy()
        agreed = self.tally.add(images, probs, theirs, seconds, time.perf_counter() - t0)
        if self.on_scored is not None:
            self.on_scored(len(images), agreed)

    def _write_all(self) -> None:
        """Write what the scorer hands over; what MLflow did not take is tried again every flush_s (the latest
        snapshot of each run only), and once more when the service stops."""
        pending: dict[int, tuple[Tally, bool]] = {}
        stopping = False
        while not stopping:
            try:
                job = self.to_write.get(timeout=self.settings.flush_s if pending else None)
            except queue.Empty:
                job = None
            while job is not None:
                if job is self.STOP:
                    stopping = True
                else:
                    snap, end = job
                    ended_before = pending.get(id(snap.run), (None, False))[1]
                    pending[id(snap.run)] = (snap, end or ended_before)
                try:
                    job = self.to_write.get_nowait()
                except queue.Empty:
                    job = None
            pending = {k: (snap, end) for k, (snap, end) in pending.items() if not self._write(snap, end)}
        if pending:
            log.warning("serve: %d shadow run(s) could not be written before the service stopped", len(pending))

    def _write(self, tally: Tally, end: bool) -> bool:
        """The run (created at its first write); False when MLflow could not take it: said, tried again later."""
        try:
            client, experiment_id = self._connect()
            if tally.run["id"] is None:
                p, s = tally.primary, tally.shadow
                tally.run["id"] = client.create_run(
                    experiment_id, run_name=f"shadow {s.name or s.uri} v{s.version} vs v{p.version}",
                    tags=tally.tags(), start_time=int(tally.started * 1000)).info.run_id
            from mlflow.entities import Metric

            run_id, now = tally.run["id"], int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, tally.images) for k, v in tally.metrics().items()])
            with tempfile.TemporaryDirectory(prefix="imgclf-shadow-") as tmp:
                tally.write(Path(tmp))
                client.log_artifacts(run_id, tmp, ARTIFACTS)
            if end:
                client.set_terminated(run_id, "FINISHED")
                log.info("serve: shadow run %s ended: %d images, agreement %.2f%%", run_id, tally.images,
                         100.0 * tally.agreed / tally.images)
        except Exception as exc:  # noqa: BLE001 - serving goes on; the snapshot is tried again
            log.warning("serve: the shadow run could not be written (%s); trying again in %g s", one_line(exc),
                        self.settings.flush_s)
            return False
        return True

    def _connect(self):
        if self._client is None:
            from ..tracking.store import connect

            self._client = connect(dataclasses.replace(self.tracking,
                                                       experiment=experiment_name(self.tracking.experiment)))
        return self._client
