"""Near-copies of one image (re-encoded, shifted by a pixel) within and across the splits; groups that span
splits are leakage.

Two steps, measured on real MNIST (the 10,000 test images; 2 cores):
- candidates: each image moved so its centre of mass is the middle by the exact fractional offset (a copy
  shifted by a pixel, or re-encoded, lands on its original), blurred and pooled to 14x14, and its CANDIDATES
  nearest neighbours by cosine (a matrix product in chunks, no index library). Whole-pixel centring left
  2.3 % of JPEG-and-shift copies outside the 10 nearest (ranks up to 78, among look-alike 1s); fractional
  centring puts every one of 300 first. A neighbour count, not a threshold: blurred, thousands of 1s look alike.
- verification: the Pearson correlation of the two images centred by whole pixels, at full resolution, the
  best over shifts of up to one pixel either way. No two different test images reached 0.99 (the most alike
  pair: 0.985; 11 pairs reach 0.98), while every copy shifted by one pixel scored at least 0.993 and every
  JPEG re-encoding at quality 75 at least 0.994 (at quality 50 and shifted: 0.984), so
  audit.near_duplicate_threshold defaults to 0.99. (Fractionally centred images correlate more, copies
  and different digits alike: 19 different pairs reached 0.99.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CANDIDATES = 10  # nearest neighbours verified per image ...
# ... when their descriptors' cosine reaches this: every copy above scored at least 0.984 (JPEG quality 50 and
# shifted; shifted alone 0.996), while 58 % of all candidate pairs on full MNIST score less: verifying them,
# two thirds of the search's 55 s, found nothing.
MIN_COSINE = 0.97
CHUNK = 2048  # rows of the similarity matrix at a time (2048 x 70,000 floats: 570 MB at most)
VERIFY = 20_000  # pairs verified at a time (two 20,000-image stacks: 125 MB for MNIST)


def centred(images: torch.Tensor) -> torch.Tensor:
    """Float images (N, C, H, W) in [0, 1], each moved by whole pixels so its centre of mass is the middle
    (zeros shifted in, nothing wrapped round)."""
    x = images.float() / 255.0
    n, c, h, w = x.shape
    mass = x.sum((1, 2, 3)).clamp_min(1e-6)
    cy = (x.sum((1, 3)) * torch.arange(h)).sum(1) / mass
    cx = (x.sum((1, 2)) * torch.arange(w)).sum(1) / mass
    dy = torch.round((h - 1) / 2 - cy).long().clamp(-h + 1, h - 1)
    dx = torch.round((w - 1) / 2 - cx).long().clamp(-w + 1, w - 1)
    big = F.pad(x, (w, w, h, h))
    rows = torch.arange(h)[None, :] + h - dy[:, None]
    cols = torch.arange(w)[None, :] + w - dx[:, None]
    return big[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def centred_subpixel(images: torch.Tensor) -> torch.Tensor:
    """As centred, but moved by the exact fractional offset (bilinear): no rounding leaves a copy a pixel off
    its original, so the copy is its original's nearest candidate (the interpolation also smooths, which is
    why verification uses whole-pixel centring)."""
    x = images.float() / 255.0
    n, c, h, w = x.shape
    mass = x.sum((1, 2, 3)).clamp_min(1e-6)
    cy = (x.sum((1, 3)) * torch.arange(h)).sum(1) / mass
    cx = (x.sum((1, 2)) * torch.arange(w)).sum(1) / mass
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2], theta[:, 1, 2] = (cx - (w - 1) / 2) * 2 / w, (cy - (h - 1) / 2) * 2 / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return F.normalize(v - v.mean(1, keepdim=True), dim=1)


def descriptor(c: torch.Tensor) -> torch.Tensor:
    """Blurred (sigma 1 px) and pooled to 14x14: alike under a pixel of misalignment."""
    k = torch.arange(-3, 4, dtype=torch.float32)
    g = torch.exp(-k ** 2 / 2.0)
    g = g / g.sum()
    ch = c.shape[1]
    b = F.conv2d(c, g.view(1, 1, 1, 7).repeat(ch, 1, 1, 1), padding=(0, 3), groups=ch)
    b = F.conv2d(b, g.view(1, 1, 7, 1).repeat(ch, 1, 1, 1), padding=(3, 0), groups=ch)
    return _unit(F.adaptive_avg_pool2d(b, min(14, c.shape[-1])).flatten(1))


def aligned_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(P,) the best Pearson correlation of a[i] and b[i] over shifts of b by -1..1 pixel each way."""
    ua, best = _unit(a.flatten(1)), torch.full((len(a),), -1.0)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            shifted = F.pad(b, (1, 1, 1, 1))[:, :, 1 + dy: 1 + dy + b.shape[2], 1 + dx: 1 + dx + b.shape[3]]
            best = torch.maximum(best, (ua * _unit(shifted.flatten(1))).sum(1))
    return best


@dataclass
class Groups:
    members: list[np.ndarray]  # indices of each group's images, the group's first image first
    score: list[float]  # the weakest verified link inside each group


def find(images: torch.Tensor, threshold: float, candidates: int = CANDIDATES) -> Groups:
    """Groups of near-duplicate images among `images` (uint8, (N, C, H, W)): connected by verified pairs."""
    n = len(images)
    if n < 2:
        return Groups([], [])
    c = centred(images)
    d = descriptor(centred_subpixel(images))
    k = min(candidates, n - 1)
    found = []
    for start in range(0, n, CHUNK):
        sim = d[start:start + CHUNK] @ d.T
        rows = torch.arange(len(sim))
        sim[rows, rows + start] = -2.0  # not itself
        top = sim.topk(k, dim=1)
        i = (rows + start)[:, None].expand_as(top.indices).reshape(-1)
        j = top.indices.reshape(-1)
        close = top.values.reshape(-1) >= MIN_COSINE
        i, j = i[close], j[close]
        found.append(torch.minimum(i, j) * n + torch.maximum(i, j))
    pairs = torch.unique(torch.cat(found))  # each pair once, from whichever side it was found
    i, j = pairs // n, pairs % n
    scores = torch.cat([aligned_correlation(c[i[s0:s0 + VERIFY]], c[j[s0:s0 + VERIFY]])
                        for s0 in range(0, len(pairs), VERIFY)]) if len(pairs) else torch.zeros(0)
    ok = scores >= threshold
    i, j, s = i[ok].numpy(), j[ok].numpy(), scores[ok].numpy()
    return _components(n, i, j, s)


def _components(n: int, i: np.ndarray, j: np.ndarray, s: np.ndarray) -> Groups:
    """Union-find over the verified pairs; groups ordered by their first image."""
    parent = np.arange(n)

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    linked = np.unique(np.concatenate([i, j])) if len(i) else np.zeros(0, dtype=np.int64)
    by_root: dict[int, list[int]] = {}
    for a in linked.tolist():
        by_root.setdefault(root(a), []).append(a)
    weakest: dict[int, float] = {}
    for a, v in zip(i.tolist(), s.tolist()):
        r = root(a)
        weakest[r] = min(weakest.get(r, 1.0), v)
    roots = sorted(by_root)
    return Groups([np.array(sorted(by_root[r])) for r in roots], [weakest[r] for r in roots])
