"""What a sweep shows: the trials table, Optuna's pictures (its matplotlib backend), and a markdown summary."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

log = logging.getLogger("imgclf")

PICTURES = ("optimization_history", "intermediate_values", "param_importances", "parallel_coordinate")


def rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial, in trial order."""
    out = []
    for t in study.get_trials(deepcopy=False):
        out.append({"trial": t.number, "state": t.state.name.lower(), "value": t.value,
                    "last_reported": t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values
                    else None, "epochs": t.user_attrs.get("epochs"), "fit_s": t.user_attrs.get("fit_s"),
                    "overhead_s": t.user_attrs.get("overhead_s"), "baseline": bool(t.user_attrs.get("baseline")),
                    "retry_of": t.system_attrs.get("failed_trial"), "run_id": t.user_attrs.get("mlflow_run_id"),
                    "error": t.user_attrs.get("error"), **{f"params.{k}": v for k, v in t.params.items()}})
    return out


def write_table(study: optuna.Study, path: Path) -> Path:
    import csv

    table = rows(study)
    keys = list(dict.fromkeys(k for r in table for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(table)
    return path


def pictures(study: optuna.Study, folder: Path) -> list[Path]:
    """Optuna's plots as PNGs; one that cannot be drawn yet (too few finished trials) is skipped, said once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    made = []
    for name in PICTURES:
        try:
            ax = getattr(vis, f"plot_{name}")(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(9, 5.5)
            fig.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
            plt.close(fig)
            made.append(folder / f"{name}.png")
        except Exception as exc:  # noqa: BLE001 - a picture is never worth failing the sweep for
            log.info("sweep picture %s not drawn: %s", name, str(exc).splitlines()[0] if str(exc) else exc)
    return made


def _cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def markdown(study: optuna.Study, metric: str, top: int, link) -> str:
    """The top trials by value (pruned ones by their last reported value), each with a link to its run."""
    table = [r for r in rows(study) if r["state"] in ("complete", "pruned")]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    table.sort(key=lambda r: (r["state"] != "complete", -(r["value"] or 0) if maximize else (r["value"] or 0)))
    params = sorted({k for r in table for k in r if k.startswith("params.")})
    head = ["trial", "state", metric, "epochs", *[p[len("params."):] for p in params], "MLflow run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table[:top]:
        cells = [str(r["trial"]) + (" (baseline)" if r["baseline"] else ""), r["state"],
                 _cell(r["value"] if r["value"] is not None else r["last_reported"]), _cell(r["epochs"]),
                 *[_cell(r.get(p)) for p in params], link(r["run_id"]) if r["run_id"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    states = [t.state for t in study.get_trials(deepcopy=False)]
    summary = ", ".join(f"{states.count(s)} {s.name.lower()}" for s in TrialState if states.count(s))
    return f"Trials: {summary}.\n\n" + "\n".join(lines) + "\n"
