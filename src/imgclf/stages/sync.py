"""sync: send the metrics a tracking outage left in local journals, and close the runs they belong to."""

from __future__ import annotations

import logging
import time

from ..config import Config
from ..layout import Layout
from . import holds_outputs

log = logging.getLogger("imgclf")


@holds_outputs("sync")  # not while a training still writes the same journals
def sync_stage(cfg: Config) -> dict:
    from ..tracking.journal import MetricJournal, journals
    from ..tracking.runs import load_run_ref
    from ..tracking.store import TrackingUnavailable, connect, tracking_uri

    start = time.perf_counter()
    layout = Layout.of(cfg)
    client, _ = connect(cfg.tracking)  # fails fast while the server is still away
    finished = load_run_ref(layout.run_ref) or {}
    synced = []
    for run_id, path in journals(layout.models):
        journal = MetricJournal(client, run_id, tracking_uri(cfg.tracking), path)
        batches = journal.pending()
        if not journal.flush():
            raise TrackingUnavailable(f"MLflow run {run_id}: could not send {path}; try again later")
        status = client.get_run(run_id).info.status
        if status == "RUNNING":  # the outage kept the training from closing its run
            done = finished.get("run_id") == run_id
            client.set_tag(run_id, "stage.train", "finished" if done else "failed")
            client.set_terminated(run_id, "FINISHED" if done else "FAILED")
            status = "FINISHED" if done else "FAILED"
        log.info("MLflow run %s: %d journaled batches sent; run %s", run_id, batches, status)
        synced.append({"run_id": run_id, "batches": batches, "status": status})
    return {"synced": synced, "seconds": round(time.perf_counter() - start, 3)}
