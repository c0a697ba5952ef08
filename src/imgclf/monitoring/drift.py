"""Drift of a batch against the model's training data, by three detectors that see different things:

- image statistics (brightness, contrast, ink; width, height and aspect of files): a two-sample KS test
  per statistic, Bonferroni within the family, and the shift in units of the reference's spread (a p-value
  alone flags any difference once there are thousands of images);
- the penultimate layer's embeddings, what the model itself sees: MMD with an RBF kernel (median
  bandwidth) and a permutation p-value, and a domain classifier (logistic regression on one half, ROC AUC
  on the other half with its Mann-Whitney p-value);
- the predicted classes: chi-square of the batch's counts against the validation split's shares, and
  their total variation distance.

Pure numpy/torch (the tests' distributions are a few lines each; scipy.stats and an optimizer that imports
torch's compiler would add ten seconds to every batch); see docs/monitoring.md for why not Evidently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..config import DriftConfig

STATS = ("brightness", "contrast", "ink")
SHAPE_STATS = ("width", "height", "aspect")


@dataclass
class Profile:
    """What drift compares: per-image statistics, embeddings and predicted classes of one set of images."""

    features: dict[str, np.ndarray]
    embeddings: np.ndarray  # (N, D)
    predicted: np.ndarray  # (N,) class indices

    def summary(self) -> dict[str, float]:
        return {k: round(float(v.mean()), 6) for k, v in self.features.items()}


def image_features(images: np.ndarray, sizes: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Per image, in [0, 1]: mean (brightness), standard deviation (contrast), share above mid-grey (ink)."""
    out = {k: np.empty(len(images)) for k in STATS}
    for i in range(0, len(images), 4096):  # float copies of a few thousand images at a time
        x = images[i: i + 4096].reshape(min(4096, len(images) - i), -1).astype(np.float32) / 255.0
        out["brightness"][i: i + len(x)], out["contrast"][i: i + len(x)] = x.mean(1), x.std(1)
        out["ink"][i: i + len(x)] = (x > 0.5).mean(1)
    if sizes is not None and len(sizes) == len(images):
        out.update(width=sizes[:, 0], height=sizes[:, 1], aspect=sizes[:, 0] / np.maximum(sizes[:, 1], 1))
    return out


