"""Metrics of image translation (trip, papers/trip.txt App. D), as plain array functions.

* `ssim_std` (Eq. 8): SSIM between consecutive frames of a translation path (skimage
  structural_similarity, data range per image pair), its std per image, the mean over images.
  Low = the path changes in even steps. A failed translation (all frames equal) is also low,
  so it is read together with AAS and the oracle's Spearman correlation.
* `frechet_distance`: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of two feature sets;
  on an attribute oracle's features it is `fid_oracle`, NOT Inception's FID, and is named so.
* `swap_accuracy` (AAS), `spearman_change`, `mean_abs_change`: the oracle-side numbers.
"""
from __future__ import annotations

import numpy as np


def ssim_std(frames: np.ndarray) -> float:
    """frames [T, N, H, W, C] float (any range): mean over the N images of
    std_t SSIM(frame_{t-1}, frame_t), t = 1..T-1. Written over skimage because torchmetrics'
    SSIM takes one data range per batch, not per image as the authors' evaluation does."""
    from skimage.metrics import structural_similarity

    t, n = frames.shape[:2]
    if t < 3:
        raise ValueError(f"ssim_std needs at least 3 frames, got {t}")
    side = min(frames.shape[2:4])
    win = min(7, side if side % 2 else side - 1)
    stds = []
    for i in range(n):
        vals = []
        for j in range(1, t):
            a, b = frames[j - 1, i].astype(np.float64), frames[j, i].astype(np.float64)
            rng = float(max(a.max(), b.max()) - min(a.min(), b.min())) or 1.0
            vals.append(structural_similarity(a, b, data_range=rng, channel_axis=-1, win_size=win))
        stds.append(np.std(vals))
    return float(np.mean(stds))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature rows a [N, D] and b [M, D]."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("frechet_distance needs at least 2 rows per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # near-singular product: the usual epsilon offset
        off = np.eye(len(s_a)) * 1e-6
        covmean = linalg.sqrtm((s_a + off) @ (s_b + off))
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def swap_accuracy(source: np.ndarray, translated: np.ndarray, threshold: float = 0.5) -> float:
    """AAS: the fraction of images whose translated attribute lies on the other side of
    `threshold` than the source label (source a -> target 1 - a, v = 1 - 2a)."""
    src = np.asarray(source) >= threshold
    return float(((np.asarray(translated) >= threshold) == ~src).mean())


def spearman_change(v: np.ndarray, change: np.ndarray) -> float:
    """Spearman rank correlation between the latent v and the measured change (flattened,
    pooled over images); 0 when either side is constant."""
    from scipy.stats import spearmanr

    v, change = np.asarray(v, np.float64).ravel(), np.asarray(change, np.float64).ravel()
    if np.ptp(v) == 0 or np.ptp(change) == 0:
        return 0.0
    return float(spearmanr(v, change).statistic)


def mean_abs_change(before: np.ndarray, after: np.ndarray) -> float:
    """Mean |after - before| (after [T, N, K] frames against before [N, K], or matching shapes)."""
    return float(np.abs(np.asarray(after, np.float64) - np.asarray(before, np.float64)).mean())
