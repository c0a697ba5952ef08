"""evaluate: score the best model on the test split; reports, pictures, TorchScript, the MLflow model."""

from __future__ import annotations

import logging
import time
from typing import Optional

from ..config import Config
from ..layout import Layout
from . import holds_outputs, records_in_dvc_lock

log = logging.getLogger("imgclf")


def trained_record(cfg: Config, layout: Layout) -> dict:
    """run.json, once best.pt and the prepared data are the very ones that training recorded."""
    from ..data.batches import read_meta
    from ..files import read_json_file, sha256_file
    from ..tracking.runs import check_same_store

    if not layout.run_ref.is_file():
        raise FileNotFoundError(f"{layout.run_ref}: no finished training recorded; run the train stage first")
    record = read_json_file(layout.run_ref)
    check_same_store(record, cfg, layout.run_ref)
    run = record.get("run_id") or "(untracked)"
    if not layout.best.is_file() or sha256_file(layout.best) != record.get("best_sha256"):
        raise ValueError(f"{layout.best}: not the weights that run {run} recorded in {layout.run_ref} "
                         "(another training replaced them, or one failed); train again")
    data = read_meta(layout.meta, cfg.data)["sha256"]
    if {k: data.get(k) for k in ("train.pt", "val.pt")} != \
            {k: record.get("data_sha256", {}).get(k) for k in ("train.pt", "val.pt")}:
        raise ValueError(f"{layout.processed}: not the data run {run} was trained on ({layout.run_ref}); "
                         "train again on the current data")
    return record


def load_best_model(layout: Layout):
    """The trained model and its architecture record from best.pt (weights only)."""
    from ..files import safe_torch_load
    from ..models.classifier import from_architecture

    if not layout.best.is_file():
        raise FileNotFoundError(f"{layout.best}: no trained model; run the train stage first")
    blob = safe_torch_load(layout.best, "trained model")
    if not isinstance(blob, dict) or "architecture" not in blob or "state_dict" not in blob:
        raise ValueError(f"{layout.best}: not a trained model this project wrote (no architecture/state_dict)")
    try:
        model = from_architecture(blob["architecture"])
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{layout.best}: weights do not fit the recorded architecture "
                         f"({str(exc).splitlines()[0][:160]})") from None
    return model.eval(), blob["architecture"]


