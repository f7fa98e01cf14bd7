"""`LayerNorm` and `Dropout`.

`LayerNorm` over the channel axis (and optionally spatial axes) divides each example's activations by
their root-mean-square over those axes. In the infinite-width limit the mean over channels vanishes
and the mean square is the (deterministic) kernel diagonal, so the kernel is rescaled:
`K'[a, b] = K[a, b] / √((v_a + eps)(v_b + eps))` with `v` the variance averaged over the normalised
spatial axes.

`Dropout(rate)` follows neural-tangents: `rate` is the probability of *keeping* a unit, kept units are
scaled by `1/rate`. Only the variance of a unit with itself grows (by `1/rate`); covariances between
different examples or positions are unchanged, since masks are independent.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import random

from entk.stax.kernel import (Kernel, Layer, check_default_axes, diagonal_mask, expect_single,
                              layer, require_gaussian, spatial_diagonal)
from entk.stax.variances import pair_variances, self_variances

Array = jax.Array


def _identity_init(rng, input_shape):
    del rng
    return input_shape, ()


def LayerNorm(axis: int | Sequence[int] = -1, eps: float = 1e-12, batch_axis: int = 0,
              channel_axis: int = -1) -> Layer:
    """`(x − mean) / √(var + eps)` over `axis` (must include the channel axis, not the batch axis)."""
    name = f"LayerNorm(axis={axis})"
    check_default_axes(name, batch_axis, channel_axis)
    axes_in = (axis,) if isinstance(axis, int) else tuple(axis)

    def canonical(ndim: int) -> tuple[int, ...]:
        axes = sorted({a % ndim for a in axes_in})
        if ndim - 1 not in axes:
            raise ValueError(f"{name}: the channel axis ({ndim - 1}, i.e. -1) must be normalised for "
                             f"the kernel to converge; add it to axis.")
        if 0 in axes:
            raise NotImplementedError(f"{name}: normalising over the batch axis couples examples "
                                      f"and is not supported.")
        return tuple(axes)

    def apply_fn(params, x, **kwargs):
        del params, kwargs
        axes = canonical(x.ndim)
        mean = jnp.mean(x, axes, keepdims=True)
        var = jnp.var(x, axes, keepdims=True)
        return (x - mean) / jnp.sqrt(var + eps)

    def transform(k: Kernel, **kwargs) -> Kernel:
        k = expect_single(k, name)
        require_gaussian(k, name)
        spatial_axes = tuple(a for a in canonical(len(k.shape1)) if a != len(k.shape1) - 1)

        def norm(cov):
            return jnp.mean(spatial_diagonal(cov), spatial_axes, keepdims=True) + eps

        v1 = norm(k.cov1)
        v2 = v1 if k.cov2 is None else norm(k.cov2)
        a, b = pair_variances(v1, v2)
        scale = jnp.sqrt(a * b)
        return k.replace(
            nngp=k.nngp / scale,
            ntk=None if k.ntk is None else k.ntk / scale,
            cov1=k.cov1 / jnp.sqrt(jnp.multiply(*self_variances(v1))),
            cov2=None if k.cov2 is None else k.cov2 / jnp.sqrt(jnp.multiply(*self_variances(v2))))

    return layer(name, _identity_init, apply_fn, transform)


def Dropout(rate: float, mode: str = "train") -> Layer:
    """Keeps each unit with probability `rate` (scaled by `1/rate`) in `mode="train"`; identity in
    `mode="test"`. `apply_fn` then needs `rng=` (a `jax.random` key)."""
    name = f"Dropout({rate})"
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"{name}: rate is the probability of keeping a unit and must be in (0, 1].")
    if mode not in ("train", "test"):
        raise ValueError(f"{name}: mode={mode!r}; use 'train' or 'test'.")

    def apply_fn(params, x, rng=None, **kwargs):
        del params, kwargs
        if mode == "test" or rate == 1.0:
            return x
        if rng is None:
            raise ValueError(f"{name} in train mode needs a random key: apply_fn(params, x, "
                             f"rng=jax.random.PRNGKey(0)).")
        keep = random.bernoulli(rng, rate, x.shape)
        return jnp.where(keep, x / rate, 0)

    def transform(k: Kernel, **kwargs) -> Kernel:
        k = expect_single(k, name)
        if mode == "test" or rate == 1.0:
            return k
        if k.is_input:
            raise ValueError(f"{name} cannot act on the raw inputs in the kernel; put a Dense or "
                             f"Conv layer before it.")
        factor = 1.0 / rate

        def boost(mat, n_batch_axes, batch_diagonal):
            mask = diagonal_mask(mat.shape, n_batch_axes, batch_diagonal)
            return jnp.where(mask, mat * factor, mat)

        cross = k.x1_is_x2  # the nngp's batch diagonal pairs an example with itself only then
        return k.replace(
            nngp=boost(k.nngp, 2, True) if cross else k.nngp,
            ntk=None if k.ntk is None else (boost(k.ntk, 2, True) if cross else k.ntk),
            cov1=boost(k.cov1, 1, False),
            cov2=None if k.cov2 is None else boost(k.cov2, 1, False),
            is_gaussian=False)

    return layer(name, _identity_init, apply_fn, transform)
