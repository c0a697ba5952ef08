"""Two models on the same test images, image by image: the images the challenger fixes (production wrong, it
right) and breaks (production right, it wrong), an exact McNemar test on those two counts, and the recall
each class loses. Aggregate accuracy hides all three: two models at 99.6 % can disagree on 40 images, and a
challenger one image better is noise the gate should not move production for (register.significance).
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
    return Paired(len(labels), len(fixed), len(broken), float(p), drop, worst if drop > 0 else None,
                  [ids[i] for i in broken], [ids[i] for i in fixed])


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
    return [
        Check("paired", f"p {paired.p_value:.3g} ({flips})", limit("significance", significance, f"{significance}"),
              significance is None or paired.p_value <= significance),
        Check("negative_flips", f"{broken_share:.2%}",
              limit("max_negative_flips", max_negative_flips, f"{max_negative_flips or 0:.2%}"),
              max_negative_flips is None or broken_share <= max_negative_flips),
        Check("class_drop", f"{paired.class_drop:.2%}{where}",
              limit("max_class_drop", max_class_drop, f"{max_class_drop or 0:.2%}"),
              max_class_drop is None or paired.class_drop <= max_class_drop),
    ]
