"""`ImageResize`: `jax.image.resize` of the spatial axes, and its exact kernel map.

Every `jax.image.resize` method is a separable linear map: along each resized spatial axis,
`y[o] = Σ_i w[o, i]·x[i]` with weights `w` that depend only on the sizes (and the method). The
kernel of `y` therefore takes that map on both axes of each spatial pair,

    K'[o, o'] = Σ_{i, i'} w[o, i]·w[o', i']·K[i, i'],

which is `jax.image.resize` of the kernel array itself, the pair's two axes resized to the same
new size. The batch and channel axes are not resized (`-1` in `shape`, or their current size).
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax import lax

from entk.stax.kernel import Kernel, Layer, check_default_axes, expect_single, layer

Array = jax.Array


def ImageResize(shape: Sequence[int], method: str | jax.image.ResizeMethod,
                antialias: bool = True, precision: lax.Precision = lax.Precision.HIGHEST,
                batch_axis: int = 0, channel_axis: int = -1) -> Layer:
    """`jax.image.resize(x, shape, method, antialias, precision)`; `-1` in `shape` keeps an axis.

    The kernel is exact for every method (module docstring); neural-tangents 0.6.5 allows only
    `"linear"` and `"nearest"` there.
    """
    shape = tuple(int(s) for s in shape)
    name = f"ImageResize(shape={shape}, method={method!r})"
    check_default_axes(name, batch_axis, channel_axis)
    resize_method = (method if isinstance(method, jax.image.ResizeMethod)
                     else jax.image.ResizeMethod.from_string(method))

    def target(input_shape: Sequence[int]) -> tuple[int, ...]:
        if len(shape) != len(input_shape):
            raise ValueError(f"{name}: shape has {len(shape)} entries for inputs of shape "
                             f"{tuple(input_shape)}; give one per axis (-1 keeps an axis).")
        return tuple(n if s == -1 else s for s, n in zip(shape, input_shape))

    def resize(x: Array, new_shape: Sequence[int]) -> Array:
        return jax.image.resize(x, tuple(new_shape), method=resize_method, antialias=antialias,
                                precision=precision)

    def init_fn(rng, input_shape):
        del rng
        return target(input_shape), ()

    def apply_fn(params, x, **kwargs):
        del params, kwargs
        return resize(x, target(x.shape))

    def transform(k: Kernel, **kwargs) -> Kernel:
        k = expect_single(k, name)
        new1, new2 = target(k.shape1), target(k.shape2)
        if new1[-1] != k.shape1[-1]:
            raise ValueError(f"{name}: resizing the channel axis has no infinite-width limit; set "
                             f"shape[-1] = -1.")
        if new1[0] != k.shape1[0] or new2[0] != k.shape2[0]:
            raise NotImplementedError(f"{name}: resizing the batch axis is not supported; set "
                                      f"shape[0] = -1.")
        spatial = new1[1:-1]
        pairs = tuple(s for s in spatial for _ in (0, 1))

        def resize_matrix(mat: Array | None, n_batch_axes: int) -> Array | None:
            if mat is None:
                return None
            return resize(mat, mat.shape[:n_batch_axes] + pairs)

        return k.replace(nngp=resize_matrix(k.nngp, 2), ntk=resize_matrix(k.ntk, 2),
                         cov1=resize_matrix(k.cov1, 1), cov2=resize_matrix(k.cov2, 1),
                         shape1=new1, shape2=new2)

    return layer(name, init_fn, apply_fn, transform)
