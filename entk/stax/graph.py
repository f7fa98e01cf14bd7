"""`Aggregate`: message passing over a graph given per example (graph neural networks).

Each example `n` of the activations `(N, S_1, ..., S_d, C)` comes with a weighted adjacency
`pattern[n, i, j]` over the vertices `i, j` of the aggregated spatial axes (all of them by default;
a vertex is a tuple of positions `(i_1, ..., i_K)`, `K = len(aggregate_axis)`). The layer replaces
each vertex by the weighted sum of its predecessors:

    y[n, j, c] = Σ_i pattern[n, i, j] · x[n, i, c]          (Du et al. 2019, Graph NTK)

It is linear without parameters, so the kernel is transformed on both sides, with `x1`'s
patterns `P1` on the `x1` axes and `x2`'s `P2` on the `x2` axes:

    nngp'[n1, n2, j, j'] = Σ_{i, i'} P1[n1, i, j] · P2[n2, i', j'] · nngp[n1, n2, i, i']

(`ntk` likewise; `cov1` with `P1` on both sides, `cov2` with `P2`). Gaussian inputs stay Gaussian.

`pattern` is passed at call time: `apply_fn(params, x, pattern=P)` and
`kernel_fn(x1, x2, pattern=(P1, P2))` (`P2` may be `None` when `x2` is `None`).
"""

from __future__ import annotations

import enum

import string
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from entk.stax.kernel import Kernel, Layer, check_default_axes, expect_single, layer

Array = jax.Array


def _aggregate_axes(aggregate_axis: int | Sequence[int] | None, ndim: int, name: str) -> tuple:
    """Spatial axes (1 .. ndim−2) to aggregate over, in increasing order."""
    spatial = tuple(range(1, ndim - 1))
    if aggregate_axis is None:
        return spatial
    axes = (aggregate_axis,) if isinstance(aggregate_axis, int) else tuple(aggregate_axis)
    axes = tuple(sorted(a % ndim for a in axes))
    if not axes or any(a not in spatial for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"{name}: aggregate_axis={aggregate_axis} must name distinct spatial axes "
                         f"(not the batch axis 0 or the channel axis -1) of inputs with {ndim} "
                         f"axes.")
    return axes


def _sparse_to_dense(pattern: Array, agg_shape: tuple[int, ...], name: str) -> Array:
    """Edge lists `(N, E, K, 2)` (or `(N, E, 2)` for K = 1) of integer (tail, head) vertices →
    dense adjacency `(N, *agg_shape, *agg_shape)` counting repeated edges; an edge with a negative
    coordinate is padding and dropped."""
    pattern = jnp.asarray(pattern)
    k = len(agg_shape)
    if k == 1 and pattern.ndim == 3:
        pattern = pattern[:, :, None, :]
    if pattern.ndim != 4 or pattern.shape[2] != k or pattern.shape[3] != 2:
        raise ValueError(f"{name}: a SPARSE pattern has shape (batch, n_edges, {k}, 2) (tail, head "
                         f"per aggregated axis), got {tuple(pattern.shape)}.")
    size = int(np.prod(agg_shape))
    tails = jnp.ravel_multi_index(tuple(jnp.moveaxis(pattern[..., 0], -1, 0)), agg_shape,
                                  mode="wrap")
    heads = jnp.ravel_multi_index(tuple(jnp.moveaxis(pattern[..., 1], -1, 0)), agg_shape,
                                  mode="wrap")
    valid = jnp.all(pattern >= 0, axis=(2, 3))
    flat = tails * size + heads

    def one(f, v):
        return jnp.zeros(size * size).at[f].add(v.astype(float))

    dense = jax.vmap(one)(flat, valid)
    return dense.reshape((pattern.shape[0],) + tuple(agg_shape) * 2)


class AggregateImplementation(enum.Enum):
    """How `Aggregate`'s `pattern` is given (neural-tangents' names): a dense adjacency or an edge list."""

    DENSE = "DENSE"
    SPARSE = "SPARSE"


