"""Suspected label errors by confident learning: every train and validation image gets predicted probabilities
from a model that never saw it (k-fold cross-validation, stratified and seeded, each fold's model trained with
a named fast recipe), the test images the mean of the k fold models' (none of which saw them either: an
ensemble of the folds, where a fifth model trained on everything would cost a quarter more time for the same
out-of-sample property), and cleanlab (the library made for it) ranks the images whose given label the
probabilities contradict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..data.batches import Split


@dataclass
class Scored:
    """Out-of-sample predicted probabilities of one pool of images, with what cleanlab made of them."""

    split: np.ndarray  # (N,) the split of each image: train | val | test
    ids: list[str]
    labels: np.ndarray  # (N,) the given labels
    probabilities: np.ndarray  # (N, K) out-of-sample
    quality: np.ndarray  # (N,) cleanlab's label quality score (self-confidence): low is suspect
    issue: np.ndarray  # (N,) bool: flagged by confident learning (prune by noise rate)

    def ranked(self) -> np.ndarray:
        """The flagged images, most suspect first."""
        flagged = np.flatnonzero(self.issue)
        return flagged[np.argsort(self.quality[flagged], kind="stable")]

    def suggested(self) -> np.ndarray:
        return self.probabilities.argmax(1)


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N,) fold of each image: each class dealt round-robin over the folds in a seeded order."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for k in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == k))
        fold[members] = (np.arange(len(members)) + rng.integers(folds)) % folds
    return fold


@torch.no_grad()
def probabilities(model: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int = 2000) -> np.ndarray:
    from ..evaluation.scoring import predict_probabilities

    return predict_probabilities(model, images, batch, device)[1].numpy().astype(np.float64)


def cross_validate(pool: Split, test: Split, folds: int, seed: int, train_fold: Callable[[Split, Split, int], torch.nn.Module],
                   device: torch.device, progress: Callable[[str], None] = lambda _: None) -> tuple[np.ndarray, np.ndarray]:
    """(out-of-fold probabilities of `pool`, the fold models' mean probabilities of `test`).

    `train_fold(train, held_out, fold)` returns a trained model; `held_out` is for its per-epoch log only (the
    recipe keeps its last epoch, so nothing is chosen on it)."""
    labels = pool.labels.numpy()
    fold = stratified_folds(labels, folds, seed)
    pool_probs = np.zeros((len(labels), 0))
    test_probs = None
    for k in range(folds):
        progress(f"audit: fold {k + 1}/{folds}: training on {int((fold != k).sum())} images")
        inside, held = torch.from_numpy(np.flatnonzero(fold != k)), torch.from_numpy(np.flatnonzero(fold == k))
        model = train_fold(Split(pool.images[inside], pool.labels[inside]), Split(pool.images[held], pool.labels[held]), k)
        held_probs = probabilities(model, pool.images[held], device)
        if pool_probs.shape[1] == 0:
            pool_probs = np.zeros((len(labels), held_probs.shape[1]))
        pool_probs[held.numpy()] = held_probs
        t = probabilities(model, test.images, device) if len(test) else np.zeros((0, held_probs.shape[1]))
        test_probs = t / folds if test_probs is None else test_probs + t / folds
    return pool_probs, test_probs


def confident_learning(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(quality score, flagged) per image: cleanlab's self-confidence score and its find_label_issues mask."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    if len(labels) == 0:
        return np.zeros(0), np.zeros(0, dtype=bool)
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    present = np.unique(labels)
    if len(present) < 2:  # confident learning compares classes; one class alone has nothing to be mistaken for
        return quality, np.zeros(len(labels), dtype=bool)
    flagged = find_label_issues(labels, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    return quality, np.asarray(flagged, dtype=bool)


def score_splits(splits: dict[str, Split], probs: dict[str, np.ndarray]) -> Scored:
    """The splits' out-of-sample probabilities through confident learning: train and validation together (one
    pool, one cross-validation), the test split on its own (its probabilities come from other models)."""
    parts = []
    for names in (("train", "val"), ("test",)):
        names = [n for n in names if n in splits]
        if not names:
            continue
        labels = np.concatenate([splits[n].labels.numpy() for n in names])
        p = np.concatenate([probs[n] for n in names])
        quality, flagged = confident_learning(labels, p)
        parts.append((np.concatenate([[n] * len(splits[n]) for n in names]),
                      [i for n in names for i in splits[n].sample_ids()], labels, p, quality, flagged))
    split, ids, labels, p, quality, flagged = zip(*parts)
    return Scored(np.concatenate(split), [i for part in ids for i in part], np.concatenate(labels),
                  np.concatenate(p), np.concatenate(quality), np.concatenate(flagged))
