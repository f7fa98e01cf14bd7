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

from entk.stax import masking
from entk.stax.kernel import (Kernel, Layer, expect_single, layer, require_gaussian, safe_sqrt,
                              spatial_diagonal)
from entk.stax.variances import pair_variances, self_variances

Array = jax.Array
# (q12, q11, q22) -> E[...]: all three broadcast against each other.
PairFn = Callable[[Array, Array, Array], Array]


def _shape_preserving_init(rng, input_shape):
    del rng
    return input_shape, ()


def elementwise_layer(name: str, fn: Callable[[Array], Array] | None, nngp_fn: PairFn | None,
                      dot_fn: PairFn | None) -> Layer:
    """A layer applying `fn` elementwise; `nngp_fn` / `dot_fn` give E[φφ] and E[φ'φ'].

    `fn=None` makes a kernel-only layer (its `apply_fn` raises), `nngp_fn=None` a finite-only one
    (its `kernel_fn` raises), as neural-tangents allows for `ExpNormalized` and `Elementwise`.
    """

    def apply_fn(params, x, **kwargs):
        del params, kwargs
        if fn is None:
            raise NotImplementedError(f"{name} has no finite-width function (fn=None): only its "
                                      f"kernel_fn is defined.")
        return fn(x)

    def transform(k: Kernel, **kwargs) -> Kernel:
        k = expect_single(k, name)
        if nngp_fn is None:
            raise NotImplementedError(
                f"{name} has no kernel: pass nngp_fn=(cov12, var1, var2) -> E[fn(u) fn(v)], or use "
                f"ElementwiseNumerical(fn, deg) for quadrature or entk.monte_carlo_kernel_fn.")
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

    # Remasked although φ(0) ≠ 0 for some φ: the finite network zeroes masked activations before
    # the next layer, and so does the kernel (neural-tangents skips this for a few φ).
    return layer(name, _shape_preserving_init, apply_fn, transform,
                 mask_fn=masking.identity_mask, remask=True)


# ----------------------------------------------------------------------------------------------
# Piecewise linear: ABRelu and its special cases


def pair_angle(q12: Array, q11: Array, q22: Array) -> tuple[Array, Array, Array]:
    """`(sqrt(q11 q22), cos θ, θ)` with θ the angle between the two pre-activations."""
    norm = safe_sqrt(q11 * q22)
    cos = jnp.clip(jnp.where(norm > 0, q12 / jnp.where(norm > 0, norm, 1.0), 0.0), -1.0, 1.0)
    return norm, cos, jnp.arccos(cos)


def _abrelu(a: float, b: float, name: str) -> Layer:
    a, b = float(a), float(b)

    def fn(x):
        return a * jnp.minimum(x, 0) + b * jnp.maximum(x, 0)

    def nngp_fn(q12, q11, q22):
        norm, cos, theta = pair_angle(q12, q11, q22)
        sin = safe_sqrt(1.0 - cos ** 2)
        return (a - b) ** 2 / (2 * math.pi) * (norm * sin - theta * q12) + (a ** 2 + b ** 2) / 2 * q12

    def dot_fn(q12, q11, q22):
        _, _, theta = pair_angle(q12, q11, q22)
        return (a ** 2 + b ** 2) / 2 - (a - b) ** 2 * theta / (2 * math.pi)

    return elementwise_layer(name, fn, nngp_fn, dot_fn)


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

    return elementwise_layer(f"Erf(a={a}, b={b}, c={c})", fn, nngp_fn, dot_fn)


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

    return elementwise_layer(f"Sin(a={a}, b={b}, c={c})", fn, nngp_fn, dot_fn)


def Sigmoid_like() -> Layer:
    """`φ(x) = ½·erf(x / 2.4020563531719796) + ½`, an `Erf` close to the logistic sigmoid (the
    constant minimises the squared difference on [−5, 5], as in neural-tangents)."""
    return Erf(a=0.5, b=1 / 2.4020563531719796, c=0.5)


def Cos(a: float = 1.0, b: float = 1.0, c: float = 0.0) -> Layer:
    """`φ(x) = a·cos(b·x + c)`, i.e. `Sin` with phase `c + π/2`."""
    return Sin(a=a, b=b, c=c + math.pi / 2)


