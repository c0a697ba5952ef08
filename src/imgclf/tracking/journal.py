"""Metrics that survive a tracking outage: written to a local journal first, sent when the server answers.

While the MLflow server is away, training goes on: each epoch's numbers are appended to
`<models>/tracking-journal-<run id>.jsonl` (one fsynced line per call) and the backlog is
sent, oldest first, as soon as a quick health probe succeeds. The file holds only what
has not been sent yet, so a crash can at worst send an epoch twice, never lose one.
`imgclf sync` (or `train --resume`) sends what is left once the server is back.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

log = logging.getLogger("imgclf")

BATCH = 900  # MLflow's log_batch takes at most 1000 metrics a call


PREFIX, SUFFIX = "tracking-journal-", ".jsonl"


def journal_path(folder: Path, run_id: str) -> Path:
    return folder / f"{PREFIX}{run_id}{SUFFIX}"


def journals(folder: Path) -> list[tuple[str, Path]]:
    """(run id, journal file) for every journal left in `folder`."""
    return [(p.name[len(PREFIX): -len(SUFFIX)], p) for p in sorted(folder.glob(f"{PREFIX}*{SUFFIX}"))]


class MetricJournal:
    def __init__(self, client, run_id: str, uri: str, path: Path):
        self.client, self.run_id, self.uri, self.path = client, run_id, uri, path
        self.offline_since: Optional[float] = None

    def record(self, rows: list[tuple[str, float, int, int]]) -> None:
        """Append (key, value, timestamp ms, step) rows, durably, before any attempt to send them."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rows) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def pending(self) -> int:
        if not self.path.is_file():
            return 0
        return sum(1 for line in self.path.read_text().splitlines() if line.strip())

    def flush(self) -> bool:
        """Send the backlog; True when nothing is left. Never raises for an unreachable server."""
        import time

        from mlflow.entities import Metric

        from .store import TrackingUnavailable, check_reachable

        if not self.path.is_file():
            return True
        if self.offline_since is not None:
            try:
                check_reachable(self.uri, timeout=2.0)
            except TrackingUnavailable:
                return False
        rows = [r for line in self.path.read_text().splitlines() if line.strip() for r in json.loads(line)]
        try:
            for i in range(0, len(rows), BATCH):
                self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), int(ts), int(step))
                                                            for k, v, ts, step in rows[i: i + BATCH]])
        except Exception as exc:  # noqa: BLE001 - any failure to send: keep the journal, carry on
            if self.offline_since is None:
                self.offline_since = time.monotonic()
                log.warning("MLflow run %s: tracking server unreachable (%s); training goes on, metrics are "
                            "journaled in %s", self.run_id, str(exc).splitlines()[0][:200], self.path)
            return False
        self.path.unlink(missing_ok=True)
        if self.offline_since is not None:
            log.warning("MLflow run %s: tracking server back after %.0f s; %d journaled rows sent", self.run_id,
                        time.monotonic() - self.offline_since, len(rows))
            self.offline_since = None
        return True
