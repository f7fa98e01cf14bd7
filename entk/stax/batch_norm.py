"""`BatchNorm`: normalisation of every feature over the batch, and its infinite-width kernels.

Finite layer (training-mode batch statistics, no learned scale/shift): for inputs `h` of shape
`(B, n)` (batch, features), each feature `i` is centred and scaled over the batch,

    z_i = G h_i / √(|G h_i|²/B + eps),      G = I − 11ᵀ/B   (centring, `h_i ∈ R^B` the column),

optionally followed by an elementwise nonlinearity `φ` (`y_i = φ(z_i)`, see below).

Infinite width (n → ∞, batch size `B` fixed), after a `Dense` layer (Yang et al. 2019, "A Mean Field
Theory of Batch Normalization", Sec. 3, and Tensor Programs II's batchnorm example): the columns
`h_i` are i.i.d. `N(0, K)` with `K` the incoming `B × B` NNGP, so writing `ψ(h) = φ(G h / √(|Gh|²/B
+ eps))` for the map of one feature, `R^B → R^B`,

    NNGP:  K' = E_{h ~ N(0, K)}[ψ(h) ψ(h)ᵀ]                     (B × B)
    NTK:   Θ' = E_{h ~ N(0, K)}[J(h) Θ J(h)ᵀ],   J = ∂ψ/∂h       (B × B)

the NTK by the chain rule per feature (`Θ`, the incoming NTK, concentrates and is independent of
`h_i`; cross-feature terms vanish after the next `Dense`). For `B ≥ 2` the map `ψ` is not
elementwise and the expectation is `B`-dimensional with no closed form in general (Yang et al. 2019
reduce it to a one-dimensional integral for the NNGP only, Thm. 3.10), so it is computed here by
Monte Carlo over the Gaussian — not over networks — with `n_samples` draws from a fixed
`jax.random.PRNGKey(seed)`; antithetic pairs (`h`, `−h`) keep odd moments exactly zero. Its
statistical error is about `1/√n_samples` relative (≈ 0.3 % at the default 2¹⁷).

Conditioning: `J` grows like `1/|G h|`, so the NTK needs `E[1/|Gh|²]`, finite only when the
centred covariance `G K G` has rank ≥ 3, and the finite-width fluctuations around it have finite
variance only for rank ≥ 5. With raw inputs of dimension `D` the rank is at most `D` (a bias is
removed by `G`); measured: for `B = 6, D = 12` the empirical NTK converges (error 0.20 / 0.06 /
0.05 at widths 64 / 256 / 1024), for `B = 8, D = 3` it does not (≈ 0.2–0.6, not decreasing with
width), so keep `D ≥ B` (or a wide enough layer before) when using this kernel.

Because the layer couples the examples of one batch, the kernel exists only between a batch and
itself: `kernel_fn(x)` (or `x2` equal to `x1`); a different `x2` is refused. `φ` must be applied
inside this layer (its output is not Gaussian, so a separate `Relu` after it has no closed form).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import random

from entk.stax.kernel import Kernel, Layer, expect_single, layer, require_gaussian, transform_of

Array = jax.Array


def _normalise(h: Array, eps: float) -> Array:
    """Centres and scales `h` over axis 0 (the batch), per feature."""
    centred = h - jnp.mean(h, axis=0, keepdims=True)
    return centred / jnp.sqrt(jnp.mean(centred ** 2, axis=0, keepdims=True) + eps)


def _gaussian_samples(cov: Array, n_samples: int, seed: int) -> Array:
    """`(n_samples, B)` draws from `N(0, cov)`, half of them the negatives of the other half."""
    vals, vecs = jnp.linalg.eigh(cov)
    root = vecs * jnp.sqrt(jnp.maximum(vals, 0.0))
    z = random.normal(random.PRNGKey(seed), (n_samples // 2, cov.shape[0]), cov.dtype)
    half = z @ root.T
    return jnp.concatenate([half, -half], axis=0)


def BatchNorm(eps: float = 1e-5, nonlinearity: Any = None, n_samples: int = 2 ** 17,
              seed: int = 0) -> Layer:
    """Normalises each feature over the batch; vectors `(B, n)` only, no parameters.

    Args:
      eps: added to the batch variance.
      nonlinearity: `None` or an elementwise `entk.stax` layer (e.g. `stax.Relu()`) applied after
        the normalisation, inside the layer (see the module docstring).
      n_samples: Gaussian draws for the kernel's `B`-dimensional expectations (even, ≥ 2).
      seed: their fixed `jax.random.PRNGKey` seed, so the kernel is deterministic.
    """
    name = f"BatchNorm(eps={eps})"
    eps = float(eps)
    if n_samples < 2 or n_samples % 2:
        raise ValueError(f"{name}: n_samples={n_samples}; use an even number ≥ 2, e.g. 2**17.")
    if nonlinearity is None:
        def phi(z):
            return z
    else:
        transform_of(nonlinearity, f"{name}: nonlinearity")

        def phi(z):
            return nonlinearity[1]((), z)

    def check_shape(shape):
        if len(shape) != 2:
            raise ValueError(f"{name} takes (batch, features) inputs, got shape {tuple(shape)}; "
                             f"flatten spatial axes first.")
        if shape[0] < 2:
            raise ValueError(f"{name}: batch size {shape[0]}; normalising over the batch needs at "
                             f"least 2 examples.")

    def init_fn(rng, input_shape):
        del rng
        check_shape(input_shape)
        return tuple(input_shape), ()

    def apply_fn(params, x, **kwargs):
        del params, kwargs
        check_shape(x.shape)
        return phi(_normalise(x, eps))

    def psi(h: Array) -> Array:
        """One feature's map `R^B → R^B`."""
        return phi(_normalise(h[:, None], eps)[:, 0])

    def transform(k: Kernel, **kwargs) -> Kernel:
        k = expect_single(k, name)
        if not k.x1_is_x2:
            raise ValueError(
                f"{name} couples the examples of one batch, so its kernel exists only between a "
                f"batch and itself: call kernel_fn(x1) (x2=None or x2 equal to x1), got x2 with "
                f"shape {k.shape2} different from x1 {k.shape1}.")
        check_shape(k.shape1)
        require_gaussian(k, name)
        h = _gaussian_samples(k.nngp, n_samples, seed)
        out = jax.vmap(psi)(h)
        nngp = jnp.einsum("sa,sb->ab", out, out) / n_samples
        ntk = None
        if k.ntk is not None:
            jac = jax.vmap(jax.jacfwd(psi))(h)
            ntk = jnp.einsum("sac,cd,sbd->ab", jac, k.ntk, jac) / n_samples
        return k.replace(nngp=nngp, ntk=ntk, cov1=jnp.diagonal(nngp), cov2=None,
                         is_gaussian=False, is_input=False)

    return layer(name, init_fn, apply_fn, transform)