def Rbf(gamma: float = 1.0) -> Layer:
    """`φ(x) = √2·sin(√(2γ)·x + π/4)`, whose NNGP is the RBF kernel of the pre-activations:

    E[φφ] = exp(−γ·(q11 + q22 − 2·q12)),   E[φ'φ'] = 2γ·E[φφ].
    """
    gamma = float(gamma)

    def fn(x):
        return math.sqrt(2) * jnp.sin(math.sqrt(2 * gamma) * x + math.pi / 4)

    def nngp_fn(q12, q11, q22):
        return jnp.exp(-gamma * (q11 + q22 - 2 * q12))

    def dot_fn(q12, q11, q22):
        return 2 * gamma * nngp_fn(q12, q11, q22)

    return elementwise_layer(f"Rbf(gamma={gamma})", fn, nngp_fn, dot_fn)


def Sign() -> Layer:
    """`φ(x) = sign(x)`: E[φφ] = 1 − 2θ/π (θ the angle, see `ABRelu`); φ' = 0 almost everywhere,
    so the NTK is zero (neural-tangents' convention)."""

    def nngp_fn(q12, q11, q22):
        _, _, theta = pair_angle(q12, q11, q22)
        return 1 - 2 * theta / math.pi

    def dot_fn(q12, q11, q22):
        return jnp.zeros(jnp.broadcast_shapes(q12.shape, q11.shape, q22.shape), q12.dtype)

    return elementwise_layer("Sign", jnp.sign, nngp_fn, dot_fn)


def Exp(a: float = 1.0, b: float = 1.0) -> Layer:
    """`φ(x) = a·exp(b·x)`: E[φφ] = a²·exp(b²·(q11 + q22 + 2·q12)/2), E[φ'φ'] = b²·E[φφ]."""
    a, b = float(a), float(b)

    def fn(x):
        return a * jnp.exp(b * x)

    def nngp_fn(q12, q11, q22):
        return a ** 2 * jnp.exp(b ** 2 * ((q11 + q22) / 2 + q12))

    def dot_fn(q12, q11, q22):
        return b ** 2 * nngp_fn(q12, q11, q22)

    return elementwise_layer(f"Exp(a={a}, b={b})", fn, nngp_fn, dot_fn)


def Gaussian(a: float = 1.0, b: float = -1.0) -> Layer:
    """`φ(x) = a·exp(b·x²)`. With D = (1 − 2b·q11)(1 − 2b·q22) − 4b²·q12²:

    E[φφ] = a²/√D,   E[φ'φ'] = 4a²b²·q12 / D^{3/2}.
    """
    a, b = float(a), float(b)

    def fn(x):
        return a * jnp.exp(b * x ** 2)

    def det(q12, q11, q22):
        return safe_sqrt((1 - 2 * b * q11) * (1 - 2 * b * q22) - 4 * b ** 2 * q12 ** 2)

    def nngp_fn(q12, q11, q22):
        return a ** 2 / det(q12, q11, q22)

    def dot_fn(q12, q11, q22):
        return 4 * a ** 2 * b ** 2 * q12 / det(q12, q11, q22) ** 3

    return elementwise_layer(f"Gaussian(a={a}, b={b})", fn, nngp_fn, dot_fn)


def ExpNormalized(gamma: float = 1.0, shift: float = -1.0, do_clip: bool = False) -> Layer:
    """Kernel-only layer: the "Gaussian normalized kernel" (Shankar et al. 2020, p. 6).

    With n = √(q11 q22) and ρ = q12/n (clipped to [−1, 1] if `do_clip`):
    nngp ↦ n·exp(γ·(ρ + shift)), ntk ↦ γ·ntk·exp(γ·(ρ + shift)). There is no finite-width
    network, so `apply_fn` raises (as in neural-tangents).
    """
    gamma, shift = float(gamma), float(shift)

    def exponent(q12, q11, q22):
        norm = jnp.sqrt(jnp.maximum(q11 * q22, 1e-30))
        rho = q12 / norm
        if do_clip:
            rho = jnp.clip(rho, -1.0, 1.0)
        return norm, jnp.exp(gamma * (rho + shift))

    def nngp_fn(q12, q11, q22):
        norm, e = exponent(q12, q11, q22)
        return norm * e

    def dot_fn(q12, q11, q22):
        return gamma * exponent(q12, q11, q22)[1]

    return elementwise_layer(f"ExpNormalized(gamma={gamma}, shift={shift})", None, nngp_fn, dot_fn)