def ks_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and its asymptotic p-value (Stephens' small-sample correction)."""
    a, b = np.sort(a), np.sort(b)
    both = np.concatenate([a, b])
    d = float(np.abs(np.searchsorted(a, both, "right") / len(a) - np.searchsorted(b, both, "right") / len(b)).max())
    en = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    lam = (en + 0.12 + 0.11 / en) * d
    if lam < 0.2:
        return d, 1.0
    j = np.arange(1, 101)
    return d, float(min(1.0, max(0.0, 2 * np.sum((-1.0) ** (j - 1) * np.exp(-2 * j * j * lam * lam)))))


def wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    """1-D earth mover's distance: the area between the two empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    both = np.sort(np.concatenate([a, b]))
    gaps = np.diff(both)
    cdf_a = np.searchsorted(a, both[:-1], "right") / len(a)
    cdf_b = np.searchsorted(b, both[:-1], "right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * gaps))


def chi2_sf(x: float, dof: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(x / 2, dtype=torch.float64)))


def auc_test(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """ROC AUC as Mann-Whitney U / (n1 n2), ties at half; one-sided p-value (normal approximation) of AUC > 0.5."""
    values, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    n1, n2 = len(pos), len(neg)
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2
    z = (u - n1 * n2 / 2) / math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12)
    return float(u / (n1 * n2)), 0.5 * math.erfc(z / math.sqrt(2))


def _scale(a: np.ndarray) -> float:
    """The reference's spread; for a constant statistic (every MNIST image is 28 px wide) a thousandth of
    its size, so that any change counts as large."""
    return max(float(a.std()), 1e-3 * max(abs(float(a.mean())), 1.0))


def stat_drift(ref: dict[str, np.ndarray], cur: dict[str, np.ndarray], cfg: DriftConfig) -> dict[str, Any]:
    names = [k for k in (*STATS, *SHAPE_STATS) if k in ref and k in cur]
    level = cfg.alpha / len(names)
    tests = {}
    for k in names:
        d, p = ks_test(ref[k], cur[k])
        shift = wasserstein(ref[k], cur[k]) / _scale(ref[k])
        tests[k] = {"ks": round(d, 4), "p_value": p, "shift": round(shift, 4),
                    "reference_mean": round(float(ref[k].mean()), 4), "batch_mean": round(float(cur[k].mean()), 4),
                    "drifted": bool(p < level and shift >= cfg.min_stat_shift)}
    flagged = [k for k, t in tests.items() if t["drifted"]]
    return {"drifted": bool(flagged), "alpha": level, "min_shift": cfg.min_stat_shift, "tests": tests,
            "reason": ", ".join(f"{k} moved {tests[k]['shift']:.2f} std (p={tests[k]['p_value']:.1e})"
                                for k in flagged)}


def mmd_test(x: torch.Tensor, y: torch.Tensor, permutations: int, gen: torch.Generator) -> tuple[float, float]:
    """Squared MMD (biased, RBF kernel with the median heuristic) and its permutation p-value."""
    z = torch.cat([x, y]).double()
    d2 = torch.cdist(z, z).pow(2)
    n, m = len(x), len(y)
    off = d2[torch.triu_indices(n + m, n + m, 1).unbind()]
    kernel = torch.exp(-d2 / off.median().clamp_min(1e-12))
    signs = torch.cat([torch.full((n,), 1.0 / n), torch.full((m,), -1.0 / m)]).double()
    cols = [signs] + [signs[torch.randperm(n + m, generator=gen)] for _ in range(permutations)]
    s = torch.stack(cols, 1)
    values = (s * (kernel @ s)).sum(0)
    observed = float(values[0])
    return observed, float((1 + (values[1:] >= observed).sum()) / (1 + permutations))


def domain_classifier(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[float, float]:
    """Held-out ROC AUC of an L2 logistic regression telling y (batch) from x (reference), fitted by Newton's
    method on one half of each, and the one-sided p-value of that AUC under "no difference"."""
    px, py = torch.randperm(len(x), generator=gen), torch.randperm(len(y), generator=gen)
    hx, hy = len(x) // 2, len(y) // 2
    train = torch.cat([x[px[:hx]], y[py[:hy]]]).double()
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    xs = torch.cat([(train - mean) / std, torch.ones(len(train), 1, dtype=torch.float64)], 1)  # last column: bias
    labels = torch.cat([torch.zeros(hx), torch.ones(hy)]).double()
    w = torch.zeros(xs.shape[1], dtype=torch.float64)
    ridge = torch.eye(xs.shape[1], dtype=torch.float64)
    ridge[-1, -1] = 0.0
    for _ in range(25):
        p = torch.sigmoid(xs @ w)
        grad = xs.T @ (p - labels) + ridge @ w
        hess = (xs * (p * (1 - p))[:, None]).T @ xs + ridge
        step = torch.linalg.solve(hess, grad)
        w -= step
        if float(step.abs().max()) < 1e-6:
            break
    score = lambda t: torch.cat([(t.double() - mean) / std, torch.ones(len(t), 1, dtype=torch.float64)], 1) @ w  # noqa: E731
    return auc_test(score(y[py[hy:]]).numpy(), score(x[px[hx:]]).numpy())


def embedding_drift(ref: np.ndarray, cur: np.ndarray, cfg: DriftConfig, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    pick = lambda a: torch.from_numpy(a)[torch.randperm(len(a), generator=gen)[: cfg.sample]]  # noqa: E731
    x, y = pick(ref), pick(cur)
    mmd2, mmd_p = mmd_test(x, y, cfg.permutations, gen)
    auc, auc_p = domain_classifier(x, y, gen)
    # Both tests must agree (no correction needed for an "and"), and the classifier must separate the two
    # well enough to matter: with thousands of images a real but tiny difference is "significant".
    drifted = mmd_p < cfg.alpha and auc_p < cfg.alpha and auc >= cfg.max_domain_auc
    return {"drifted": bool(drifted), "alpha": cfg.alpha, "n": [len(x), len(y)], "mmd2": round(mmd2, 6),
            "mmd_p_value": mmd_p, "domain_auc": round(auc, 4), "domain_auc_p_value": auc_p,
            "max_domain_auc": cfg.max_domain_auc,
            "reason": f"embeddings: domain classifier AUC {auc:.3f} (p={auc_p:.1e}), MMD p={mmd_p:.3g}" if drifted else ""}


def class_drift(ref: np.ndarray, cur: np.ndarray, classes: list[str], cfg: DriftConfig) -> dict[str, Any]:
    k = len(classes)
    ref_counts, cur_counts = np.bincount(ref, minlength=k), np.bincount(cur, minlength=k)
    expected_share = (ref_counts + 0.5) / (ref_counts.sum() + 0.5 * k)  # a class never predicted is not "impossible"
    expected = expected_share * cur_counts.sum()
    chi2 = float(((cur_counts - expected) ** 2 / expected).sum())
    p = chi2_sf(chi2, k - 1)
    ref_share, cur_share = ref_counts / max(ref_counts.sum(), 1), cur_counts / max(cur_counts.sum(), 1)
    tvd = float(0.5 * np.abs(cur_share - ref_share).sum())
    drifted = p < cfg.alpha and tvd >= cfg.max_class_shift
    moved = sorted(range(k), key=lambda i: -abs(cur_share[i] - ref_share[i]))[:3]
    return {"drifted": bool(drifted), "alpha": cfg.alpha, "chi2": round(chi2, 2), "p_value": p, "tvd": round(tvd, 4),
            "max_shift": cfg.max_class_shift, "reference_share": dict(zip(classes, np.round(ref_share, 4).tolist())),
            "batch_share": dict(zip(classes, np.round(cur_share, 4).tolist())),
            "reason": ("predicted classes moved " + f"{tvd:.2f} (TVD; " + ", ".join(
                f"{classes[i]} {ref_share[i]:.0%}→{cur_share[i]:.0%}" for i in moved) + ")") if drifted else ""}


def detect(reference: Profile, batch: Profile, classes: list[str], cfg: DriftConfig, seed: int = 0) -> dict[str, Any]:
    """The three detectors' verdicts; the batch is drifted when any of them says so."""
    base = {"n_reference": len(reference.predicted), "n_batch": len(batch.predicted)}
    if len(batch.predicted) < cfg.min_images:
        return {**base, "tested": False, "drifted": False,
                "reason": f"{len(batch.predicted)} images; drift is tested from monitor.drift.min_images={cfg.min_images}"}
    detectors = {"image_stats": stat_drift(reference.features, batch.features, cfg),
                 "embeddings": embedding_drift(reference.embeddings, batch.embeddings, cfg, seed),
                 "classes": class_drift(reference.predicted, batch.predicted, classes, cfg)}
    reasons = [d["reason"] for d in detectors.values() if d["drifted"]]
    return {**base, "tested": True, "drifted": bool(reasons), "detectors": detectors,
            "flagged": [name for name, d in detectors.items() if d["drifted"]],
            "reason": "; ".join(reasons) if reasons else "no detector flagged the batch"}