def Aggregate(aggregate_axis: int | Sequence[int] | None = None, batch_axis: int = 0,
              channel_axis: int = -1, to_dense: Callable[[Any], Array] | None = lambda p: p,
              implementation: str = "DENSE") -> Layer:
    """Graph aggregation `y[n, j] = Σ_i pattern[n, i, j]·x[n, i]` (module docstring).

    Args:
      aggregate_axis: spatial axes whose positions are the vertices (default: all).
      batch_axis, channel_axis: only 0 and -1.
      to_dense: `"DENSE"` only: maps the given `pattern` to the dense
        `(N, *vertex_shape, *vertex_shape)` adjacency on every call (identity by default).
      implementation: `"DENSE"` or `AggregateImplementation.DENSE` (pattern is the adjacency) or `"SPARSE"` (pattern is an integer
        edge list `(N, n_edges, K, 2)`, see `_sparse_to_dense`; edges with negative vertices are
        padding). Both compute the same dense contraction here.
    """
    name = f"Aggregate(aggregate_axis={aggregate_axis})"
    check_default_axes(name, batch_axis, channel_axis)
    impl = (implementation.name if isinstance(implementation, enum.Enum)
            else str(implementation).upper())
    if impl not in AggregateImplementation.__members__:
        raise ValueError(f"{name}: implementation={implementation!r}; use 'DENSE' or 'SPARSE'.")

    def dense(pattern: Any, shape: Sequence[int], axes: tuple, which: str) -> Array:
        agg_shape = tuple(shape[a] for a in axes)
        if impl == "SPARSE":
            p = _sparse_to_dense(pattern, agg_shape, name)
        else:
            p = jnp.asarray(pattern if to_dense is None else to_dense(pattern))
        want = (shape[0],) + agg_shape * 2
        if tuple(p.shape) != want:
            raise ValueError(f"{name}: {which} has dense shape {tuple(p.shape)}, expected {want} "
                             f"(batch, vertex axes for the tail, vertex axes for the head) for "
                             f"inputs of shape {tuple(shape)}.")
        return p

    def init_fn(rng, input_shape):
        del rng
        return input_shape, ()

    def apply_fn(params, x, pattern=None, **kwargs):
        del params, kwargs
        if pattern is None:
            return x
        axes = _aggregate_axes(aggregate_axis, x.ndim, name)
        p = dense(pattern, x.shape, axes, "pattern").astype(x.dtype)
        letters = iter(string.ascii_letters)
        idx = [next(letters) for _ in range(x.ndim)]
        heads = {a: next(letters) for a in axes}
        spec_p = idx[0] + "".join(idx[a] for a in axes) + "".join(heads[a] for a in axes)
        out = [heads.get(a, idx[a]) for a in range(x.ndim)]
        return jnp.einsum(f"{''.join(idx)},{spec_p}->{''.join(out)}", x, p,
                          precision=jax.lax.Precision.HIGHEST)

    def contract(mat: Array | None, p1: Array, p2: Array, n_batch_axes: int, axes: tuple) -> Array:
        """Applies `p1` to the x1 side and `p2` to the x2 side of every aggregated spatial pair."""
        if mat is None:
            return None
        letters = iter(string.ascii_letters)
        idx = [next(letters) for _ in range(mat.ndim)]
        out = list(idx)
        tails1, tails2, heads1, heads2 = [], [], [], []
        for a in axes:
            pos = n_batch_axes + 2 * (a - 1)
            tails1.append(idx[pos])
            tails2.append(idx[pos + 1])
            h1, h2 = next(letters), next(letters)
            heads1.append(h1)
            heads2.append(h2)
            out[pos], out[pos + 1] = h1, h2
        b2 = idx[1] if n_batch_axes == 2 else idx[0]
        spec1 = idx[0] + "".join(tails1) + "".join(heads1)
        spec2 = b2 + "".join(tails2) + "".join(heads2)
        return jnp.einsum(f"{''.join(idx)},{spec1},{spec2}->{''.join(out)}", mat, p1, p2,
                          precision=jax.lax.Precision.HIGHEST)

    def transform(k: Kernel, pattern=(None, None), **kwargs) -> Kernel:
        k = expect_single(k, name)
        if not isinstance(pattern, (tuple, list)) or len(pattern) != 2:
            raise ValueError(f"{name}: kernel_fn takes pattern=(pattern1, pattern2), one per input "
                             f"batch, got {type(pattern).__name__}.")
        pattern1, pattern2 = pattern
        if pattern1 is None and pattern2 is None:
            return k
        if pattern1 is None or (pattern2 is None and k.cov2 is not None):
            raise ValueError(f"{name}: pass both patterns (pattern2 may be None only when x2 is "
                             f"None), or neither for the identity.")
        axes = _aggregate_axes(aggregate_axis, len(k.shape1), name)
        p1 = dense(pattern1, k.shape1, axes, "pattern1").astype(k.nngp.dtype)
        p2 = p1 if pattern2 is None else dense(pattern2, k.shape2, axes, "pattern2").astype(
            k.nngp.dtype)
        separate = pattern2 is not None and pattern2 is not pattern1 and k.cov2 is None
        cov2 = k.cov2 if k.cov2 is not None else (k.cov1 if separate else None)
        return k.replace(nngp=contract(k.nngp, p1, p2, 2, axes),
                         ntk=contract(k.ntk, p1, p2, 2, axes),
                         cov1=contract(k.cov1, p1, p1, 1, axes),
                         cov2=None if cov2 is None else contract(cov2, p2, p2, 1, axes),
                         x1_is_x2=k.x1_is_x2 and not separate)

    return layer(name, init_fn, apply_fn, transform)