def _gabor_nngp(q12, q11, q22):
    """E[φ(u)φ(v)] for φ(x) = exp(−x²)·sin(x). With D = det(I + 2Σ) = 1 + 2S + 4Δ (S = q11 + q22,
    Δ = q11 q22 − q12²), writing sin·sin = (cos(u−v) − cos(u+v))/2 and using the Gaussian
    characteristic function under the weight exp(−u² − v²):

    E = (exp(−(S + 4Δ − 2q12)/(2D)) − exp(−(S + 4Δ + 2q12)/(2D))) / (2√D).
    """
    s = q11 + q22
    delta4 = 4 * (q11 * q22 - q12 ** 2)
    d = 1 + 2 * s + delta4
    minus = jnp.exp(-(s + delta4 - 2 * q12) / (2 * d))
    plus = jnp.exp(-(s + delta4 + 2 * q12) / (2 * d))
    return (minus - plus) / (2 * safe_sqrt(d))


def Gabor() -> Layer:
    """`φ(x) = exp(−x²)·sin(x)`; E[φφ] in `_gabor_nngp`, E[φ'φ'] its derivative in q12."""

    def fn(x):
        return jnp.exp(-x ** 2) * jnp.sin(x)

    return elementwise_layer("Gabor", fn, _gabor_nngp, price_derivative(_gabor_nngp))


def price_derivative(nngp_fn: PairFn) -> PairFn:
    """`(q12, q11, q22) ↦ ∂nngp_fn/∂q12`, which is E[φ'(u) φ'(v)] by Price's theorem, taken
    exactly by forward-mode autodiff (elementwise, so one `jvp` gives every entry)."""

    def dot_fn(q12, q11, q22):
        q12, q11, q22 = jnp.broadcast_arrays(q12, q11, q22)
        return jax.jvp(lambda q: nngp_fn(q, q11, q22), (q12,), (jnp.ones_like(q12),))[1]

    return dot_fn


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

    return elementwise_layer(f"Gelu(approximate={approximate})", fn, _gelu_nngp,
                             price_derivative(_gelu_nngp))


def Identity() -> Layer:
    """`φ(x) = x`: the kernel passes through unchanged (Gaussian inputs stay Gaussian)."""

    def apply_fn(params, x, **kwargs):
        del params, kwargs
        return x

    def transform(k, **kwargs):
        return k

    return layer("Identity", _shape_preserving_init, apply_fn, transform,
                 mask_fn=masking.identity_mask)


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
    return elementwise_layer(name, fn, nngp_fn, dot_fn)


def Elementwise(fn: Callable[[Array], Array] | None = None,
                nngp_fn: Callable[[Array, Array, Array], Array] | None = None,
                d_nngp_fn: Callable[[Array, Array, Array], Array] | None = None) -> Layer:
    """Any elementwise `fn` with a user-given Gaussian expectation (neural-tangents' semantics).

    Args:
      fn: the scalar nonlinearity `R → R` of the finite network; `None` makes `apply_fn` raise.
      nngp_fn: `(cov12, var1, var2) ↦ E[fn(u) fn(v)]` for `(u, v)` centred Gaussian with those
        (co)variances, written for scalars; `None` makes `kernel_fn` raise (use
        `ElementwiseNumerical` to integrate `fn` numerically instead).
      d_nngp_fn: `(cov12, var1, var2) ↦ E[fn'(u) fn'(v)]` for the NTK; `None` takes it as
        `∂nngp_fn/∂cov12` by autodiff (Price's theorem), as neural-tangents does.
    """
    if fn is None and nngp_fn is None:
        raise ValueError("Elementwise: neither fn nor nngp_fn was given, so the layer would do "
                         "nothing; pass fn (finite network) and/or nngp_fn (kernel).")
    name = f"Elementwise({getattr(fn if fn is not None else nngp_fn, '__name__', 'fn')})"
    pair_nngp = pair_dot = None
    if nngp_fn is not None:
        pair_nngp = jnp.vectorize(nngp_fn)
        pair_dot = jnp.vectorize(jax.grad(nngp_fn) if d_nngp_fn is None else d_nngp_fn)
    return elementwise_layer(name, fn, pair_nngp, pair_dot)
