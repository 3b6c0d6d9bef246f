"""Kernel Inception Distance (KID): the unbiased estimate of the squared MMD between generated
and reference features with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3
(Binkowski et al. 2018, as torchmetrics and clean-fid use it).

    KID = mean_{i != j} k(x_i, x_j) + mean_{a != b} k(y_a, y_b) - 2 mean_{i, a} k(x_i, y_a)

over all n generated and m reference vectors (a U-statistic: unbiased at every n, unlike
FID, so small runs are not penalised by sample size; it may be slightly negative). The 95%
interval is KID +- 1.96 standard errors from its first-order (Hoeffding) projection on the
generated samples, the reference held fixed as the FID interval holds it:
se = 2 std_i(h(x_i) - g(x_i)) / sqrt(n), h(x_i) = mean_{j != i} k(x_i, x_j),
g(x_i) = mean_a k(x_i, y_a). Numpy only; the kernel is computed in blocks of rows.
"""

from __future__ import annotations

import numpy as np

Z_95 = 1.959963984540054


def _kernel_row_sums(x: np.ndarray, y: np.ndarray, block: int = 1024) -> np.ndarray:
    """sum_a k(x_i, y_a) for every i, without holding the whole n x m kernel."""
    d = x.shape[1]
    out = np.empty(x.shape[0])
    for start in range(0, x.shape[0], block):
        out[start : start + block] = ((x[start : start + block] @ y.T / d + 1.0) ** 3).sum(axis=1)
    return out


def kid(gen_features: np.ndarray, ref_features: np.ndarray) -> tuple[float, float, float]:
    """(kid, ci_low, ci_high) of generated [n, d] against reference [m, d] features."""
    x = np.asarray(gen_features, dtype=np.float64)
    y = np.asarray(ref_features, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be [n, d] and [m, d], got {x.shape} and {y.shape}")
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    if n < 3 or m < 2:
        raise ValueError(f"KID needs at least 3 generated and 2 reference vectors, got {n} and {m}")
    diag_x = (np.einsum("ij,ij->i", x, x) / d + 1.0) ** 3
    diag_y = (np.einsum("ij,ij->i", y, y) / d + 1.0) ** 3
    h = (_kernel_row_sums(x, x) - diag_x) / (n - 1)  # mean_{j != i} k(x_i, x_j)
    g = _kernel_row_sums(x, y) / m  # mean_a k(x_i, y_a)
    yy = (_kernel_row_sums(y, y).sum() - diag_y.sum()) / (m * (m - 1))
    value = float(h.mean() + yy - 2.0 * g.mean())
    se = 2.0 * float(np.std(h - g, ddof=1)) / np.sqrt(n)
    return value, value - Z_95 * se, value + Z_95 * se
