"""Two models on the same test images, image by image: the images the challenger fixes (production wrong, it
right) and breaks (production right, it wrong), an exact McNemar test on those two counts, a paired bootstrap
interval of the macro-F1 difference, and the recall each class loses. Aggregate accuracy hides them all: two
models at 99.6 % can disagree on 40 images, and a challenger one image better is noise the gate should not move
production for (register.significance).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from .gate import Check


@dataclass
class Paired:
    n: int  # test images both were scored on
    fixed: int  # production wrong, challenger right (positive flips)
    broken: int  # production right, challenger wrong (negative flips)
    p_value: float  # one-sided exact McNemar: P(>= `fixed` of the fixed + broken flips | both equally good)
    class_drop: float  # the most recall one class loses (0 when none loses any)
    class_dropped: Optional[str]
    broken_ids: list[str]
    fixed_ids: list[str]
    macro_f1_diff: float = 0.0  # challenger minus production, on the test split
    macro_f1_ci: tuple[float, float] = (0.0, 0.0)  # its 95 % paired bootstrap interval (BOOTSTRAP resamples)

    def record(self, shown: int = 20) -> dict:
        """For registered.json and the version's tags: counts, p-value, the first flipped ids."""
        out = asdict(self)
        out["broken_ids"], out["fixed_ids"] = self.broken_ids[:shown], self.fixed_ids[:shown]
        return out


def compare(labels: np.ndarray, challenger: np.ndarray, production: np.ndarray, classes: list[str],
            ids: list[str]) -> Paired:
    """The paired comparison of two models' predicted classes for the same `labels` (all shaped (N,))."""
    labels, challenger, production = (np.asarray(a) for a in (labels, challenger, production))
    if not labels.shape == challenger.shape == production.shape:
        raise ValueError(f"paired comparison: {labels.shape}, {challenger.shape} and {production.shape} predictions")
    right_c, right_p = challenger == labels, production == labels
    fixed, broken = np.flatnonzero(right_c & ~right_p), np.flatnonzero(right_p & ~right_c)
    flips = len(fixed) + len(broken)
    p = mcnemar_exact(len(fixed), flips)
    drops = {}
    for k, name in enumerate(classes):
        mask = labels == k
        if mask.any():
            drops[name] = float(right_p[mask].mean() - right_c[mask].mean())
    worst = max(drops, key=drops.get) if drops else None
    drop = max(drops[worst], 0.0) if worst is not None else 0.0
    ids = list(ids)
    diff, low, high = macro_f1_difference(labels, challenger, production, len(classes))
    return Paired(len(labels), len(fixed), len(broken), float(p), drop, worst if drop > 0 else None,
                  [ids[i] for i in broken], [ids[i] for i in fixed], diff, (low, high))


BOOTSTRAP = 1000  # resamples: the ends move by ~0.0001 F1 between bootstrap seeds on 10,000 images (0.26 s)


def macro_f1(labels: np.ndarray, predicted: np.ndarray, k: int, weights: np.ndarray) -> np.ndarray:
    """Macro F1 (evaluation/scoring.py's: 2 TP / (true + predicted), 0 for a class with neither) under each row
    of `weights` (R, N): how often each image is drawn in a resample."""
    onehot_true, onehot_pred = np.eye(k)[labels], np.eye(k)[predicted]
    tp = weights @ (onehot_true * (labels == predicted)[:, None])
    total = weights @ onehot_true + weights @ onehot_pred
    return np.divide(2 * tp, total, out=np.zeros_like(tp), where=total > 0).mean(1)


def macro_f1_difference(labels: np.ndarray, challenger: np.ndarray, production: np.ndarray, k: int,
                        resamples: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float, float]:
    """Challenger minus production macro F1 and its 95 % percentile interval over paired bootstrap resamples
    (the same images drawn for both models, so what they share cancels). Seeded: one decision, one interval."""
    n = len(labels)
    if n == 0:
        return 0.0, 0.0, 0.0
    labels, challenger, production = (np.asarray(a, dtype=np.int64) for a in (labels, challenger, production))
    ones = np.ones((1, n))
    diff = float(macro_f1(labels, challenger, k, ones)[0] - macro_f1(labels, production, k, ones)[0])
    rng, diffs = np.random.default_rng(seed), []
    chunk = max(1, min(resamples, 2_000_000 // n))  # draw counts of ~2M images at a time (16 MB)
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        drawn = rng.integers(0, n, (rows, n)) + np.arange(rows)[:, None] * n
        weights = np.bincount(drawn.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)
        diffs.append(macro_f1(labels, challenger, k, weights) - macro_f1(labels, production, k, weights))
    low, high = np.percentile(np.concatenate(diffs), [2.5, 97.5])
    return diff, float(low), float(high)


def mcnemar_exact(fixed: int, flips: int) -> float:
    """One-sided exact McNemar p-value: P(X >= fixed) for X ~ Binomial(flips, 1/2). Exact, not
    the chi-squared approximation: a few dozen flips are the usual case between good models. Written here, not
    scipy.stats.binomtest (which tests/test_trust.py checks it against): scipy is a test dependency only, and
    a machine installed without them registers models too."""
    if flips == 0:
        return 1.0
    # Each term in logs (math.comb's whole numbers took 3 s at 10,000 flips), within 1e-9 of scipy's (the test).
    log_total = math.lgamma(flips + 1) - flips * math.log(2)
    return min(1.0, math.fsum(math.exp(log_total - math.lgamma(k + 1) - math.lgamma(flips - k + 1))
                              for k in range(fixed, flips + 1)))


def paired_checks(paired: Paired, production: str, significance: Optional[float],
                  max_negative_flips: Optional[float], max_class_drop: Optional[float]) -> list[Check]:
    """The gate's checks on the comparison; a limit left null is reported and passes."""
    def limit(key: str, value: Optional[float], shown: str) -> str:
        return f"register.{key} <= {shown}" if value is not None else f"register.{key} off: reported"

    broken_share = paired.broken / paired.n if paired.n else 0.0
    where = f" ({paired.class_dropped})" if paired.class_dropped else ""
    flips = f"{paired.fixed} fixed, {paired.broken} broken of {paired.n} vs v{production}"
    low, high = paired.macro_f1_ci
    return [
        Check("paired", f"p {paired.p_value:.3g} ({flips})", limit("significance", significance, f"{significance}"),
              significance is None or paired.p_value <= significance),
        Check("negative_flips", f"{broken_share:.2%}",
              limit("max_negative_flips", max_negative_flips, f"{max_negative_flips or 0:.2%}"),
              max_negative_flips is None or broken_share <= max_negative_flips),
        Check("class_drop", f"{paired.class_drop:.2%}{where}",
              limit("max_class_drop", max_class_drop, f"{max_class_drop or 0:.2%}"),
              max_class_drop is None or paired.class_drop <= max_class_drop),
        Check("macro_f1_diff", f"{paired.macro_f1_diff:+.4f} (95% CI {low:+.4f} to {high:+.4f})",
              f"paired bootstrap, {BOOTSTRAP} resamples: reported", True),
    ]
