"""Parameter-free spatial reductions: `AvgPool`, `SumPool`, `GlobalAvgPool`, `GlobalSumPool`, `Flatten`.

All are linear maps of the activations, so they act on the kernel's spatial pairs directly (see
`entk.stax.spatial`) and keep Gaussian inputs Gaussian. `Flatten` then a `Dense` layer averages over
features, i.e. over positions *at the same position in x1 and x2*: its kernel is the mean of the
spatial diagonal; global pooling averages over *all* pairs of positions.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from entk.stax import masking, spatial
from entk.stax.kernel import Kernel, Layer, check_default_axes, expect_single, layer, spatial_diagonal

Array = jax.Array


def _pool(name: str, window_shape: Sequence[int], strides: Sequence[int] | None,
          padding: str, normalize: bool, normalize_edges: bool) -> Layer:
    window = tuple(int(w) for w in window_shape)
    d = len(window)
    strides = spatial.parse_window(strides, d, 1, "strides", name)
    pad_mode = spatial.parse_padding(padding, name)
    circular = pad_mode is spatial.Padding.CIRCULAR
    window_size = math.prod(window)

    def geometry(shape):
        if len(shape) != d + 2:
            raise ValueError(f"{name} with window {window} expects inputs with {d} spatial "
                             f"dimension(s), got shape {tuple(shape)}.")
        in_sizes = tuple(shape[1:-1])
        pads = spatial.pads_for(pad_mode, in_sizes, window, strides)
        return in_sizes, pads, spatial.output_sizes(in_sizes, window, strides, pads, name)

    def edge_counts(in_sizes, pads) -> list[np.ndarray] | None:
        """Per dimension, how many real (non-padding) inputs each output position averages."""
        if not (normalize and normalize_edges and pad_mode is spatial.Padding.SAME):
            return None
        counts = []
        for n, w, s, (lo, hi) in zip(in_sizes, window, strides, pads):
            ones = np.pad(np.ones(n), (lo, hi))
            counts.append(np.array([ones[o * s:o * s + w].sum()
                                    for o in range((n + lo + hi - w) // s + 1)]))
        return counts

    def init_fn(rng, input_shape):
        del rng
        _, _, out = geometry(input_shape)
        return (input_shape[0],) + out + (input_shape[-1],), ()

    def apply_fn(params, x, **kwargs):
        del params, kwargs
        in_sizes, pads, _ = geometry(x.shape)
        y = spatial.window_sum(spatial.pad_array(x, 1, pads, circular), range(1, d + 1), window,
                               strides)
        if not normalize:
            return y
        counts = edge_counts(in_sizes, pads)
        if counts is None:
            return y / window_size
        divisor = np.ones(y.shape[1:-1])
        for i, c in enumerate(counts):
            divisor = divisor * c.reshape([-1 if j == i else 1 for j in range(d)])
        return y / jnp.asarray(divisor, y.dtype)[..., None]

    def transform(k: Kernel, **kwargs) -> Kernel:
        k = expect_single(k, name)
        in_sizes, pads, out = geometry(k.shape1)
        counts = edge_counts(in_sizes, pads)

        def window_op(mat, first_axis):
            mat = spatial.pad_pairs(mat, first_axis, pads, circular)
            mat = spatial.product_window_sum(mat, first_axis, window, strides)
            if not normalize:
                return mat
            if counts is None:
                return mat / window_size ** 2
            divisor = np.ones(mat.shape[first_axis:])
            for i, c in enumerate(counts):
                for side in (0, 1):
                    divisor = divisor * c.reshape(
                        [-1 if j == 2 * i + side else 1 for j in range(2 * d)])
            return mat / jnp.asarray(divisor, mat.dtype)

        return k.map_matrices(window_op).replace(
            shape1=(k.shape1[0],) + out + (k.shape1[-1],),
            shape2=(k.shape2[0],) + out + (k.shape2[-1],))

    def mask_fn(mask, input_shape):
        # Masked positions are zero, so windows simply sum fewer values; an output is masked
        # when its window's centre is.
        _, pads, out = geometry(input_shape)
        return masking.window_centres(mask, window, strides, pads, out)

    return layer(name, init_fn, apply_fn, transform, mask_fn=mask_fn, remask=True)


def AvgPool(window_shape: Sequence[int], strides: Sequence[int] | None = None,
            padding: str = "VALID", normalize_edges: bool = False, batch_axis: int = 0,
            channel_axis: int = -1) -> Layer:
    """Average over windows of `window_shape` positions (strides default to 1).

    With `SAME` padding, `normalize_edges=True` divides by the number of real (non-padding) inputs
    in each window; `False` counts the zero padding too.
    """
    name = f"AvgPool({tuple(window_shape)})"
    check_default_axes(name, batch_axis, channel_axis)
    return _pool(name, window_shape, strides, padding, True, normalize_edges)


def SumPool(window_shape: Sequence[int], strides: Sequence[int] | None = None,
            padding: str = "VALID", batch_axis: int = 0, channel_axis: int = -1) -> Layer:
    """Sum over windows of `window_shape` positions (strides default to 1)."""
    name = f"SumPool({tuple(window_shape)})"
    check_default_axes(name, batch_axis, channel_axis)
    return _pool(name, window_shape, strides, padding, False, False)


def _global_pool(name: str, average: bool) -> Layer:
    def init_fn(rng, input_shape):
        del rng
        return (input_shape[0], input_shape[-1]), ()

    def apply_fn(params, x, mask=None, **kwargs):
        del params, kwargs
        axes = tuple(range(1, x.ndim - 1))
        # With a mask, the average runs over the unmasked positions only.
        return masking.masked_mean(x, axes, mask) if average else jnp.sum(x, axes)

    def transform(k: Kernel, **kwargs) -> Kernel:
        k = expect_single(k, name)
        mask11, mask12, mask22 = masking.pair_masks(k.mask1, k.mask2, k.x1_is_x2, name)

        def reduce(mat, first_axis):
            axes = tuple(range(first_axis, mat.ndim))
            if not average:
                return jnp.sum(mat, axes)
            mask = {2: mask12, 1: mask11 if mat is k.cov1 else mask22}[first_axis]
            return masking.masked_mean(mat, axes, mask)

        return k.map_matrices(reduce).replace(shape1=(k.shape1[0], k.shape1[-1]),
                                              shape2=(k.shape2[0], k.shape2[-1]))

    def mask_fn(mask, input_shape):
        """An example is masked when every position is."""
        del input_shape
        return jnp.all(mask, axis=tuple(range(1, mask.ndim - 1)))

    return layer(name, init_fn, apply_fn, transform, mask_fn=mask_fn, apply_uses_mask=True)


def GlobalAvgPool(batch_axis: int = 0, channel_axis: int = -1) -> Layer:
    """Mean over all spatial positions: `(N, S..., C)` → `(N, C)`."""
    check_default_axes("GlobalAvgPool", batch_axis, channel_axis)
    return _global_pool("GlobalAvgPool", average=True)


def GlobalSumPool(batch_axis: int = 0, channel_axis: int = -1) -> Layer:
    """Sum over all spatial positions: `(N, S..., C)` → `(N, C)`."""
    check_default_axes("GlobalSumPool", batch_axis, channel_axis)
    return _global_pool("GlobalSumPool", average=False)


def Flatten(batch_axis: int = 0, batch_axis_out: int = 0) -> Layer:
    """`(N, S..., C)` → `(N, Π S · C)`, positions-major (row-major reshape)."""
    if batch_axis != 0 or batch_axis_out != 0:
        raise NotImplementedError(f"Flatten: only batch_axis=0 and batch_axis_out=0 are supported, "
                                  f"got {batch_axis}, {batch_axis_out}.")

    def init_fn(rng, input_shape):
        del rng
        return (input_shape[0], math.prod(input_shape[1:])), ()

    def apply_fn(params, x, **kwargs):
        del params, kwargs
        return x.reshape(x.shape[0], -1)

    def transform(k: Kernel, **kwargs) -> Kernel:
        k = expect_single(k, "Flatten")

        def reduce(mat, first_axis):
            diag = spatial_diagonal(mat, first_axis)
            return jnp.mean(diag, tuple(range(first_axis, diag.ndim)))

        return k.map_matrices(reduce).replace(
            shape1=(k.shape1[0], math.prod(k.shape1[1:])),
            shape2=(k.shape2[0], math.prod(k.shape2[1:])))

    def mask_fn(mask, input_shape):
        """Each flattened feature keeps the mask of its position and channel."""
        return jnp.broadcast_to(mask, tuple(input_shape)).reshape(input_shape[0], -1)

    return layer("Flatten", init_fn, apply_fn, transform, mask_fn=mask_fn)
