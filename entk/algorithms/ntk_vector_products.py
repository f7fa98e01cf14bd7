"""NTK-vector products (NTVP): Θ e_b = J1 (J2ᵀ e_b), one VJP then one JVP per column of the kernel.

No Jacobian is ever contracted: for every output element `b` of `f(x2)` (a basis cotangent `e_b`), a VJP
gives the parameter-space vector `J2ᵀ e_b` and a JVP through `f(x1)` turns it into a column of Θ.
Cost ≈ N2·O·[FP of the x1 batch] (Novak et al. 2022).

Unlike neural-tangents, which materialises the whole `O×O` block of every column and reduces it
afterwards, each column here keeps only the entries the kernel needs: on traced and diagonal axes, only
the x1 entry that matches the column's own index (the rest of the JVP output is discarded at once).
With `vmap_axes`:
- the VJP of a column runs on its own example only (not the whole x2 batch);
- when the batch axis is diagonal, each example is paired with itself alone: N kernels of single
  examples instead of an N×N kernel, an N-fold saving.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from entk.algorithms._apply import batch_axes_of_output, output_shapes
from entk.algorithms.axes import KernelAxes, LeafAxes, VmapAxes

PyTree = Any


def asymptotic_flops(*, n1: int, n2: int, out_per_example: int, kept_per_pair: int, n_params: int,
                     forward_flops: float) -> float:
    """Novak et al. (2022): one VJP and one JVP of the x1 batch per output entry of x2,
    ≈ N2·O·[FP of the x1 batch] (`kept_per_pair` and `n_params` do not enter)."""
    del kept_per_pair, n_params
    return n2 * out_per_example * (n1 + 1) * forward_flops


def empirical_ntk(f: Callable[..., PyTree], x1: PyTree, x2: PyTree | None, params: PyTree,
                  kwargs1: dict, kwargs2: dict, axes: KernelAxes,
                  vmap_axes: VmapAxes | None) -> PyTree:
    """The eNTK by NTK-vector products (`KernelAlgorithm` contract, see `entk.algorithms`)."""
    fx1 = output_shapes(f, x1, kwargs1, params)
    leaves1, treedef = jax.tree_util.tree_flatten(fx1)
    leaf_axes = [axes.for_leaf(len(s.shape)) for s in leaves1]

    if vmap_axes is not None:
        batch_axes = batch_axes_of_output(f, x1, kwargs1, params, vmap_axes)
        if all(b in la.diagonal for b, la in zip(batch_axes, leaf_axes)):
            kernels = _batch_diagonal_kernels(f, x1, x2, params, kwargs1, kwargs2, leaf_axes,
                                              batch_axes, vmap_axes)
            return treedef.unflatten(kernels)
    else:
        batch_axes = None

    if x2 is None:
        x2, kwargs2 = x1, kwargs1
    kernels = _kernels(f, x1, x2, params, kwargs1, kwargs2, leaf_axes, batch_axes, vmap_axes)
    return treedef.unflatten(kernels)


def _kernels(f, x1, x2, params, kwargs1, kwargs2, leaf_axes: Sequence[LeafAxes],
             batch_axes: Sequence[int] | None, vmap_axes: VmapAxes | None) -> list[jax.Array]:
    """Kernels of every output leaf, in output layout, columns built by VJP then JVP."""
    leaves1 = jax.tree_util.tree_leaves(output_shapes(f, x1, kwargs1, params))
    leaves2 = jax.tree_util.tree_leaves(output_shapes(f, x2, kwargs2, params))
    _, jvp1 = jax.linearize(lambda p: jax.tree_util.tree_leaves(f(p, x1, **kwargs1)), params)

    if vmap_axes is None:
        _, vjp2 = jax.vjp(lambda p: jax.tree_util.tree_leaves(f(p, x2, **kwargs2)), params)

        def pullback(i: int, index: jax.Array) -> PyTree:
            return vjp2(_one_hot_cotangents(leaves2, i, index))[0]
    else:
        in_axes = vmap_axes.input_axes(x2)
        kw_axes = vmap_axes.kwarg_axes(kwargs2)

        def pullback(i: int, index: jax.Array) -> PyTree:
            n = index[batch_axes[i]]
            x_n = jax.tree_util.tree_map(lambda v, a: lax.dynamic_slice_in_dim(v, n, 1, a), x2, in_axes)
            kw_n = {k: (v if kw_axes[k] is None else jax.tree_util.tree_map(
                lambda u, a: lax.dynamic_slice_in_dim(u, n, 1, a), v, kw_axes[k]))
                for k, v in kwargs2.items()}
            out_n, vjp_n = jax.vjp(lambda p: jax.tree_util.tree_leaves(f(p, x_n, **kw_n)), params)
            return vjp_n(_one_hot_cotangents(out_n, i, index.at[batch_axes[i]].set(0)))[0]

    kernels = []
    for i, (la, s1, s2) in enumerate(zip(leaf_axes, leaves1, leaves2)):
        matched = tuple(sorted(la.trace + la.diagonal))

        def column(index: jax.Array, i=i, matched=matched) -> jax.Array:
            tangent_out = jvp1(pullback(i, index))[i]
            return tangent_out[tuple(index[a] if a in matched else slice(None)
                                     for a in range(la.ndim))]

        shape2 = tuple(s2.shape)
        indices = (jnp.stack(jnp.unravel_index(jnp.arange(s2.size), shape2), axis=-1)
                   if shape2 else jnp.zeros((1, 0), jnp.int32))
        columns = jax.vmap(column)(indices)                    # (|S2|, *free sizes of x1)
        free1 = tuple(s1.shape[a] for a in la.free)
        columns = columns.reshape(shape2 + free1)
        columns = columns.sum(axis=la.trace) if la.trace else columns
        remaining = [a for a in range(la.ndim) if a not in la.trace]
        n_rem = len(remaining)
        perm = ([remaining.index(d) for d in la.diagonal]
                + [n_rem + j for j in range(len(la.free))]
                + [remaining.index(a) for a in la.free])
        kernels.append(la.finish(jnp.transpose(columns, perm), s1.shape))
    return kernels


def _one_hot_cotangents(leaves: Sequence[Any], i: int, index: jax.Array) -> list[jax.Array]:
    """Zero cotangents for every output leaf, except a 1 at `index` of leaf `i`."""
    cts = [jnp.zeros(s.shape, s.dtype) for s in leaves]
    cts[i] = cts[i].at[tuple(index[a] for a in range(len(leaves[i].shape)))].set(1)
    return cts


def _batch_diagonal_kernels(f, x1, x2, params, kwargs1, kwargs2, leaf_axes: Sequence[LeafAxes],
                            batch_axes: Sequence[int], vmap_axes: VmapAxes) -> list[jax.Array]:
    """Diagonal batch axis with `vmap_axes`: each example's kernel with itself alone, vmapped."""
    in_axes = vmap_axes.input_axes(x1)
    kw_axes1 = vmap_axes.kwarg_axes(kwargs1)
    kw_axes2 = vmap_axes.kwarg_axes(kwargs2)
    positions = [la.output_position(b) for la, b in zip(leaf_axes, batch_axes)]

    def expand(tree, axes_tree):
        return jax.tree_util.tree_map(jnp.expand_dims, tree, axes_tree)

    def expand_kwargs(kw, kw_axes):
        return {k: v if kw_axes[k] is None else expand(v, kw_axes[k]) for k, v in kw.items()}

    def one(x1_n, x2_n, kw1_n, kw2_n):
        x1_n, kw1_n = expand(x1_n, in_axes), expand_kwargs(kw1_n, kw_axes1)
        x2_n, kw2_n = expand(x2_n, in_axes), expand_kwargs(kw2_n, kw_axes2)
        kernels = _kernels(f, x1_n, x2_n, params, kw1_n, kw2_n, leaf_axes, None, None)
        return [jnp.squeeze(k, p) for k, p in zip(kernels, positions)]

    if x2 is None:
        x2, kwargs2, kw_axes2 = x1, kwargs1, kw_axes1
    return jax.vmap(one, in_axes=(in_axes, in_axes, kw_axes1, kw_axes2), out_axes=positions)(
        x1, x2, kwargs1, kwargs2)
