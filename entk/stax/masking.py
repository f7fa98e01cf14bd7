"""Masked inputs (variable-length sequences, missing pixels) for entk.stax, as in neural-tangents.

`apply_fn(params, x, mask_constant=c)` and `kernel_fn(x1, x2, mask_constant=c)` treat every input
entry equal to `c` (`NaN` allowed) as masked: it is replaced by zero and a boolean mask (true =
masked) travels with the activations. Each layer maps the mask of its input to the mask of its
output with its `mask_fn(mask, input_shape)` (a `Dense`/`Conv` output position is masked when all of
its input channels are, a `Conv`/`AvgPool` window output takes the mask of the window's centre,
global pooling masks an example only when every position is masked, ...). Layers that *reduce*
over positions use the mask: `GlobalAvgPool` averages over unmasked positions only, and
`GlobalSelfAttention` gives masked keys zero attention weight.

Masks are boolean arrays broadcastable to the activations, e.g. `(N, S..., 1)` after a layer that
mixes channels. Kernels carry them as `Kernel.mask1` / `mask2` (`mask2` is `None` when `x2` is
`x1`); a layer built with `remask=True` zeroes every kernel entry where either side is masked, the
kernel counterpart of zeroing masked activations before the next layer.

`apply_fn` with a mask returns a `MaskedArray(masked_value, mask)`; `unmask_fn(apply_fn)` returns a
plain array with masked entries zeroed (what `entk.empirical_ntk_fn` needs).

Windowed `AvgPool`/`SumPool` and `Conv` do not renormalise: masked inputs are zero and count in the
window, as in neural-tangents. One deliberate difference: every elementwise nonlinearity remasks
(neural-tangents skips it for a few, e.g. `Polynomial`, whose kernel then disagrees with its own
finite network when `φ(0) ≠ 0`). Layers built without a `mask_fn` (LayerNorm, Dropout, Index,
Slice, Aggregate, DotGeneral, ImageResize, ConvTranspose, BatchNorm, RNN, ...) raise
`NotImplementedError` naming themselves when a mask reaches them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from entk.stax.variances import pair_variances, self_variances

Array = jax.Array

NEG_INF = -1e20  # attention logit of a masked key (finite: softmax of all -inf is NaN)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class MaskedArray:
    """Activations `masked_value` (masked entries zero) and a boolean `mask` broadcastable to them.

    Not a tuple, so that lists of branches (`FanOut`, `parallel`) are never confused with it.
    """

    masked_value: Any
    mask: Any

    def tree_flatten(self):
        return (self.masked_value, self.mask), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls(*children)


def _is_leaf(x: Any) -> bool:
    return isinstance(x, MaskedArray)


def mask_of_constant(x: Array, mask_constant: Any) -> Array:
    """Boolean mask of the entries of `x` equal to `mask_constant` (`NaN` matches `NaN`)."""
    c = jnp.asarray(mask_constant)
    return jnp.where(jnp.isnan(c), jnp.isnan(x), x == c)


def zero_masked(x: Array, mask: Array | None) -> Array:
    """`x` with entries where `mask` is true replaced by zero."""
    if mask is None:
        return x
    return jnp.where(mask, jnp.zeros((), x.dtype), x)


def split(x: Any, mask_constant: Any = None) -> tuple[Any, Any]:
    """`(values, masks)` of an input (array, `MaskedArray`, or list of them): masked values zeroed,
    masks `None` where there is no mask."""
    if isinstance(x, list):
        pairs = [split(xi, mask_constant) for xi in x]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    if isinstance(x, MaskedArray):
        return zero_masked(x.masked_value, x.mask), x.mask
    if mask_constant is None or x is None:
        return x, None
    mask = mask_of_constant(jnp.asarray(x), mask_constant)
    return zero_masked(jnp.asarray(x), mask), mask


def has_mask(masks: Any) -> bool:
    return any(m is not None for m in (masks if isinstance(masks, list) else [masks]))


def unmask_fn(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    """`apply_fn` returning plain arrays, masked entries zero, instead of `MaskedArray`s."""
    @functools.wraps(apply_fn)
    def wrapped(*args, **kwargs):
        out = apply_fn(*args, **kwargs)
        return jax.tree_util.tree_map(
            lambda o: zero_masked(o.masked_value, o.mask) if isinstance(o, MaskedArray) else o,
            out, is_leaf=_is_leaf)

    return wrapped


# ----------------------------------------------------------------------------------------------
# Mask maps of layers: `mask_fn(mask, input_shape) -> mask`


def identity_mask(mask: Array, input_shape: Sequence[int]) -> Array:
    del input_shape
    return mask


def collapse_channels(mask: Array, input_shape: Sequence[int]) -> Array:
    """A position is masked once all of its channels are (layers that mix channels)."""
    del input_shape
    return jnp.all(mask, axis=-1, keepdims=True)


def window_centres(mask: Array, window: Sequence[int], strides: Sequence[int],
                   pads: Sequence[tuple[int, int]], out_sizes: Sequence[int]) -> Array:
    """Mask of a windowed layer's outputs `(N, out..., C)`: the mask at each window's centre
    position (`(w − 1) // 2` into the window, counted from the low padding)."""
    index = [slice(None)]
    for axis, (w, s, (lo, _), o) in enumerate(zip(window, strides, pads, out_sizes), start=1):
        if mask.shape[axis] == 1:
            index.append(slice(None))
            continue
        start = -lo + (w - 1) // 2
        index.append(slice(start, start + 1 + (o - 1) * s, s))
    out = mask[tuple(index) + (slice(None),)]
    want = tuple(o if mask.shape[a] != 1 else 1 for a, o in enumerate(out_sizes, start=1))
    if tuple(out.shape[1:-1]) != want:
        raise NotImplementedError(f"masking: window {tuple(window)} with padding {list(pads)} "
                                  f"gives a mask of spatial shape {out.shape[1:-1]}, expected "
                                  f"{want}.")
    return out


def and_masks(masks: list, input_shapes: list) -> Array | None:
    """`FanInSum` / `FanInProd`: an output entry is masked when it is masked in every branch that
    has a mask."""
    del input_shapes
    present = [m for m in masks if m is not None]
    return functools.reduce(jnp.logical_and, present) if present else None


def concat_masks(masks: list, input_shapes: list) -> Array | None:
    """`FanInConcat` along channels: each branch's mask broadcast to its channels, unmasked for
    branches without a mask."""
    if all(m is None for m in masks):
        return None
    lead = [m.shape[:-1] for m in masks if m is not None]
    lead = tuple(max(s) for s in zip(*lead))
    parts = []
    for m, shape in zip(masks, input_shapes):
        full = lead + (shape[-1],)
        parts.append(jnp.zeros(tuple(min(a, b) for a, b in zip(full, shape)), bool) if m is None
                     else jnp.broadcast_to(m, full))
    parts = [jnp.broadcast_to(p, lead + p.shape[-1:]) for p in parts]
    return jnp.concatenate(parts, axis=-1)


# ----------------------------------------------------------------------------------------------
# Masks in kernel layout


def position_mask(mask: Array, layer_name: str) -> Array:
    """`(N, S..., 1)` → `(N, S...)`; a mask that differs across channels has no kernel meaning
    (the kernel averages over channels)."""
    if mask.shape[-1] != 1:
        raise NotImplementedError(
            f"{layer_name}: the mask differs across channels (shape {tuple(mask.shape)}); "
            f"infinite-width kernels support masks shared by all channels of a position only, "
            f"e.g. mask whole positions of the inputs or put a Dense/Conv layer first.")
    return mask[..., 0]


def pair_masks(mask1: Array | None, mask2: Array | None, x1_is_x2: bool,
               layer_name: str) -> tuple[Array | None, Array | None, Array | None]:
    """`(mask11, mask12, mask22)` in the layouts of `cov1`, `nngp`, `cov2`: true where either of
    the two positions (examples) is masked. `mask2 = None` with `x1_is_x2` means `mask1`."""
    if mask1 is None and mask2 is None:
        return None, None, None
    if x1_is_x2:
        mask2 = mask1
    m1 = None if mask1 is None else position_mask(mask1, layer_name)
    m2 = None if mask2 is None else position_mask(mask2, layer_name)
    if m1 is None or m2 is None:  # one side unmasked: all-false mask of the right shape
        ref = m1 if m1 is not None else m2
        m1 = jnp.zeros_like(ref) if m1 is None else m1
        m2 = jnp.zeros_like(ref) if m2 is None else m2
    mask11 = functools.reduce(jnp.logical_or, self_variances(m1))
    mask22 = None if x1_is_x2 else functools.reduce(jnp.logical_or, self_variances(m2))
    mask12 = functools.reduce(jnp.logical_or, pair_variances(m1, m2))
    return mask11, mask12, mask22


def remask(k: Any, layer_name: str) -> Any:
    """Zeroes kernel entries where either position is masked."""
    mask11, mask12, mask22 = pair_masks(k.mask1, k.mask2, k.x1_is_x2, layer_name)
    if mask12 is None:
        return k
    return k.replace(nngp=zero_masked(k.nngp, mask12),
                     ntk=None if k.ntk is None else zero_masked(k.ntk, mask12),
                     cov1=zero_masked(k.cov1, mask11),
                     cov2=None if k.cov2 is None else zero_masked(k.cov2, mask22))


def masked_mean(mat: Array, axes: tuple[int, ...], mask: Array | None) -> Array:
    """Mean of `mat` over `axes` counting only entries where `mask` is false (at least one)."""
    if mask is None:
        return jnp.mean(mat, axes)
    mask = jnp.broadcast_to(mask, mat.shape)
    count = jnp.maximum(jnp.sum(~mask, axis=axes), 1)
    return jnp.sum(zero_masked(mat, mask), axis=axes) / count


# ----------------------------------------------------------------------------------------------
# Wrapping a layer


UNSUPPORTED = "unsupported"  # `mask_fn` of layers that raise when a mask reaches them
PASS_THROUGH = "pass"        # combinators: their inner layers handle masks


def _not_supported(name: str) -> NotImplementedError:
    return NotImplementedError(
        f"{name} does not support masked inputs (mask_constant) yet; masks are supported by "
        f"Dense, Conv, ConvLocal, the nonlinearities, AvgPool, SumPool, GlobalAvgPool, "
        f"GlobalSumPool, Flatten, GlobalSelfAttention (linear_scaling=True), Identity, FanInSum, "
        f"FanInProd, FanInConcat and the combinators. Remove mask_constant or the layer.")


def _shapes(x: Any) -> Any:
    return [xi.shape for xi in x] if isinstance(x, list) else x.shape


def wrap_apply(name: str, apply_fn: Callable, mask_fn: Any, apply_uses_mask: bool) -> Callable:
    """`apply_fn(params, x, mask_constant=None, **kw)`: masks `x`, calls the layer and returns a
    `MaskedArray` when there is a mask."""
    if mask_fn == PASS_THROUGH:
        return apply_fn

    @functools.wraps(apply_fn)
    def wrapped(params, x, mask_constant=None, **kwargs):
        values, masks = split(x, mask_constant)
        if not has_mask(masks):
            return apply_fn(params, values, **kwargs)
        if mask_fn == UNSUPPORTED:
            raise _not_supported(name)
        extra = {"mask": masks} if apply_uses_mask else {}
        out = apply_fn(params, values, **extra, **kwargs)
        out_mask = mask_fn(masks, _shapes(values))
        return out if out_mask is None else MaskedArray(out, out_mask)

    return wrapped


def wrap_transform(name: str, transform: Callable, mask_fn: Any, do_remask: bool) -> Callable:
    """The kernel map with masks: propagates `mask1`/`mask2` with `mask_fn` and, if `do_remask`,
    zeroes covariances of masked positions."""
    if mask_fn == PASS_THROUGH:
        return transform

    def wrapped(k: Any, **kwargs):
        ks = k if isinstance(k, list) else [k]
        if not any(ki.mask1 is not None or ki.mask2 is not None for ki in ks):
            return transform(k, **kwargs)
        if mask_fn == UNSUPPORTED:
            raise _not_supported(name)

        def new_mask(field: str, shape_field: str):
            if isinstance(k, list):
                masks = [getattr(ki, field) for ki in ks]
                return mask_fn(masks, [getattr(ki, shape_field) for ki in ks]) \
                    if has_mask(masks) else None
            m = getattr(k, field)
            return None if m is None else mask_fn(m, getattr(k, shape_field))

        mask1 = new_mask("mask1", "shape1")
        mask2 = None if ks[0].x1_is_x2 else new_mask("mask2", "shape2")
        out = transform(k, **kwargs).replace(mask1=mask1, mask2=mask2)
        return remask(out, name) if do_remask else out

    return wrapped
