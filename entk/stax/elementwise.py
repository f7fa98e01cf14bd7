"""Elementwise nonlinearities: closed-form Gaussian expectations, or Gauss–Hermite quadrature.

For pre-activations `(u, v) ~ N(0, [[q11, q12], [q12, q22]])` (entries of the incoming `cov1`, `nngp`,
`cov2`), a nonlinearity `φ` maps

    nngp ↦ E[φ(u) φ(v)],        ntk ↦ ntk · E[φ'(u) φ'(v)]

(the second by the chain rule; the next `Dense`/`Conv` adds the new NNGP to the NTK). Both need the
inputs to be Gaussian, i.e. a `Dense` or `Conv` layer right before the nonlinearity.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from entk.stax.kernel import (Kernel, Layer, expect_single, layer, pair_variances, require_gaussian,
                              safe_sqrt, self_variances, spatial_diagonal)

Array = jax.Array
# (q12, q11, q22) -> E[...]: all three broadcast against each other.
PairFn = Callable[[Array, Array, Array], Array]


def _shape_preserving_init(rng, input_shape):
    del rng
    return input_shape, ()


def _elementwise_layer(name: str, fn: Callable[[Array], Array], nngp_fn: PairFn,
                       dot_fn: PairFn | None) -> Layer:
    """A layer applying `fn` elementwise; `nngp_fn` / `dot_fn` give E[φφ] and E[φ'φ']."""

    def apply_fn(params, x, **kwargs):
        del params, kwargs
        return fn(x)

    def transform(k: Kernel, **kwargs) -> Kernel:
        k = expect_single(k, name)
        require_gaussian(k, name)
        var1 = spatial_diagonal(k.cov1)
        var2 = var1 if k.cov2 is None else spatial_diagonal(k.cov2)
        q11, q22 = pair_variances(var1, var2)
        ntk = None
        if k.ntk is not None:
            if dot_fn is None:
                raise ValueError(f"{name} has no derivative, so its NTK is unknown; ask for "
                                 f"get='nngp' only, or pass df=.")
            ntk = k.ntk * dot_fn(k.nngp, q11, q22)
        nngp = nngp_fn(k.nngp, q11, q22)
        cov1 = nngp_fn(k.cov1, *self_variances(var1))
        cov2 = None if k.cov2 is None else nngp_fn(k.cov2, *self_variances(var2))
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=False,
                         is_input=False)

    return layer(name, _shape_preserving_init, apply_fn, transform)


# ----------------------------------------------------------------------------------------------
# Piecewise linear: ABRelu and its special cases


def _angle(q12: Array, q11: Array, q22: Array) -> tuple[Array, Array, Array]:
    """`(sqrt(q11 q22), cos θ, θ)` with θ the angle between the two pre-activations."""
    norm = safe_sqrt(q11 * q22)
    cos = jnp.clip(jnp.where(norm > 0, q12 / jnp.where(norm > 0, norm, 1.0), 0.0), -1.0, 1.0)
    return norm, cos, jnp.arccos(cos)


def _abrelu(a: float, b: float, name: str) -> Layer:
    a, b = float(a), float(b)

    def fn(x):
        return a * jnp.minimum(x, 0) + b * jnp.maximum(x, 0)

    def nngp_fn(q12, q11, q22):
        norm, cos, theta = _angle(q12, q11, q22)
        sin = safe_sqrt(1.0 - cos ** 2)
        return (a - b) ** 2 / (2 * math.pi) * (norm * sin - theta * q12) + (a ** 2 + b ** 2) / 2 * q12

    def dot_fn(q12, q11, q22):
        _, _, theta = _angle(q12, q11, q22)
        return (a ** 2 + b ** 2) / 2 - (a - b) ** 2 * theta / (2 * math.pi)

    return _elementwise_layer(name, fn, nngp_fn, dot_fn)


def ABRelu(a: float, b: float, do_stabilize: bool = False) -> Layer:
    """`φ(x) = a·min(x, 0) + b·max(x, 0)`; arc-cosine kernels (Cho & Saul 2009).

    E[φφ] = (a−b)²/(2π)·(√(q11 q22)·sin θ − θ·q12) + (a²+b²)/2·q12,
    E[φ'φ'] = (a²+b²)/2 − (a−b)²·θ/(2π),   cos θ = q12/√(q11 q22).
    `do_stabilize` is accepted for neural-tangents compatibility; float64 needs no rescaling.
    """
    del do_stabilize
    return _abrelu(a, b, f"ABRelu(a={a}, b={b})")


def Relu(do_stabilize: bool = False) -> Layer:
    """`max(x, 0)`."""
    del do_stabilize
    return _abrelu(0.0, 1.0, "Relu")


def LeakyRelu(alpha: float, do_stabilize: bool = False) -> Layer:
    """`x` for `x ≥ 0`, `alpha·x` otherwise."""
    del do_stabilize
    return _abrelu(alpha, 1.0, f"LeakyRelu(alpha={alpha})")


def Abs(do_stabilize: bool = False) -> Layer:
    """`|x|`."""
    del do_stabilize
    return _abrelu(-1.0, 1.0, "Abs")


# ----------------------------------------------------------------------------------------------
# Smooth nonlinearities


def Erf(a: float = 1.0, b: float = 1.0, c: float = 0.0) -> Layer:
    """`φ(x) = a·erf(b·x) + c` (Williams 1997).

    E[φφ] = a²·(2/π)·arcsin(2b²q12 / √((1+2b²q11)(1+2b²q22))) + c²,
    E[φ'φ'] = (4a²b²/π) / √((1+2b²q11)(1+2b²q22) − 4b⁴q12²).
    """
    a, b, c = float(a), float(b), float(c)

    def fn(x):
        return a * jax.scipy.special.erf(b * x) + c

    def nngp_fn(q12, q11, q22):
        denom = jnp.sqrt((1 + 2 * b ** 2 * q11) * (1 + 2 * b ** 2 * q22))
        arg = jnp.clip(2 * b ** 2 * q12 / denom, -1.0, 1.0)
        return a ** 2 * (2 / math.pi) * jnp.arcsin(arg) + c ** 2

    def dot_fn(q12, q11, q22):
        det = (1 + 2 * b ** 2 * q11) * (1 + 2 * b ** 2 * q22) - 4 * b ** 4 * q12 ** 2
        return 4 * a ** 2 * b ** 2 / math.pi / jnp.sqrt(det)

    return _elementwise_layer(f"Erf(a={a}, b={b}, c={c})", fn, nngp_fn, dot_fn)


def Sin(a: float = 1.0, b: float = 1.0, c: float = 0.0) -> Layer:
    """`φ(x) = a·sin(b·x + c)`.

    E[φφ] = a²/2·(e^{−b²(q11+q22−2q12)/2} − e^{−b²(q11+q22+2q12)/2}·cos 2c),
    E[φ'φ'] = a²b²/2·(e^{−b²(q11+q22−2q12)/2} + e^{−b²(q11+q22+2q12)/2}·cos 2c).
    """
    a, b, c = float(a), float(b), float(c)

    def fn(x):
        return a * jnp.sin(b * x + c)

    def _terms(q12, q11, q22):
        minus = jnp.exp(-b ** 2 * (q11 + q22 - 2 * q12) / 2)
        plus = jnp.exp(-b ** 2 * (q11 + q22 + 2 * q12) / 2) * math.cos(2 * c)
        return minus, plus

    def nngp_fn(q12, q11, q22):
        minus, plus = _terms(q12, q11, q22)
        return a ** 2 / 2 * (minus - plus)

    def dot_fn(q12, q11, q22):
        minus, plus = _terms(q12, q11, q22)
        return a ** 2 * b ** 2 / 2 * (minus + plus)

    return _elementwise_layer(f"Sin(a={a}, b={b}, c={c})", fn, nngp_fn, dot_fn)


def _gelu_nngp(q12, q11, q22):
    """E[uΦ(u)·vΦ(v)], with P = (1+q11)(1+q22) and δ = √(P − q12²):

    q12/4 + (q12·arctan(q12/δ) + (q12² + q11 q22 δ²)/(P δ)) / (2π).
    """
    prod_plus_1 = (1 + q11) * (1 + q22)
    delta = jnp.sqrt(prod_plus_1 - q12 ** 2)
    out = q12 * jnp.arctan2(q12, delta) + (q12 ** 2 + q11 * q22 * delta ** 2) / (prod_plus_1 * delta)
    return q12 / 4 + out / (2 * math.pi)


def Gelu(approximate: bool = False) -> Layer:
    """`φ(x) = x·Φ(x)` (Φ the standard normal CDF).

    The kernel is the exact Gaussian expectation (see `_gelu_nngp`); E[φ'φ'] is its derivative in
    q12 (Price's theorem), taken by forward-mode autodiff. `approximate=True` only changes the
    finite network (`apply_fn` uses the tanh approximation), as in neural-tangents.
    """

    def fn(x):
        return jax.nn.gelu(x, approximate=approximate)

    def dot_fn(q12, q11, q22):
        q12, q11, q22 = jnp.broadcast_arrays(q12, q11, q22)
        return jax.jvp(lambda q: _gelu_nngp(q, q11, q22), (q12,), (jnp.ones_like(q12),))[1]

    return _elementwise_layer(f"Gelu(approximate={approximate})", fn, _gelu_nngp, dot_fn)


def Identity() -> Layer:
    """`φ(x) = x`: the kernel passes through unchanged (Gaussian inputs stay Gaussian)."""

    def apply_fn(params, x, **kwargs):
        del params, kwargs
        return x

    def transform(k, **kwargs):
        return k

    return layer("Identity", _shape_preserving_init, apply_fn, transform)


# ----------------------------------------------------------------------------------------------
# Any nonlinearity, numerically


def gauss_hermite_pair_expectation(f: Callable[[Array], Array], g: Callable[[Array], Array],
                                   deg: int) -> PairFn:
    """`(q12, q11, q22) ↦ E[f(u) g(v)]` by `deg × deg` Gauss–Hermite quadrature.

    Writes `u = √q11·z1`, `v = (q12/√q11)·z1 + √(q22 − q12²/q11)·z2` with independent standard
    normal `z1, z2`, and sums over the quadrature nodes (exact for polynomials of degree < 2·deg).
    """
    nodes, weights = np.polynomial.hermite.hermgauss(deg)
    z = np.sqrt(2.0) * nodes
    w = weights / np.sqrt(np.pi)

    def expectation(q12, q11, q22):
        q12, q11, q22 = jnp.broadcast_arrays(q12, q11, q22)
        zd = jnp.asarray(z, q12.dtype)
        wd = jnp.asarray(w, q12.dtype)
        s11 = safe_sqrt(q11)
        pos = s11 > 0
        s11_safe = jnp.where(pos, s11, 1.0)
        proj = jnp.where(pos, q12 / s11_safe, 0.0)
        resid = safe_sqrt(q22 - jnp.where(pos, q12 ** 2 / (s11_safe ** 2), 0.0))
        u = s11[..., None, None] * zd[:, None]
        v = proj[..., None, None] * zd[:, None] + resid[..., None, None] * zd[None, :]
        return jnp.einsum("...ij,i,j->...", f(u) * g(v), wd, wd)

    return expectation


def ElementwiseNumerical(fn: Callable[[Array], Array], deg: int,
                         df: Callable[[Array], Array] | None = None) -> Layer:
    """Any elementwise `fn`, its kernel by `deg`-point (per dimension) Gauss–Hermite quadrature.

    `df` is `fn`'s derivative for the NTK; when `None` it is taken by autodiff (`jax.jvp`), which
    needs `fn` to be differentiable almost everywhere in JAX. Accuracy grows with `deg` for smooth
    `fn`; kinks (e.g. ReLU) converge slowly — prefer the closed-form layers for those.
    """
    if deg < 1:
        raise ValueError(f"ElementwiseNumerical: deg={deg}; use a positive number of quadrature "
                         f"points, e.g. 25.")
    if df is None:
        def df(x):
            return jax.jvp(fn, (x,), (jnp.ones_like(x),))[1]

    nngp_fn = gauss_hermite_pair_expectation(fn, fn, deg)
    dot_fn = gauss_hermite_pair_expectation(df, df, deg)
    name = f"ElementwiseNumerical({getattr(fn, '__name__', 'fn')}, deg={deg})"
    return _elementwise_layer(name, fn, nngp_fn, dot_fn)
