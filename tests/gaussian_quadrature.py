"""NumPy references for Gaussian expectations E[f(u) g(v)], independent of entk's implementation.

`(u, v)` is centred Gaussian with variances `q11`, `q22` and covariance `q12` (arrays that broadcast
together), as after a `Dense` layer with weight and bias scales `w_std`, `b_std` (`first_layer_cov`).
Used by the stax tests to check closed-form nonlinearities.
"""

from __future__ import annotations

import numpy as np


def rel_err(a, b) -> float:
    """max |a − b| / max |b|."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def first_layer_cov(x1, x2, w_std: float, b_std: float):
    """`(q12 (N1, N2), q11 (N1, 1), q22 (1, N2))` after `Dense(W_std=w_std, b_std=b_std)`."""
    x1, x2 = np.asarray(x1), np.asarray(x2)
    d = x1.shape[-1]
    q12 = w_std ** 2 * x1 @ x2.T / d + b_std ** 2
    q11 = w_std ** 2 * np.sum(x1 ** 2, -1) / d + b_std ** 2
    q22 = w_std ** 2 * np.sum(x2 ** 2, -1) / d + b_std ** 2
    return q12, q11[:, None], q22[None, :]


def _cholesky(q12, q11, q22):
    """`(L11, L21, L22)` with `u = L11 z1`, `v = L21 z1 + L22 z2` for independent standard z."""
    return np.sqrt(q11), q12 / np.sqrt(q11), np.sqrt(np.maximum(q22 - q12 ** 2 / q11, 0))


def gauss_hermite(f, g, q12, q11, q22, deg: int = 120):
    """E[f(u) g(v)] by a `deg`×`deg`-point Gauss–Hermite rule (smooth f, g)."""
    z, w = np.polynomial.hermite.hermgauss(deg)
    z, w = np.sqrt(2) * z, w / np.sqrt(np.pi)
    l11, l21, l22 = (t[..., None, None] for t in _cholesky(q12, q11, q22))
    return np.einsum("...ij,i,j->...", f(l11 * z[:, None]) * g(l21 * z[:, None] + l22 * z), w, w)


# ∫ r^(degree+1) e^(−r²/2) dr over r ≥ 0, for the polar rule below.
_RADIAL = {0: 1.0, 2: 2.0, 4: 8.0, 6: 48.0}


def polar(f, g, q12, q11, q22, degree: int, points: int = 200_000):
    """E[f(u) g(v)] for f, g positively homogeneous with f(u)g(v) of total `degree`: the radial part
    integrates in closed form, leaving (c/2π)·∫ f(L₁e(α)) g(L₂e(α)) dα on `points` angles."""
    alpha = np.linspace(0, 2 * np.pi, points + 1)[:-1]
    l11, l21, l22 = (t[..., None] for t in _cholesky(q12, q11, q22))
    u, v = l11 * np.cos(alpha), l21 * np.cos(alpha) + l22 * np.sin(alpha)
    return _RADIAL[degree] * np.mean(f(u) * g(v), -1)
