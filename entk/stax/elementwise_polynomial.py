"""Polynomial nonlinearities: `Polynomial`, `Monomial`, `Hermite`, `RectifiedMonomial`.

Their Gaussian expectations are finite sums, exact in closed form (no quadrature, no autodiff).
For pre-activations `(u, v) ~ N(0, [[q11, q12], [q12, q22]])` (see `entk.stax.elementwise`):

- a polynomial `p(x) = Σ_m c_m x^m` expands in the Hermite basis of each side,
  `p(√q·z) = Σ_j √q^j · r_j(q) · He_j(z)/√j!` with
  `r_j(q) = Σ_{m ≥ j, m − j even} c_m · m! / (√j! · ((m−j)/2)! · 2^{(m−j)/2}) · q^{(m−j)/2}`,
  and `E[He_j(z1) He_k(z2)] = δ_jk · j! · ρ^j`, so

      E[p(u) p(v)] = Σ_j r_j(q11) · r_j(q22) · q12^j,
      E[p'(u) p'(v)] = ∂/∂q12 of that (Price's theorem)
                     = Σ_{j≥1} j · r_j(q11) · r_j(q22) · q12^{j−1};

  both are polynomials in `q11, q22, q12`, so zero variances need no special case;
- the rectified monomial `x^n·[x ≥ 0]` gives the arc-cosine kernels of order `n` (Cho & Saul 2009),
  computed by a three-term recurrence in `n` (see `_arc_cosine`).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from entk.stax.elementwise import elementwise_layer, pair_angle
from entk.stax.kernel import Layer, safe_sqrt

Array = jax.Array


def _hermite_coefficients(coef: np.ndarray) -> list[np.ndarray]:
    """`[r_0, ..., r_{n−1}]`, each the coefficients (lowest power first) of `r_j` as a polynomial
    in the variance `q` (module docstring)."""
    n = len(coef)
    out = []
    for j in range(n):
        r = np.zeros(max((n - 1 - j) // 2 + 1, 1))
        for i in range((n - 1 - j) // 2 + 1):
            m = j + 2 * i
            r[i] = coef[m] * math.factorial(m) / (math.sqrt(math.factorial(j)) * math.factorial(i)
                                                  * 2 ** i)
        out.append(r)
    return out


def _polyval(c: np.ndarray, x: Array) -> Array:
    """`Σ_i c[i] x^i` by Horner's rule (coefficients lowest power first)."""
    out = jnp.zeros_like(x) + c[-1]
    for ci in c[-2::-1]:
        out = out * x + ci
    return out


def _polynomial_layer(coef: Sequence[float], name: str) -> Layer:
    coef = np.asarray(coef, dtype=float)
    rs = _hermite_coefficients(coef)

    def fn(x):
        return _polyval(coef, x) if len(coef) else jnp.zeros_like(x)

    def nngp_fn(q12, q11, q22):
        out = jnp.zeros(jnp.broadcast_shapes(q12.shape, q11.shape, q22.shape), q12.dtype)
        for j, r in enumerate(rs):
            out = out + _polyval(r, q11) * _polyval(r, q22) * q12 ** j
        return out

    def dot_fn(q12, q11, q22):
        out = jnp.zeros(jnp.broadcast_shapes(q12.shape, q11.shape, q22.shape), q12.dtype)
        for j, r in enumerate(rs[1:], start=1):
            out = out + j * _polyval(r, q11) * _polyval(r, q22) * q12 ** (j - 1)
        return out

    return elementwise_layer(name, fn, nngp_fn, dot_fn)


def Polynomial(coef: Sequence[float]) -> Layer:
    """`φ(x) = coef[0] + coef[1]·x + … + coef[n]·x^n` (NumPy's `Polynomial` order)."""
    return _polynomial_layer(coef, f"Polynomial({list(coef)})")


def _check_degree(name: str, degree: int) -> int:
    if int(degree) != degree or degree < 0:
        raise NotImplementedError(f"{name}: degree={degree!r}; use a non-negative integer.")
    return int(degree)


