"""The Fréchet distance between two sets of feature vectors, each summarised by its mean and covariance.

Why here: FID (Inception features, ``evaluate``) and FD_judge (the quality judge's features, logged
during training) are the same formula over different features, and training may not import
evaluation. d = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2); the trace of the matrix square
root is the sum of the square roots of the eigenvalues of S1^1/2 S2 S1^1/2, a symmetric PSD matrix,
so no complex parts or scipy are needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class FeatureStats:
    mu: np.ndarray       # [D] float64
    sigma: np.ndarray    # [D, D] float64
    n: int

    @classmethod
    def of(cls, features: np.ndarray) -> "FeatureStats":
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise ValueError(f"need at least 2 feature vectors [N, D], got {f.shape}")
        return cls(f.mean(axis=0), np.cov(f, rowvar=False), len(f))


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"statistics of {a.mu.shape[0]}-d and {b.mu.shape[0]}-d features")
    root = _sqrt_psd(a.sigma)
    m = root @ b.sigma @ root
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    d = float(((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_sqrt)
    return max(d, 0.0)
