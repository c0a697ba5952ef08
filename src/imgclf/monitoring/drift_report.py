"""What a drift check shows: one picture (statistics, class shares, embeddings), a self-contained HTML
report (the picture inlined, every test's numbers), and a markdown summary for Prefect's artifact."""

from __future__ import annotations

import base64
import html
import io
import textwrap
from typing import Any

import numpy as np

from .drift import Profile

NAMES = {"image_stats": "Image statistics", "embeddings": "Embeddings (penultimate layer)",
         "classes": "Predicted classes"}


def figure_png(reference: Profile, batch: Profile, classes: list[str], report: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    feats = [k for k in reference.features if k in batch.features]
    fig, axes = plt.subplots(1, len(feats) + 2, figsize=(3.2 * (len(feats) + 2), 3.2))
    tests = (report.get("detectors") or {}).get("image_stats", {}).get("tests", {})
    for ax, k in zip(axes, feats):
        lo = min(reference.features[k].min(), batch.features[k].min())
        hi = max(reference.features[k].max(), batch.features[k].max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
        ax.hist(reference.features[k], bins=bins, density=True, alpha=0.55, label="training (val)")
        ax.hist(batch.features[k], bins=bins, density=True, alpha=0.55, label="batch")
        t = tests.get(k)
        ax.set_title(f"{k}" + (f"\nshift {t['shift']:.2f} sd, p={t['p_value']:.1e}" if t else ""), fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    k = len(classes)
    ref_share = np.bincount(reference.predicted, minlength=k) / max(len(reference.predicted), 1)
    cur_share = np.bincount(batch.predicted, minlength=k) / max(len(batch.predicted), 1)
    ax = axes[len(feats)]
    ax.bar(np.arange(k) - 0.2, ref_share, 0.4, label="val")
    ax.bar(np.arange(k) + 0.2, cur_share, 0.4, label="batch")
    ax.set_xticks(np.arange(k), [c[:8] for c in classes], rotation=90 if k > 10 else 0, fontsize=7)
    ax.set_title("predicted class shares", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[-1]
    both = np.concatenate([reference.embeddings[:1000], batch.embeddings[:1000]]).astype(np.float64)
    centred = both - both.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    n = min(len(reference.embeddings), 1000)
    ax.scatter(xy[:n, 0], xy[:n, 1], s=3, alpha=0.4, label="training (val)")
    ax.scatter(xy[n:, 0], xy[n:, 1], s=3, alpha=0.4, label="batch")
    emb = (report.get("detectors") or {}).get("embeddings")
    ax.set_title("embeddings, first 2 PCs" + (f"\ndomain AUC {emb['domain_auc']:.3f}" if emb else ""), fontsize=9)
    ax.tick_params(labelsize=7)
    verdict = "DRIFT" if report.get("drifted") else ("no drift" if report.get("tested") else "not tested")
    fig.suptitle(textwrap.fill(f"{verdict}: {report.get('reason', '')}", 150, max_lines=3), fontsize=10, y=1.02,
                 va="bottom")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(detector, test, value, verdict) for every test run."""
    d = report.get("detectors") or {}
    out = []
    for k, t in (d.get("image_stats") or {}).get("tests", {}).items():
        out.append(("image statistics", k, f"mean {t['reference_mean']} → {t['batch_mean']}, shift {t['shift']:.3f} sd, "
                    f"KS p={t['p_value']:.2e}", "drift" if t["drifted"] else "ok"))
    if "embeddings" in d:
        e = d["embeddings"]
        out.append(("embeddings", "MMD (permutation)", f"MMD²={e['mmd2']:.5f}, p={e['mmd_p_value']:.3g}",
                    "drift" if e["drifted"] else "ok"))
        out.append(("embeddings", "domain classifier", f"AUC={e['domain_auc']:.3f}, p={e['domain_auc_p_value']:.2e}",
                    "drift" if e["drifted"] else "ok"))
    if "classes" in d:
        c = d["classes"]
        out.append(("predicted classes", "chi-square vs val", f"TVD={c['tvd']:.3f}, χ²={c['chi2']}, p={c['p_value']:.2e}",
                    "drift" if c["drifted"] else "ok"))
    return out


def markdown(report: dict[str, Any], title: str) -> str:
    verdict = "**drift**" if report.get("drifted") else ("no drift" if report.get("tested") else "not tested")
    table = "\n".join(f"| {a} | {b} | {c} | {'**drift**' if v == 'drift' else v} |" for a, b, c, v in rows(report))
    return (f"# {title}\n\nVerdict: {verdict}: {report.get('reason', '')}\n\n"
            f"{report.get('n_batch')} batch images against {report.get('n_reference')} training (validation) images.\n\n"
            f"| detector | test | value | verdict |\n|---|---|---|---|\n{table}\n")


def html_report(report: dict[str, Any], title: str, png: bytes) -> str:
    body = "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{html.escape(c)}</td>"
                   f"<td class='{v}'>{v}</td></tr>" for a, b, c, v in rows(report))
    verdict = "DRIFT" if report.get("drifted") else ("no drift" if report.get("tested") else "not tested")
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font:14px sans-serif;margin:2em}td,th{padding:4px 10px;border-bottom:1px solid #ddd}"
            ".drift{color:#b00;font-weight:bold}</style>"
            f"<h1>{html.escape(title)}</h1><p><b>{verdict}</b>: {html.escape(report.get('reason', ''))}</p>"
            f"<p>{report.get('n_batch')} batch images against {report.get('n_reference')} validation images "
            "of the model's training data.</p>"
            f"<table><tr><th>detector</th><th>test</th><th>value</th><th>verdict</th></tr>{body}</table>"
            f"<p><img alt='drift figures' src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>")