def Monomial(degree: int) -> Layer:
    """`φ(x) = x^degree`, any non-negative integer `degree` (neural-tangents allows 0 to 5)."""
    degree = _check_degree("Monomial", degree)
    return _polynomial_layer([0.0] * degree + [1.0], f"Monomial({degree})")


def Hermite(degree: int) -> Layer:
    """`φ(x) = He_degree(x)/√(degree!)`, the normalised probabilists' Hermite polynomial.

    As in neural-tangents, the kernel assumes inputs of unit variance (e.g. after `LayerNorm`):
    `E[φ(u)φ(v)] = q12^degree`, `E[φ'(u)φ'(v)] = degree·q12^(degree−1)`, exact only when
    `q11 = q22 = 1`.
    """
    degree = _check_degree("Hermite", degree)
    he = np.polynomial.hermite_e.herme2poly([0] * degree + [1]) / math.sqrt(math.factorial(degree))

    def fn(x):
        return _polyval(he, x)

    def nngp_fn(q12, q11, q22):
        shape = jnp.broadcast_shapes(q12.shape, q11.shape, q22.shape)
        return jnp.broadcast_to(q12 ** degree, shape)

    def dot_fn(q12, q11, q22):
        shape = jnp.broadcast_shapes(q12.shape, q11.shape, q22.shape)
        if degree == 0:
            return jnp.zeros(shape, q12.dtype)
        return jnp.broadcast_to(degree * q12 ** (degree - 1), shape)

    return elementwise_layer(f"Hermite({degree})", fn, nngp_fn, dot_fn)


def _arc_cosine(n: int, q12: Array, q11: Array, q22: Array) -> Array:
    """`K_n = E[u^n v^n [u ≥ 0][v ≥ 0]]` by the recurrence (N = √(q11 q22))

        K_0 = (π − θ)/(2π),   K_1 = (√(N² − q12²) + (π − θ)·q12)/(2π),
        K_n = (2n − 1)·q12·K_{n−1} + (n − 1)²·(N² − q12²)·K_{n−2},

    i.e. Cho & Saul's `N^n·J_n(θ)/(2π)` without the n-fold derivative in θ.
    """
    _, _, theta = pair_angle(q12, q11, q22)
    n2 = q11 * q22
    resid = jnp.maximum(n2 - q12 ** 2, 0.0)
    k_prev = (math.pi - theta) / (2 * math.pi)
    if n == 0:
        return k_prev
    k = (safe_sqrt(resid) + (math.pi - theta) * q12) / (2 * math.pi)
    for m in range(2, n + 1):
        k, k_prev = (2 * m - 1) * q12 * k + (m - 1) ** 2 * resid * k_prev, k
    return k


def RectifiedMonomial(degree: int) -> Layer:
    """`φ(x) = x^degree·[x ≥ 0]` (degree 1 is `Relu`); arc-cosine kernels of order `degree`.

    E[φφ] = K_degree, E[φ'φ'] = degree²·K_{degree−1} (zero for degree 0, whose φ' vanishes almost
    everywhere); `K_n` in `_arc_cosine`.
    """
    degree = _check_degree("RectifiedMonomial", degree)

    def fn(x):
        return jnp.where(x >= 0, x ** degree, 0.0)

    def nngp_fn(q12, q11, q22):
        return jnp.broadcast_to(_arc_cosine(degree, q12, q11, q22),
                                jnp.broadcast_shapes(q12.shape, q11.shape, q22.shape))

    def dot_fn(q12, q11, q22):
        shape = jnp.broadcast_shapes(q12.shape, q11.shape, q22.shape)
        if degree == 0:
            return jnp.zeros(shape, q12.dtype)
        return jnp.broadcast_to(degree ** 2 * _arc_cosine(degree - 1, q12, q11, q22), shape)

    return elementwise_layer(f"RectifiedMonomial({degree})", fn, nngp_fn, dot_fn)
