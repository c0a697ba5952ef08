"""`imgclf shadow-report`: what real traffic said of a shadowed version, summed over its shadow runs.

Agreement overall and per class (the class production answered), both forward latencies per run, whether
register.shadow is satisfied, and one picture: agreement per class above the latest images where the two
disagreed. The runs are the ones `imgclf serve --shadow` wrote (shadow.py); the figure is also in each run.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import Config
from ..layout import Layout
from ..registry.shadow import ARTIFACTS, PRIMARY_VERSION, shadow_check, shadow_runs

log = logging.getLogger("imgclf")


def disagreement_figure(summary: dict, kept: dict[str, np.ndarray], path: Path) -> Path:
    """Per-class agreement (bars, with the image counts) above the disagreeing images, titled with both answers."""
    from ..evaluation.plots import _show, plt, save

    classes, shadow_classes = summary["classes"]["primary"], summary["classes"]["shadow"]
    per_class = summary["per_class"]
    n = len(kept["images"])
    cols = min(6, max(n, 1))
    rows = math.ceil(n / cols) if n else 0
    fig = plt.figure(figsize=(max(2.2 * cols, 0.45 * len(classes) + 3), 3.2 + 2.9 * rows))
    grid = fig.add_gridspec(1 + rows, cols, height_ratios=[3.2] + [2.9] * rows)
    bars = fig.add_subplot(grid[0, :])
    shares = [per_class[c]["agreed"] / per_class[c]["images"] if per_class[c]["images"] else 0.0 for c in classes]
    x = np.arange(len(classes))
    bars.bar(x, shares, color=["tab:green" if s >= summary["agreement"] else "tab:orange" for s in shares])
    bars.set_xticks(x, [c[:12] for c in classes], rotation=90 if len(classes) > 12 else 0)
    bars.set_ylim(0, 1.05)
    bars.set_ylabel("agreement")
    bars.axhline(summary["agreement"], color="grey", ls="--", lw=1)
    for i, c in enumerate(classes):
        bars.text(i, 0.02, str(per_class[c]["images"]), ha="center", va="bottom", fontsize=7, rotation=90)
    p, s = summary["primary"], summary["shadow"]
    bars.set_title(f"shadow v{s['version']} against v{p['version']}: {summary['agreed']} of {summary['images']} images "
                   f"agree ({summary['agreement']:.2%}); bars: per class of v{p['version']}'s answer (labels: images)"
                   + ("; below: the latest distinct images they disagreed on" if n else ""), fontsize=10)
    for k in range(n):
        ax = fig.add_subplot(grid[1 + k // cols, k % cols])
        times = f" (x{kept['seen'][k]})" if "seen" in kept and kept["seen"][k] > 1 else ""
        _show(ax, kept["images"][k].astype(np.float32) / 255.0,
              f"v{p['version']}: {classes[kept['primary'][k]][:10]} {kept['primary_probability'][k]:.0%}{times}\n"
              f"v{s['version']}: {shadow_classes[kept['shadow'][k]][:10]} {kept['shadow_probability'][k]:.0%}",
              fontsize=11)
    fig.tight_layout()
    return save(fig, path)


def _files(client, run_id: str, tmp: Path) -> Optional[tuple[dict, dict]]:
    from ..files import read_json_file

    try:
        folder = Path(client.download_artifacts(run_id, ARTIFACTS, str(tmp / run_id)))
        return read_json_file(folder / "summary.json"), dict(np.load(folder / "disagreements.npz"))
    except Exception as exc:  # noqa: BLE001 - a run killed before its first write: its metrics still count
        log.warning("shadow run %s: no files (%s); left out of the per-class summary and the figure (its metrics "
                    "still count for the gate)", run_id, str(exc)[:200])
        return None


def _combined(parts: list[tuple[dict, dict]], keep: int) -> tuple[dict, dict]:
    """One summary and one set of kept images from several runs of the same pair of class lists."""
    first = parts[-1][0]
    per_class = {c: {"images": sum(p[0]["per_class"].get(c, {}).get("images", 0) for p in parts),
                     "agreed": sum(p[0]["per_class"].get(c, {}).get("agreed", 0) for p in parts)}
                 for c in first["classes"]["primary"]}
    images, agreed = sum(p[0]["images"] for p in parts), sum(p[0]["agreed"] for p in parts)
    kept = {k: np.concatenate([p[1][k] for p in parts])[-keep:] for k in parts[-1][1]}
    return {**first, "images": images, "agreed": agreed, "agreement": agreed / max(images, 1),
            "per_class": per_class}, kept


def shadow_report_stage(cfg: Config, version: Optional[str] = None, out: Optional[str] = None) -> dict[str, Any]:
    """The report of `version` (default: the challenger) against the version in production now."""
    from ..registry.versions import CHALLENGER, PRODUCTION, RegistryError, alias_version
    from ..tracking.store import connect

    client, _ = connect(cfg.tracking)
    name = cfg.model_name
    version = version or alias_version(client, name, CHALLENGER)
    if version is None:
        raise RegistryError(f"model {name!r} has no challenger; name the shadowed version with --version N")
    production = alias_version(client, name, PRODUCTION)
    runs = shadow_runs(client, cfg.tracking.experiment, name, version)
    if not runs:
        raise RegistryError(f"no shadow runs for {name} v{version} in experiment "
                            f"{cfg.tracking.experiment}-shadow; serve with `imgclf serve --shadow challenger` first")
    against = [r for r in runs if r.data.tags.get(PRIMARY_VERSION) == production] or runs
    table = [{"run_id": r.info.run_id, "primary_version": r.data.tags.get(PRIMARY_VERSION), "status": r.info.status,
              **{k: r.data.metrics.get(k) for k in ("images", "agreed", "agreement", "dropped", "primary_forward_ms_p50",
                                                    "primary_forward_ms_p99", "shadow_forward_ms_p50",
                                                    "shadow_forward_ms_p99")}} for r in runs]
    with tempfile.TemporaryDirectory(prefix="imgclf-shadow-report-") as tmp:
        parts = [f for f in (_files(client, r.info.run_id, Path(tmp)) for r in against) if f is not None]
    record: dict[str, Any] = {"model": name, "version": str(version), "production": production, "runs": table}
    if parts:
        summary, kept = _combined(parts, cfg.serve.shadow.keep_images)
        target = Path(out) if out else Layout.of(cfg).reports / f"shadow-{name}-v{version}.png"
        disagreement_figure(summary, kept, target)
        record.update(against=summary["primary"]["version"], images=summary["images"], agreed=summary["agreed"],
                      agreement=round(summary["agreement"], 6), figure=str(target),
                      per_class={c: {**v, "agreement": round(v["agreed"] / v["images"], 6) if v["images"] else None}
                                 for c, v in summary["per_class"].items()})
    want = cfg.register.shadow
    check = shadow_check(client, cfg.tracking.experiment, name, str(version), production, want.min_requests,
                         want.min_agreement)
    record["gate"] = ("not required (register.shadow.min_requests 0, or no other production)" if check is None
                      else check.text())
    log.info("shadow report, %s v%s against production v%s:\n%s", name, version, production, _text(record))
    return record


def _text(record: dict) -> str:
    lines = [f"  {r['run_id'][:12]}  vs v{r['primary_version']}  {int(r['images'] or 0):>8} images  "
             f"agreement {(r['agreement'] or 0):7.2%}  forward p50/p99 ms: primary {r['primary_forward_ms_p50'] or 0:.1f}/"
             f"{r['primary_forward_ms_p99'] or 0:.1f}, shadow {r['shadow_forward_ms_p50'] or 0:.1f}/"
             f"{r['shadow_forward_ms_p99'] or 0:.1f}  ({r['dropped'] or 0:.0f} batches dropped, {r['status']})"
             for r in record["runs"]]
    for c, v in (record.get("per_class") or {}).items():
        share = "-" if v["agreement"] is None else f"{v['agreement']:.2%}"
        lines.append(f"  class {c[:20]:<20} {v['images']:>8} images  agreement {share}")
    if "figure" in record:
        lines.append(f"  figure: {record['figure']}")
    lines.append(f"  gate: {record['gate']}")
    return "\n".join(lines)
