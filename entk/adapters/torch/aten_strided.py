"""`aten.as_strided` and friends: strided views of a tensor's storage, as static index maps.

`as_strided(x, size, stride, storage_offset)` reads element `j` of its result from storage position
`storage_offset + sum(j_k * stride_k)` of `x`'s *storage*. JAX arrays have no storage, only logical
values, so the translation first maps every storage position `x` covers back to `x`'s row-major
(logical) flat index, using the strides and offset PyTorch recorded for `x` in the exported graph
(`node.args[0].meta["val"]`). Composing the two gives, at trace time and with NumPy, an integer
array `index` of the result's shape: `result = x.reshape(-1)[index]`.

Where `index` is affine in the result's coordinates with non-overlapping strides (the common case:
`AdaptiveAvgPool2d` on a channels-last tensor, as in torchvision's ConvNeXt, restrides a
`(N, C, 1, 1)` result; `x.unfold`-free window partitions), the view is emitted as a slice / reshape
/ transpose / broadcast, so structured derivatives see plain view ops. Anything else (overlapping
windows, negative steps through a transposed input) becomes one gather with a constant index.

Storage positions `x` does not cover (its view reaches outside `x`'s elements) have no value in
JAX; such a node is refused with an error naming it.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
from jax import lax
import numpy as np

from entk.adapters.torch.aten import as_int_list, register


def _static_ints(values: Sequence[Any], meta_shape: Sequence[Any], shape: Sequence[int],
                 what: str) -> list[int]:
    """Strides / offset recorded in a node's meta as ints; symbolic sizes (dynamic batch) are
    evaluated against the actual `shape` of the input."""
    out, subs = [], {}
    for s, n in zip(meta_shape, shape):
        expr = getattr(getattr(s, "node", None), "expr", None)
        if expr is not None and getattr(expr, "is_Symbol", False):
            subs[expr] = n
    for v in values:
        if isinstance(v, (int, np.integer)):
            out.append(int(v))
            continue
        expr = getattr(getattr(v, "node", None), "expr", None)
        try:
            out.append(int(expr.subs(subs)))
        except Exception as e:  # noqa: BLE001 - a symbolic stride the input shape does not fix
            raise ValueError(f"the input's {what} {v} is symbolic and cannot be evaluated from its "
                             f"shape {tuple(shape)}") from e
    return out


def _input_layout(node: Any, shape: tuple[int, ...]) -> tuple[list[int], int]:
    """Strides and storage offset of `as_strided`'s input, as PyTorch recorded them."""
    arg = node.args[0] if node is not None and node.args else None
    val = getattr(arg, "meta", {}).get("val") if arg is not None else None
    if val is None or not hasattr(val, "stride"):  # no record: the input is a fresh tensor
        strides = [int(np.prod(shape[k + 1:], dtype=np.int64)) for k in range(len(shape))]
        return strides, 0
    strides = _static_ints(val.stride(), val.shape, shape, "stride")
    offset = _static_ints([val.storage_offset()], val.shape, shape, "storage offset")[0]
    return strides, offset


def strided_index(shape: Sequence[int], in_strides: Sequence[int], in_offset: int,
                  size: Sequence[int], stride: Sequence[int], offset: int) -> np.ndarray:
    """For each element of `as_strided(x, size, stride, offset)`, its row-major flat index in `x`.

    `x` has logical `shape` and lies in storage with `in_strides` / `in_offset`. Raises ValueError
    if the view reads a storage position no element of `x` occupies.
    """
    shape, size = tuple(int(s) for s in shape), tuple(int(s) for s in size)
    numel = int(np.prod(shape, dtype=np.int64))
    # storage position of every element of x, in x's row-major order
    pos = np.full(shape, in_offset, dtype=np.int64)
    for k, (n, s) in enumerate(zip(shape, in_strides)):
        pos += (np.arange(n, dtype=np.int64) * s).reshape((n,) + (1,) * (len(shape) - k - 1))
    pos = pos.reshape(-1)
    # storage position each result element reads
    want = np.full(size, offset, dtype=np.int64)
    for k, (n, s) in enumerate(zip(size, stride)):
        want += (np.arange(n, dtype=np.int64) * s).reshape((n,) + (1,) * (len(size) - k - 1))
    if want.size == 0:
        return want
    # invert pos (an overlapping input, e.g. an expanded one, holds equal values at one position)
    order = np.argsort(pos, kind="stable")
    sorted_pos = pos[order]
    at = np.searchsorted(sorted_pos, want)
    hit = (at < numel) & (sorted_pos[np.minimum(at, max(numel - 1, 0))] == want) if numel else \
        np.zeros(want.shape, bool)
    if not hit.all():
        bad = int(want[~hit].flat[0])
        raise ValueError(
            f"the strided view reads storage position {bad}, which no element of its input "
            f"(shape {shape}, strides {tuple(in_strides)}, offset {in_offset}) occupies; export "
            f"mode only sees the input's values, not the storage around them")
    return order[at]


