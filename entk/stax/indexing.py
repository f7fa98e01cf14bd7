"""`Index`: NumPy-style indexing of activations, and its exact kernel map.

An index of the activations `(N, S_1, ..., S_d, C)` acts on the kernel (layout in
`entk.stax.kernel`) axis by axis:

- the batch axis: both batch axes of `nngp`/`ntk` (`(N1, N2, ...)`, one index for `x1` and the
  same for `x2`) and the batch axis of `cov1`/`cov2`;
- a spatial axis `S_i`: both axes `(S_i, S_i')` of its pair; an integer removes the pair;
- the channel axis: only `:` (every channel is an independent draw, so the kernel is unchanged);
  the channel count of the finite network changes nothing in the limit.

Per-axis entries: an int, a `slice`, or a tuple/list of ints (NumPy "take"); one `...` may stand
for the axes it skips. Build them with `Slice`: `Index(Slice[::2, 1:4, ..., 0:3])` is
`x[::2, 1:4, ..., 0:3]`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from entk.stax.kernel import Kernel, Layer, check_default_axes, expect_single, layer

Array = jax.Array


class _Slice:
    """`Slice[...]` returns its index unchanged: `Slice[1:3, ..., 0] == (slice(1, 3), ..., 0)`."""

    def __getitem__(self, idx: Any) -> Any:
        return idx


Slice = _Slice()


def _canonical(idx: Any, ndim: int, where: str) -> tuple:
    """`idx` as one entry per axis (ellipsis expanded, missing trailing axes `slice(None)`)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    for item in idx:
        ok = (item is Ellipsis or isinstance(item, (int, np.integer, slice))
              or (isinstance(item, (list, tuple)) and all(isinstance(i, (int, np.integer))
                                                          for i in item)))
        if not ok:
            raise TypeError(f"{where}: index entry {item!r} is not supported; use ints, slices, "
                            f"tuples of ints and one '...'.")
    if sum(isinstance(item, (list, tuple)) for item in idx) > 1:
        raise IndexError(f"{where}: at most one axis can be indexed by a tuple of ints (NumPy "
                         f"would pair several of them up), got {idx!r}; use two Index layers.")
    n_ellipsis = sum(item is Ellipsis for item in idx)
    if n_ellipsis > 1:
        raise IndexError(f"{where}: an index can have only one '...', got {idx!r}.")
    explicit = len(idx) - n_ellipsis
    if explicit > ndim:
        raise IndexError(f"{where}: index {idx!r} has {explicit} entries for inputs with {ndim} "
                         f"axes.")
    if n_ellipsis:
        at = next(i for i, item in enumerate(idx) if item is Ellipsis)
        idx = idx[:at] + (slice(None),) * (ndim - explicit) + idx[at + 1:]
    return tuple(idx) + (slice(None),) * (ndim - len(idx))


def _index_axis(mat: Array, axis: int, item: Any) -> Array:
    """`mat` indexed by `item` along `axis` (an int removes the axis)."""
    if isinstance(item, (list, tuple)):
        return jnp.take(mat, jnp.asarray(item, dtype=int), axis=axis)
    return mat[(slice(None),) * axis + (item,)]


def _index_kernel_matrix(mat: Array | None, idx: tuple, n_batch_axes: int) -> Array | None:
    """Applies the per-axis `idx` (batch, spatial..., without the channel entry) to a kernel
    matrix whose first `n_batch_axes` axes are batch axes and then spatial pairs. Axes are
    handled last to first so that removed axes do not shift the ones still to come."""
    if mat is None:
        return None
    batch, spatial = idx[0], idx[1:]
    for i in reversed(range(len(spatial))):
        a = n_batch_axes + 2 * i
        mat = _index_axis(_index_axis(mat, a + 1, spatial[i]), a, spatial[i])
    for a in reversed(range(n_batch_axes)):
        mat = _index_axis(mat, a, batch)
    return mat


def _indexed_shape(shape: Sequence[int], idx: tuple) -> tuple[int, ...]:
    return tuple(np.broadcast_to(np.zeros((), np.int8), tuple(shape))[idx].shape)


def Index(idx: Any, batch_axis: int = 0, channel_axis: int = -1) -> Layer:
    """`x[idx]` on the activations (see the module docstring; build `idx` with `Slice`).

    The kernel needs the batch axis kept (no integer there) and the channel axis whole (`:`);
    other axes take any int, slice or tuple of ints.
    """
    name = f"Index({idx!r})"
    check_default_axes(name, batch_axis, channel_axis)

    def init_fn(rng, input_shape):
        del rng
        return _indexed_shape(input_shape, _canonical(idx, len(input_shape), name)), ()

    def apply_fn(params, x, **kwargs):
        del params, kwargs
        full = _canonical(idx, x.ndim, name)
        for a in reversed(range(x.ndim)):
            x = _index_axis(x, a, full[a])
        return x

    def transform(k: Kernel, **kwargs) -> Kernel:
        k = expect_single(k, name)
        full = _canonical(idx, len(k.shape1), name)
        if full[-1] != slice(None):
            raise NotImplementedError(f"{name}: the channel axis is infinitely wide in the kernel "
                                      f"limit and cannot be indexed; index it with ':' or '...'.")
        if isinstance(full[0], (int, np.integer)):
            raise NotImplementedError(f"{name}: an integer index on the batch axis removes it, but "
                                      f"kernels need a batch axis; use a slice or a tuple, e.g. "
                                      f"({full[0]},).")
        inner = full[:-1]
        return k.replace(nngp=_index_kernel_matrix(k.nngp, inner, 2),
                         ntk=_index_kernel_matrix(k.ntk, inner, 2),
                         cov1=_index_kernel_matrix(k.cov1, inner, 1),
                         cov2=_index_kernel_matrix(k.cov2, inner, 1),
                         shape1=_indexed_shape(k.shape1, full),
                         shape2=_indexed_shape(k.shape2, full))

    return layer(name, init_fn, apply_fn, transform)