@holds_outputs("evaluate")
@records_in_dvc_lock("evaluate")
def evaluate_stage(cfg: Config, extra_tags: Optional[dict[str, str]] = None) -> dict:
    """Score the best model on the test split, calibrate it, run the behavioural tests; write reports, pictures,
    the model card, TorchScript and the test metrics.

    Every refusal (records that do not match, an untracked training, an unreachable tracking server) comes
    before the first output is written, so a refused evaluate leaves the last good outputs as they were.
    """
    from ..data.batches import load_split, read_meta
    from ..evaluation.reports import example_batch, run_summary, write_reports
    from ..evaluation.scoring import evaluate, export_torchscript
    from ..evaluation.trust import assess, write_trust_reports
    from ..files import read_json_file, write_json
    from ..progress import heartbeat
    from ..tracking.runs import stage_run

    start = time.perf_counter()
    layout = Layout.of(cfg)
    trained = trained_record(cfg, layout)
    if cfg.tracking.enabled and not trained["run_id"]:
        raise ValueError(f"{layout.run_ref}: that training was not tracked (runtime.tracking.enabled was false); "
                         "train again")
    model, arch = load_best_model(layout)
    meta = read_meta(layout.meta, cfg.data)
    test, val = load_split(layout.split("test")), load_split(layout.split("val"))
    with stage_run(cfg, "evaluate", layout.run_ref, extra_tags=extra_tags, run_id=trained["run_id"]) as run, \
            heartbeat(log.info, "evaluate: scoring the test split") as step:
        ev = evaluate(model, test, arch["classes"], cfg.runtime.eval_batch_size)
        log.info("test: accuracy %.4f, macro F1 %.4f, loss %.4f; calibrating and running the behavioural tests",
                 ev.accuracy, ev.macro_f1, ev.loss)
        step("evaluate: calibration and behavioural tests")
        trust = assess(model, val, test, ev, cfg.evaluate, cfg.runtime.eval_batch_size, log.info)
        train_summary = read_json_file(layout.train_summary) if layout.train_summary.is_file() else {}
        step("evaluate: drawing the pictures and writing the reports")
        reports = write_reports(layout.reports, model, test, ev, arch["classes"], train_summary.get("history"),
                                cfg.evaluate.max_misclassified)
        reports += write_trust_reports(layout.reports, trust, arch["classes"])
        export_torchscript(model, example_batch(test), layout.torchscript)
        metrics = {**ev.metrics(), **trust.metrics()}
        card = _card(cfg, meta, run, train_summary, ev, trust, layout.split("test").name)
        reports.append(_write_text(layout.reports / "model_card.md", card))
        write_json(layout.test_summary, metrics)
        write_json(layout.test_scores, {k: metrics[k] for k in ("accuracy", "macro_f1", "loss", "ece")})
        work_seconds = time.perf_counter() - start
        record = {**metrics, "reports": str(layout.reports), "torchscript": str(layout.torchscript)}
        if run:
            from ..registry.serving import log_model
            from ..tracking.mlflow_internals import model_id_of
            from ..tracking.runs import ride_out, split_dataset

            t0 = time.perf_counter()
            log.info("logging the reports and the model to MLflow run %s", run.run_id)
            step(f"evaluate: logging the reports and the model to MLflow run {run.run_id}")
            run.log_splits(layout, meta, {"test": "testing"})
            run.set_tags({"mlflow.note.content": run_summary(metrics, train_summary)})
            for f in reports:
                run.log_artifact(f, "reports")
            run.log_artifact(layout.torchscript, "torchscript")
            run.log_artifact(layout.train_history, "metrics")
            # Tried again through a server restart; an attempt cut short leaves its logged model unfinished
            # (status PENDING) in the run, and logged_model.json names the one that was uploaded whole.
            model_uri = ride_out(run.uri, f"run {run.run_id}: the model", log_model, run.uri, run.run_id, model, arch,
                                 trust.calibration.temperature)
            # After the model: to the run (the README's views) and to the logged model, as measured on the test
            # split, so the experiment's Models tab and the registered version's page show them.
            run.log_metrics(metrics, prefix="test_", model_id=model_id_of(model_uri),
                            dataset=split_dataset(layout, meta, "test"))
            write_json(layout.logged_model, {"run_id": run.run_id, "model_uri": model_uri, "test": metrics,
                                             "trust": trust.record(), "card": card,
                                             "data_sha256": meta["sha256"], "best_sha256": trained["best_sha256"]})
            record["model_uri"] = model_uri
            record["tracking_seconds"] = round(time.perf_counter() - t0, 3)
    record["seconds"] = round(work_seconds + record.get("tracking_seconds", 0.0), 3)
    return record


def _write_text(path, text: str):
    from ..files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _audit_of(cfg: Config, meta: dict) -> Optional[dict]:
    """For the model card: the last imgclf audit of exactly this prepared data, as shares (None: not audited)."""
    from ..audit.record import of_this_data, shares

    audited = of_this_data(Layout.of(cfg).audit, meta["sha256"])
    if audited is None:
        return None
    pool, test = shares(audited)
    return {"train_val": pool, "test": test, "groups": audited["near_duplicate_groups"],
            "across_splits": audited["across_splits"]}


def _card(cfg: Config, meta: dict, run, train_summary: dict, ev, trust, test_file: str) -> str:
    from ..evaluation.model_card import model_card
    from ..tracking.lineage import dvc_data_hash

    reuse = None
    if run:  # the gate decisions this test split has taken so far (registry/gate.py counts each on its sha256)
        from ..registry.versions import decisions_on
        from ..tracking.runs import ride_out

        split = meta["sha256"][test_file]
        decisions, promotions = ride_out(run.uri, "the registry: decisions on this test split", decisions_on,
                                         run.client, split, "", "")
        reuse = {"split": split, "decisions": decisions, "promotions": promotions}

    return model_card(name=cfg.model_name, cfg=cfg, meta=meta,
                      data_version=dvc_data_hash(cfg.paths.dvc_file) if cfg.paths.dvc_file else "none",
                      run_id=run.run_id if run else "(untracked)", run_link=run.where() if run else "", train=train_summary,
                      metrics=ev.metrics(), per_class=ev.per_class(), robustness=trust.robustness,
                      calibration=trust.calibration.as_dict(), test_reuse=reuse, audit=_audit_of(cfg, meta))
