"""Spatial window arithmetic shared by convolutions and pooling, for arrays and for kernels.

A kernel keeps each spatial dimension as a pair of axes `(s, s')` (x1 side, x2 side). A layer that
reads input positions `o·stride + i` (`i` in its window) for output `o` acts on the pair as

- convolution (one shared filter): `K'[o, o'] = Σ_i K[o·stride + i, o'·stride + i]`, the *diagonal*
  window sum (weights at different offsets are independent, so cross-offset terms vanish);
- pooling (no weights): `K'[o, o'] = Σ_i Σ_j K[o·stride + i, o'·stride + j]`, the *product* window sum,
  which is the same 1-D sum applied to each axis of the pair separately.

Padding pads both axes of a pair: with zeros (`SAME`, padded inputs are zero) or by wrapping
(`CIRCULAR`, periodic inputs).
"""

from __future__ import annotations

import enum
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


class Padding(enum.Enum):
    """Padding modes of `Conv` and pooling layers (neural-tangents' names)."""

    VALID = "VALID"
    SAME = "SAME"
    CIRCULAR = "CIRCULAR"


def parse_padding(padding: str | Padding, layer_name: str) -> Padding:
    if isinstance(padding, Padding):
        return padding
    try:
        return Padding(str(padding).upper())
    except ValueError:
        raise ValueError(f"{layer_name}: padding={padding!r}; use 'VALID', 'SAME' or "
                         f"'CIRCULAR'.") from None


def parse_window(value: Sequence[int] | int | None, d: int, default: int, name: str,
                 layer_name: str) -> tuple[int, ...]:
    """`value` as a tuple of `d` positive ints (`None` gives `default` everywhere)."""
    if value is None:
        return (default,) * d
    if isinstance(value, int):
        value = (value,) * d
    value = tuple(int(v) for v in value)
    if len(value) != d or any(v < 1 for v in value):
        raise ValueError(f"{layer_name}: {name}={value} must be {d} positive int(s), one per "
                         f"spatial dimension of the input.")
    return value


def same_pads(in_sizes: Sequence[int], window: Sequence[int],
              strides: Sequence[int]) -> list[tuple[int, int]]:
    """`(low, high)` padding per dimension so that output size is `ceil(in / stride)` (XLA's SAME)."""
    pads = []
    for n, w, s in zip(in_sizes, window, strides):
        out = -(-n // s)
        total = max((out - 1) * s + w - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def pads_for(padding: Padding, in_sizes: Sequence[int], window: Sequence[int],
             strides: Sequence[int]) -> list[tuple[int, int]]:
    if padding is Padding.VALID:
        return [(0, 0)] * len(in_sizes)
    return same_pads(in_sizes, window, strides)


def output_sizes(in_sizes: Sequence[int], window: Sequence[int], strides: Sequence[int],
                 pads: Sequence[tuple[int, int]], layer_name: str) -> tuple[int, ...]:
    out = []
    for n, w, s, (lo, hi) in zip(in_sizes, window, strides, pads):
        size = (n + lo + hi - w) // s + 1
        if size < 1:
            raise ValueError(f"{layer_name}: window {tuple(window)} does not fit the spatial shape "
                             f"{tuple(in_sizes)} with VALID padding; use padding='SAME' or a smaller "
                             f"window.")
        out.append(size)
    return tuple(out)


def pad_array(x: Array, first_axis: int, pads: Sequence[tuple[int, int]], circular: bool) -> Array:
    """Pads spatial axes `first_axis, first_axis + 1, ...` of an activation array."""
    widths = [(0, 0)] * x.ndim
    for i, p in enumerate(pads):
        widths[first_axis + i] = p
    return jnp.pad(x, widths, mode="wrap" if circular else "constant")


def pad_pairs(mat: Array, first_axis: int, pads: Sequence[tuple[int, int]], circular: bool) -> Array:
    """Pads both axes of each spatial pair of a kernel (pairs start at `first_axis`)."""
    widths = [(0, 0)] * mat.ndim
    for i, p in enumerate(pads):
        widths[first_axis + 2 * i] = p
        widths[first_axis + 2 * i + 1] = p
    if all(w == (0, 0) for w in widths):
        return mat
    return jnp.pad(mat, widths, mode="wrap" if circular else "constant")


def _strided(mat: Array, axis: int, start: int, count: int, stride: int) -> Array:
    return lax.slice_in_dim(mat, start, start + (count - 1) * stride + 1, stride, axis)


def diagonal_window_sum(mat: Array, first_axis: int, window: Sequence[int],
                        strides: Sequence[int]) -> Array:
    """Convolution of a (padded) kernel: `Σ_i K[o·s + i, o'·s + i]` on every spatial pair."""
    for d, (w, s) in enumerate(zip(window, strides)):
        a = first_axis + 2 * d
        count = (mat.shape[a] - w) // s + 1
        count_b = (mat.shape[a + 1] - w) // s + 1
        total = 0
        for i in range(w):
            total = total + _strided(_strided(mat, a, i, count, s), a + 1, i, count_b, s)
        mat = total
    return mat


def window_sum(x: Array, axes: Sequence[int], window: Sequence[int], strides: Sequence[int]) -> Array:
    """Plain windowed sums (VALID) of `x` along `axes`: `y[o] = Σ_i x[o·s + i]`, as sums of strided
    slices (differentiable in every mode, unlike a generic `lax.reduce_window`)."""
    for ax, w, s in zip(axes, window, strides):
        count = (x.shape[ax] - w) // s + 1
        total = 0
        for i in range(w):
            total = total + _strided(x, ax, i, count, s)
        x = total
    return x


def product_window_sum(mat: Array, first_axis: int, window: Sequence[int],
                       strides: Sequence[int]) -> Array:
    """Pooling of a (padded) kernel: `Σ_i Σ_j K[o·s + i, o'·s + j]` on every spatial pair."""
    n = len(window)
    axes = [first_axis + k for k in range(2 * n)]
    return window_sum(mat, axes, [w for w in window for _ in (0, 1)],
                      [s for s in strides for _ in (0, 1)])
