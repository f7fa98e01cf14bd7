"""`RNN`: an Elman recurrent layer with weights shared across time, and its infinite-width kernels.

Finite network (NTK parameterization; `n = out_dim` hidden units, inputs `x` of shape `(N, T, D)`):

    g_t = (W_std/√n)·h_{t-1} W + (U_std/√D)·x_t U + b_std·b,    h_t = φ(g_t),    h_0 = 0,

with `W (n, n)`, `U (D, n)`, `b (n,)` i.i.d. N(0, 1) and the *same* `W, U, b` at every step.
The layer outputs `h_T` (`readout="last"`) or `(1/T)·Σ_t h_t` (`readout="average"`), shape
`(N, n)`; put a `Dense` after it for a readout. The standard parameterization draws
`W ~ N(0, W_std²/n)`, `U ~ N(0, U_std²/D)`, `b ~ N(0, b_std²)` and uses them unscaled.

Infinite-width limit (n → ∞), in the `Kernel` layout with one "spatial" axis, time: write
`Σ_{ts}` for the covariance of `g_t(x)` and `g_s(x')` (every pair of steps, since the weights are
shared), `X_{ts} = <x_t, x'_s>/D` for the input kernel (`Θˣ_{ts}` its NTK if earlier layers have
parameters), `E_{ts} = E[φ(u)φ(v)]` and `Ė_{ts} = E[φ'(u)φ'(v)]` for `(u, v)` centred Gaussian
with variances `Σ_{tt}(x, x)`, `Σ_{ss}(x', x')` and covariance `Σ_{ts}(x, x')`:

    Σ_{ts} = W_std²·E_{t-1,s-1} + U_std²·X_{ts} + b_std²                              (NNGP)
    Θ_{ts} = Σ_{ts} + U_std²·Θˣ_{ts} + W_std²·Ė_{t-1,s-1}·Θ_{t-1,s-1}                  (NTK)

with `E_{0,·} = Ė_{0,·} = 0` (h_0 = 0). This is the single-layer RNN recursion of Yang 2020
("Tensor Programs II", its simple-RNN example and NTK section) and of Alemohammad et al. 2021 ("The
Recurrent Neural Tangent Kernel", the NNGP/NTK recursions of its single-layer RNN, Sec. 3); the
equation numbers were not re-checked here, the derivation is:

- The direct derivatives of `g_t` by `W, U, b` at step `t` give `Σ_{ts}` (`W`'s part is
  `W_std²·<h_{t-1}, h'_{s-1}>/n = W_std²·E_{t-1,s-1}`). Because `W, U, b` are shared, the gradient
  by `W` is a sum over all steps, and the NTK a sum over all pairs `(t, s)` of steps; in the limit a
  pair contributes only if both paths go back through `W` the same number of times `k` from the
  two outputs (unequal numbers of passes through `W` give a bilinear form in a matrix independent
  of its arguments, which vanishes as n → ∞). The recursion sums exactly these equal-lag pairs:
  unrolled, `Θ_{TT} = Σ_k (Π_{j<k} W_std²·Ė_{T-j-1,T-j-1})·Σ_{T-k,T-k}`.
- Each pass back through `W` multiplies by `W_std²·Ė` (the chain rule through `φ`, with `Wᵀ`
  replaced by an independent copy — justified for a readout with independent zero-mean weights,
  the gradient-independence result of Tensor Programs II).
- Readout `"last"` keeps `(E_{TT}, Ė_{TT}·Θ_{TT})` as the output's (NNGP, NTK); `"average"` averages
  `E_{ts}` and `Ė_{ts}·Θ_{ts}` over all `T²` pairs.

Standard parameterization: the NNGP is unchanged and the NTK's direct terms lose their `std²`
factors and gain the fan-ins, `n·E_{t-1,s-1} + D·X_{ts} + [bias]` (as `Dense` does).

Computation: the whole `T × T` matrices are updated `T` times by the map above (entry `(t, s)` only
depends on `(t-1, s-1)`, so after `T` sweeps every entry is exact); each sweep applies the
nonlinearity's own kernel map (`entk.stax.elementwise`), so any elementwise stax layer works:
closed forms for `Relu` / `Erf` / ..., and `nonlinearity="tanh"` uses `ElementwiseNumerical`
(2-D Gauss–Hermite quadrature, tanh has no closed-form Gaussian expectation). Cost
`O(T · N1 N2 T²)`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax, random

from entk.stax import elementwise
from entk.stax.kernel import (Kernel, Layer, check_parameterization, expect_single, layer,
                              transform_of)

Array = jax.Array

_READOUTS = ("last", "average")


def _nonlinearity_layer(nonlinearity: Any) -> Layer:
    """An elementwise stax layer from a name (`"relu"`, `"erf"`, `"tanh"`) or a layer itself."""
    if isinstance(nonlinearity, str):
        name = nonlinearity.lower()
        if name == "relu":
            return elementwise.Relu()
        if name == "erf":
            return elementwise.Erf()
        if name == "tanh":
            return elementwise.ElementwiseNumerical(jnp.tanh, deg=32)
        if name in ("identity", "linear"):
            return elementwise.Identity()
        raise ValueError(f"RNN: nonlinearity={nonlinearity!r}; use 'relu', 'erf', 'tanh', "
                         f"'identity' or an elementwise entk.stax layer such as "
                         f"stax.Gelu().")
    transform_of(nonlinearity, "RNN: nonlinearity")
    return nonlinearity


def _shift_time(mat: Array, first_axis: int) -> Array:
    """Moves every `(t, s)` entry to `(t+1, s+1)` with zeros at `t = 0` or `s = 0` (h_0 = 0)."""
    config = [(0, 0, 0)] * mat.ndim
    config[first_axis] = config[first_axis + 1] = (1, -1, 0)
    return lax.pad(mat, jnp.zeros((), mat.dtype), config)


def _readout(mat: Array, first_axis: int, readout: str) -> Array:
    if readout == "last":
        return mat[(slice(None),) * first_axis + (-1, -1)]
    return jnp.mean(mat, axis=(first_axis, first_axis + 1))


def RNN(out_dim: int, nonlinearity: Any = "erf", readout: str = "last", W_std: float = 1.0,
        U_std: float = 1.0, b_std: float | None = 0.0, parameterization: str = "ntk") -> Layer:
    """Elman RNN over `(N, T, D)` inputs with `out_dim` hidden units; outputs `(N, out_dim)`.

    Args:
      out_dim: hidden width `n` (the width that goes to infinity).
      nonlinearity: `"erf"`, `"relu"`, `"tanh"` (kernel by Gauss–Hermite quadrature), `"identity"`,
        or any elementwise `entk.stax` layer (e.g. `stax.Erf(a, b, c)`, `stax.Gelu()`).
      readout: `"last"` (`h_T`) or `"average"` (mean of `h_1..h_T`).
      W_std, U_std, b_std: scales of the recurrent weights, input weights and bias (`None`: no
        bias).
      parameterization: `"ntk"` or `"standard"` (see the module docstring).

    Params: `(W (n, n), U (D, n), b (n,) or None)`.
    """
    name = f"RNN({out_dim}, readout={readout!r})"
    if readout not in _READOUTS:
        raise ValueError(f"{name}: readout={readout!r}; use 'last' or 'average'.")
    parameterization = check_parameterization(name, parameterization)
    phi = _nonlinearity_layer(nonlinearity)
    phi_apply, phi_transform = phi[1], transform_of(phi, name)
    W_std, U_std = float(W_std), float(U_std)
    b_std = None if b_std is None else float(b_std)
    ntk_param = parameterization == "ntk"

    def check_shape(shape):
        if len(shape) != 3:
            raise ValueError(f"{name} takes inputs of shape (N, T, D) (batch, time, features), got "
                             f"shape {tuple(shape)}.")

    def init_fn(rng, input_shape):
        check_shape(input_shape)
        d = input_shape[-1]
        k_w, k_u, k_b = random.split(rng, 3)
        W = random.normal(k_w, (out_dim, out_dim))
        U = random.normal(k_u, (d, out_dim))
        b = None if b_std is None else random.normal(k_b, (out_dim,))
        if not ntk_param:
            W, U = W * (W_std / math.sqrt(out_dim)), U * (U_std / math.sqrt(d))
            b = None if b is None else b * b_std
        return (input_shape[0], out_dim), (W, U, b)

    def apply_fn(params, x, **kwargs):
        del kwargs
        check_shape(x.shape)
        W, U, b = params
        w_scale = W_std / math.sqrt(out_dim) if ntk_param else 1.0
        u_scale = U_std / math.sqrt(x.shape[-1]) if ntk_param else 1.0
        inputs = u_scale * jnp.einsum("ntd,dk->tnk", x, U, precision=lax.Precision.HIGHEST)
        if b is not None:
            inputs = inputs + (b_std * b if ntk_param else b)

        def step(h, u_t):
            h = phi_apply((), w_scale * jnp.dot(h, W, precision=lax.Precision.HIGHEST) + u_t)
            return h, h

        h0 = jnp.zeros(inputs.shape[1:], inputs.dtype)
        h_last, hs = lax.scan(step, h0, inputs)
        return h_last if readout == "last" else jnp.mean(hs, axis=0)

    def transform(k: Kernel, **kwargs) -> Kernel:
        k = expect_single(k, name)
        check_shape(k.shape1)
        d = k.shape1[-1]
        bias_var = 0.0 if b_std is None else b_std ** 2
        # Input part of Σ and of the NTK's direct terms.
        x_nngp, x_c1, x_c2 = k.nngp, k.cov1, k.cov2

        def sigma(shifted_e, x_mat):
            return W_std ** 2 * shifted_e + U_std ** 2 * x_mat + bias_var

        def theta_direct(shifted_e, x_mat, x_ntk):
            if ntk_param:
                out = sigma(shifted_e, x_mat)
            else:
                out = out_dim * shifted_e + d * x_mat + (0.0 if b_std is None else 1.0)
            return out if x_ntk is None else out + U_std ** 2 * x_ntk

        zeros = jnp.zeros_like
        g = k.replace(nngp=sigma(zeros(x_nngp), x_nngp),
                      ntk=None if k.ntk is None else theta_direct(zeros(x_nngp), x_nngp, k.ntk),
                      cov1=sigma(zeros(x_c1), x_c1),
                      cov2=None if x_c2 is None else sigma(zeros(x_c2), x_c2),
                      is_gaussian=True, is_input=False)
        n_steps = k.shape1[1]

        def sweep(g, _):
            h = phi_transform(g)
            e = _shift_time(h.nngp, 2)
            new = g.replace(
                nngp=sigma(e, x_nngp),
                ntk=None if g.ntk is None else (theta_direct(e, x_nngp, k.ntk)
                                                + W_std ** 2 * _shift_time(h.ntk, 2)),
                cov1=sigma(_shift_time(h.cov1, 1), x_c1),
                cov2=None if x_c2 is None else sigma(_shift_time(h.cov2, 1), x_c2))
            return new, None

        if n_steps > 1:
            g = lax.scan(sweep, g, None, length=n_steps - 1)[0]
        h = phi_transform(g)
        return h.replace(
            nngp=_readout(h.nngp, 2, readout),
            ntk=None if h.ntk is None else _readout(h.ntk, 2, readout),
            cov1=_readout(h.cov1, 1, readout),
            cov2=None if h.cov2 is None else _readout(h.cov2, 1, readout),
            is_gaussian=False, is_input=False,
            shape1=(k.shape1[0], out_dim), shape2=(k.shape2[0], out_dim))

    return layer(name, init_fn, apply_fn, transform)
