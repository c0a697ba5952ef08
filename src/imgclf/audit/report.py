"""What a person reviews after an audit: label_issues.csv (most suspect first) and .png (the same order),
near_duplicates.csv and .png (groups across splits first: leakage), audit.json with the counts."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .label_issues import Scored
from .near_duplicates import Groups

TOP = 10  # rows of each table in audit.json (and the Prefect report)


def write_outputs(out: Path, scored: Scored, groups: Groups, images: np.ndarray, split_of: np.ndarray,
                  classes: list[str], shown: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Every output into the folder `out`; returns audit.json's record. `images`, `split_of`: every image of
    train, val and test in that order (scored.split has the same order)."""
    ranked, suggested = scored.ranked(), scored.suggested()
    issues = [{"rank": r + 1, "split": str(scored.split[i]), "id": scored.ids[i], "given": classes[scored.labels[i]],
               "suggested": classes[suggested[i]], "score": round(float(scored.quality[i]), 6)}
              for r, i in enumerate(ranked.tolist())]
    _csv(out / "label_issues.csv", ["rank", "split", "id", "given", "suggested", "score"], issues)
    order = sorted(range(len(groups.members)),
                   key=lambda g: (len(set(split_of[groups.members[g]])) == 1, int(groups.members[g][0])))
    dup_rows, summary_groups = [], []
    for number, g in enumerate(order, 1):
        members = groups.members[g]
        across = len(set(split_of[members])) > 1
        for i in members.tolist():
            dup_rows.append({"group": number, "across_splits": str(across).lower(), "split": str(split_of[i]),
                             "id": scored.ids[i], "label": classes[scored.labels[i]], "weakest_link": round(groups.score[g], 6)})
        summary_groups.append({"group": number, "across_splits": across, "ids": [scored.ids[i] for i in members.tolist()]})
    _csv(out / "near_duplicates.csv", ["group", "across_splits", "split", "id", "label", "weakest_link"], dup_rows)
    from ..evaluation.plots import save

    save(_issues_figure(images, ranked[:shown], scored, suggested, classes), out / "label_issues.png")
    save(_groups_figure(images, [groups.members[g] for g in order][:max(1, shown // 4)], split_of, scored.ids,
                         [classes[k] for k in scored.labels], len(groups.members)), out / "near_duplicates.png")
    by_split = {s: int(sum(1 for r in issues if r["split"] == s)) for s in ("train", "val", "test")}
    sizes = {s: int((scored.split == s).sum()) for s in by_split}
    record = {"label_issues": len(issues), "label_issues_by_split": by_split, "images": sizes,
              "label_issue_share": {s: by_split[s] / max(1, sizes[s]) for s in by_split},
              "near_duplicate_groups": len(summary_groups),
              "across_splits": sum(g["across_splits"] for g in summary_groups),
              "images_in_groups": int(sum(len(m) for m in groups.members)),
              "top": {"label_issues": issues[:TOP], "near_duplicates": summary_groups[:TOP]}, **extra}
    (out / "audit.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return record


def summary_line(record: dict[str, Any]) -> str:
    s = record["label_issues_by_split"]
    return (f'"label_issues": {record["label_issues"]} (train {s["train"]}, val {s["val"]}, test {s["test"]}), '
            f'"near_duplicate_groups": {record["near_duplicate_groups"]} ({record["across_splits"]} across splits)')


def markdown(record: dict[str, Any]) -> str:
    """The Prefect report: the counts and the top rows of both tables."""
    rows = "\n".join(f"| {r['rank']} | {r['split']} | `{r['id']}` | {r['given']} | {r['suggested']} | {r['score']:.4f} |"
                     for r in record["top"]["label_issues"])
    dups = "\n".join(f"| {g['group']} | {'**yes**' if g['across_splits'] else 'no'} | "
                     + ", ".join(f"`{i}`" for i in g["ids"][:6]) + (" ..." if len(g["ids"]) > 6 else "") + " |"
                     for g in record["top"]["near_duplicates"])
    return (f"# Data audit\n\n{summary_line(record)}\n\n"
            f"| rank | split | id | given | suggested | score |\n|---|---|---|---|---|---|\n{rows}\n\n"
            f"| group | across splits | images |\n|---|---|---|\n{dups}\n")


def _csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _issues_figure(images: np.ndarray, shown: np.ndarray, scored: Scored, suggested: np.ndarray, classes: list[str]):
    import matplotlib.pyplot as plt

    from ..evaluation.plots import _short, _show, sample_label

    cols = min(6, max(1, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for rank, (ax, i) in enumerate(zip(axes.flat, shown.tolist()), 1):
        _show(ax, images[i], f"{rank}. {scored.split[i]} {sample_label(scored.ids[i])}\n"
                             f"given {_short(classes[scored.labels[i]], 8)} → {_short(classes[suggested[i]], 8)}\n"
                             f"p(given) {scored.quality[i]:.2g}", fontsize=11)
    if not len(shown):
        axes[0, 0].set_title("no suspected label errors", fontsize=11)
    fig.suptitle(f"suspected label errors, most suspect first ({int(scored.issue.sum())} in all; label_issues.csv "
                 "has them in this order)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    return fig


def _groups_figure(images: np.ndarray, groups: list[np.ndarray], split_of: np.ndarray, ids: list[str],
                   labels: list[str], total: int):
    import matplotlib.pyplot as plt

    from ..evaluation.plots import _show, sample_label

    width = min(6, max([len(g) for g in groups] + [1]))
    fig, axes = plt.subplots(max(1, len(groups)), width, figsize=(2.2 * width, 2.7 * max(1, len(groups))), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, members in enumerate(groups):
        across = len(set(split_of[members])) > 1
        for ax, i in zip(axes[row], members.tolist()[:width]):
            _show(ax, images[i], f"{row + 1}{' LEAK' if across else ''}: {split_of[i]}\n{sample_label(ids[i])} ({labels[i]})",
                  fontsize=10)
            if across:
                ax.title.set_color("#b00020")
    if not groups:
        axes[0, 0].set_title("no near-duplicate images", fontsize=11)
    fig.suptitle(f"near-duplicate groups ({total} in all; across splits first, in red: leakage)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    return fig