def _affine(index: np.ndarray) -> tuple[int, list[int]] | None:
    """`(base, steps)` with `index == base + sum_k j_k * steps[k]`, or None if not affine."""
    base = int(index.flat[0])
    steps = []
    for k, n in enumerate(index.shape):
        steps.append(int(np.take(index, 1, axis=k).flat[0]) - base if n > 1 else 0)
    expect = np.full(index.shape, base, dtype=np.int64)
    for k, (n, s) in enumerate(zip(index.shape, steps)):
        expect += (np.arange(n, dtype=np.int64) * s).reshape((n,) + (1,) * (index.ndim - k - 1))
    return (base, steps) if np.array_equal(expect, index) else None


def gather_view(x: Any, index: np.ndarray) -> Any:
    """`x.reshape(-1)[index]`, emitted as view ops (slice, reshape, transpose, broadcast) when
    `index` describes a non-overlapping affine view, else as one gather."""
    flat = jnp.reshape(x, (-1,))
    numel = flat.shape[0]
    out_shape = index.shape
    if index.size == 0:
        return jnp.zeros(out_shape, x.dtype)
    if index.size == numel and np.array_equal(index.reshape(-1), np.arange(numel)):
        return jnp.reshape(x, out_shape)
    affine = _affine(index)
    if affine is not None:
        base, steps = affine
        # dims that move through memory, outermost (largest step) first
        moving = sorted((k for k, s in enumerate(steps) if s > 0 and out_shape[k] > 1),
                        key=lambda k: -steps[k])
        negative = any(s < 0 for s in steps)
        sizes = [out_shape[k] for k in moving]
        strides = [steps[k] for k in moving]
        nested = all(strides[i] >= sizes[i + 1] * strides[i + 1] for i in range(len(moving) - 1))
        if not negative and nested:
            return _affine_view(flat, base, moving, sizes, strides, out_shape)
    return jnp.take(flat, jnp.asarray(index), axis=0)


def _affine_view(flat: Any, base: int, moving: list[int], sizes: list[int], strides: list[int],
                 out_shape: tuple[int, ...]) -> Any:
    """The affine view as slice / reshape / transpose / broadcast of the flat input."""
    numel = flat.shape[0]
    if not moving:  # every element reads the same position
        t = lax.slice_in_dim(flat, base, base + 1)
        return jnp.broadcast_to(jnp.reshape(t, (1,) * len(out_shape)), out_shape)
    end = base + sizes[0] * strides[0]
    t = lax.slice_in_dim(flat, base, min(end, numel))
    if end > numel:  # the last block is only partly read; pad it (the padding is never selected)
        t = jnp.pad(t, (0, end - numel))
    t = jnp.reshape(t, (sizes[0], strides[0]))
    for n, s in zip(sizes[1:], strides[1:]):
        if n * s < t.shape[-1]:
            t = lax.slice_in_dim(t, 0, n * s, axis=t.ndim - 1)
        t = jnp.reshape(t, t.shape[:-1] + (n, s))
    t = lax.index_in_dim(t, 0, axis=t.ndim - 1, keepdims=False) if strides[-1] > 1 else \
        jnp.reshape(t, t.shape[:-1])
    # axes are in `moving` order; put them in result order, then add size-1 / broadcast axes
    order = sorted(range(len(moving)), key=lambda i: moving[i])
    if order != list(range(len(moving))):
        t = jnp.transpose(t, order)
    kept = set(moving)
    t = jnp.reshape(t, tuple(n if k in kept else 1 for k, n in enumerate(out_shape)))
    return t if t.shape == tuple(out_shape) else jnp.broadcast_to(t, out_shape)


def _view_index(x: Any, size: Any, stride: Any, storage_offset: Any, node: Any) -> np.ndarray:
    shape = tuple(x.shape)
    in_strides, in_offset = _input_layout(node, shape)
    offset = in_offset if storage_offset is None else int(storage_offset)
    size, stride = as_int_list(size), as_int_list(stride)
    if len(size) != len(stride):
        raise ValueError(f"as_strided got {len(size)} sizes {size} but {len(stride)} strides "
                         f"{stride}")
    return strided_index(shape, in_strides, in_offset, size, stride, offset)


@register("as_strided", "as_strided_copy")
def as_strided(self, size, stride, storage_offset=None, *, node=None):
    return gather_view(self, _view_index(self, size, stride, storage_offset, node))


@register("as_strided_scatter")
def as_strided_scatter(self, src, size, stride, storage_offset=None, *, node=None):
    """`self` with the elements of its strided view replaced by `src` (a fresh tensor)."""
    index = _view_index(self, size, stride, storage_offset, node)
    flat_index = index.reshape(-1)
    if np.unique(flat_index).size != flat_index.size:
        raise ValueError("as_strided_scatter into an overlapping view (several elements of src "
                         "land on one element of the input) has no single result")
    flat = jnp.reshape(self, (-1,)).at[jnp.asarray(flat_index)].set(jnp.reshape(src, (-1,)))
    return jnp.reshape(flat, self.shape)


# The exporter passes these translations their graph node (`node=`), for the input's strides.
as_strided.wants_node = True
as_strided_scatter.wants_node = True
