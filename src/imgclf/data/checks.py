"""Data checks run by prepare on the decoded splits, before anything is written.

Each check returns a record (name, status, severity, value, limit, detail, offending ids). A failed check
whose severity is `error` stops prepare with one line naming it and the ids; `warn` is recorded in
meta.json and MLflow and keeps the model out of production (the gate); `off` is not run.
The per-split image statistics are kept too: they are what later batches are compared with.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..config import DataChecksConfig


SHOWN_IDS = 5  # in the one-line error; the record keeps up to MAX_IDS
MAX_IDS = 100
SPLITS = ("train", "val", "test")


class DataCheckError(ValueError):
    """A data check set to `error` failed; the message names the check and the offending samples."""


def _record(name: str, bad: list[str], detail: str, value: Any = None, limit: Any = None) -> dict[str, Any]:
    return {"name": name, "status": "failed" if bad or detail else "passed", "value": value, "limit": limit,
            "detail": detail, "ids": bad[:MAX_IDS], "n_offending": len(bad)}


def _shape(splits: dict, channels: int, size: int) -> dict[str, Any]:
    problems = []
    for s, d in splits.items():
        shape = tuple(d.images.shape)
        if d.images.dtype != np.uint8 or d.images.ndim != 4 or shape[1:] != (channels, size, size):
            problems.append(f"{s} is {d.images.dtype} {shape}")
        elif len(d.labels) != shape[0] or len(d.ids) != shape[0]:
            problems.append(f"{s} has {shape[0]} images, {len(d.labels)} labels and {len(d.ids)} ids")
    want = f"uint8 (N, {channels}, {size}, {size})"
    return _record("shape", [], f"want {want}: " + "; ".join(problems) if problems else "", want)


DIM = 16  # a split whose brightest pixel is under this was stored in 0..1 (or 0..15), not 0..255


def _values(splits: dict, max_blank: float) -> dict[str, Any]:
    bad, worst, dim = [], 0.0, []
    for s, d in splits.items():
        flat = d.images.reshape(len(d.images), -1)
        blank = np.flatnonzero(flat.max(1) == flat.min(1)) if len(flat) else np.array([], dtype=np.int64)
        fraction = len(blank) / max(len(flat), 1)
        worst = max(worst, fraction)
        if fraction > max_blank:
            bad += [f"{s}:{d.ids[i]}" for i in blank]
        if len(flat) and int(flat.max()) < DIM:
            dim.append(f"{s}'s brightest pixel is {int(flat.max())} of 255 (values stored as 0..1?)")
    problems = dim + ([f"{len(bad)} blank (constant) images, at most {max_blank:.2%} of a split allowed"] if bad else [])
    return _record("values", bad, "; ".join(problems), round(worst, 6), max_blank)


def _labels(splits: dict, classes: list[str]) -> dict[str, Any]:
    bad, missing = [], []
    for s, d in splits.items():
        out = np.flatnonzero((d.labels < 0) | (d.labels >= len(classes)))
        bad += [f"{s}:{d.ids[i]}" for i in out]
        present = set(np.unique(d.labels).tolist())
        missing += [f"{s} has no {classes[c]!r}" for c in range(len(classes)) if c not in present]
    problems = ([f"{len(bad)} labels outside the {len(classes)} classes"] if bad else []) + missing[:SHOWN_IDS]
    detail = "; ".join(problems)
    return _record("labels", bad, detail, len(classes), None)


def _balance(splits: dict, classes: list[str], min_ratio: float) -> dict[str, Any]:
    worst, detail = 1.0, ""
    for s, d in splits.items():
        counts = np.bincount(d.labels[(d.labels >= 0) & (d.labels < len(classes))], minlength=len(classes))
        ratio = counts.min() / max(counts.max(), 1)
        if ratio < worst:
            worst = float(ratio)
            if ratio < min_ratio:
                detail = (f"{s}: {classes[counts.argmin()]!r} has {counts.min()} images, {classes[counts.argmax()]!r} "
                          f"{counts.max()} (ratio {ratio:.3f} < data.checks.min_class_ratio {min_ratio})")
    return _record("balance", [], detail, round(worst, 6), min_ratio)


def content_hashes(images: np.ndarray) -> list[bytes]:
    flat = images.reshape(len(images), -1)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def _duplicates(splits: dict) -> dict[str, Any]:
    seen: dict[bytes, list[tuple[str, int]]] = defaultdict(list)
    for s in SPLITS:
        if s in splits:
            for i, h in enumerate(content_hashes(splits[s].images)):
                seen[h].append((s, i))
    groups = [g for g in seen.values() if len(g) > 1]
    bad, within, across, conflicting = [], 0, 0, 0
    for g in groups:
        names = {s for s, _ in g}
        across += len(names) > 1
        within += len(g) > len(names)
        conflicting += len({int(splits[s].labels[i]) for s, i in g}) > 1
        bad.append(" = ".join(f"{s}:{splits[s].ids[i]}" for s, i in g[:4]) + (" = ..." if len(g) > 4 else ""))
    # counted in images and in groups of identical images: "1 images appear more than once" was one group of two
    images = sum(len(g) for g in groups)
    detail = (f"{images} images in {len(groups)} group{'s' if len(groups) != 1 else ''} of identical images "
              f"({across} across splits, {within} within a split, {conflicting} with different labels)") if groups else ""
    return _record("duplicates", bad, detail, len(groups), 0)


def image_stats(images: np.ndarray) -> dict[str, float]:
    """Brightness, contrast and ink (the share of pixels above mid-grey) of a uint8 batch, in [0, 1]."""
    total = s1 = s2 = ink = 0.0
    for i in range(0, len(images), 4096):  # float copies of a few thousand images at a time
        x = images[i: i + 4096].astype(np.float64) / 255.0
        total, s1, s2, ink = total + x.size, s1 + x.sum(), s2 + (x * x).sum(), ink + (x > 0.5).sum()
    if not total:
        return {"mean": 0.0, "std": 0.0, "ink": 0.0}
    mean = s1 / total
    return {"mean": round(mean, 6), "std": round(float(np.sqrt(max(s2 / total - mean * mean, 0.0))), 6),
            "ink": round(ink / total, 6)}


def run_checks(splits: dict, classes: list[str], channels: int, size: int, cfg: DataChecksConfig) -> list[dict]:
    """Every check not set to off, in order; each record carries its severity."""
    make = {
        "shape": lambda: _shape(splits, channels, size),
        "values": lambda: _values(splits, cfg.max_blank_fraction),
        "labels": lambda: _labels(splits, classes),
        "balance": lambda: _balance(splits, classes, cfg.min_class_ratio),
        "duplicates": lambda: _duplicates(splits),
    }
    out = []
    for name, check in make.items():
        severity = getattr(cfg, name)
        record = {"name": name, "status": "off", "ids": [], "n_offending": 0} if severity == "off" else check()
        out.append({**record, "severity": severity})
    return out


def failed(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "failed"]


def describe(record: dict) -> str:
    ids = record.get("ids") or []
    shown = ", ".join(ids[:SHOWN_IDS]) + (f" and {record['n_offending'] - SHOWN_IDS} more"
                                         if record.get("n_offending", 0) > SHOWN_IDS else "")
    return f"{record['name']}: {record['detail']}" + (f" ({shown})" if shown else "")


def enforce(records: list[dict]) -> None:
    """Raise for the checks set to error that failed, all of them named in one line."""
    stop = [r for r in failed(records) if r["severity"] == "error"]
    if stop:
        keys = " / ".join(f"data.checks.{r['name']}" for r in stop)
        raise DataCheckError("data check failed: " + "; ".join(describe(r) for r in stop)
                             + f"; fix the data, or set {keys} to warn to record it and go on")
