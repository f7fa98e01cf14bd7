"""NTK-vector products (NTVP): Θ e_b = J1 (J2ᵀ e_b), one VJP then one JVP per column of the kernel.

No Jacobian is ever contracted: for every output element `b` of `f(x2)` (a basis cotangent `e_b`), a VJP
gives the parameter-space vector `J2ᵀ e_b` and a JVP through `f(x1)` turns it into a column of Θ.
Cost ≈ N2·O·[FP of the x1 batch] (Novak et al. 2022).

Where the output is large (no `vmap_axes`, or per-example outputs too large for whole blocks), each
column keeps only the entries the kernel needs: on traced and diagonal axes, only the x1 entry that
matches the column's own index (the rest of the JVP output is discarded at once), where neural-tangents
materialises the whole block of every column and reduces it afterwards.
With `vmap_axes`, kernels are built from single-example kernels, vmapped:
- batch axis free in every output leaf (the usual full or traced kernel): per pair `(i, j)`, a vmap over
  x1 inside a vmap over x2, as neural-tangents batches it, each pair's `O×O` block built by
  `_small_kernels` when the blocks fit (`_blocks_fit`). The forward pass of `f(x2_j)` does not depend
  on `i` (nor `f(x1_i)`'s on `j`), so vmap runs each once per example; the VJPs and JVPs run per pair.
  (Slicing example `j` out of the batch inside each column, as before, recomputed `f(x2_j)`'s forward
  pass for every column: 10-40% slower on the MLP and CNN benchmarks, up to 3x with one output.)
- batch axis diagonal: each example is paired with itself alone, N kernels of single examples instead
  of an N×N kernel, an N-fold saving.
- otherwise (the batch axis traced, or diagonal in one leaf and free in another): one column per output
  entry of x2, its VJP on its own example only, its JVP through the whole x1 batch.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from entk.algorithms._apply import batch_axes_of_output, output_shapes, param_bytes
from entk.algorithms.axes import KernelAxes, LeafAxes, VmapAxes

PyTree = Any


def asymptotic_flops(*, n1: int, n2: int, out_per_example: int, kept_per_pair: int, n_params: int,
                     forward_flops: float) -> float:
    """Novak et al. (2022): one VJP and one JVP of the x1 batch per output entry of x2,
    ≈ N2·O·[FP of the x1 batch] (`kept_per_pair` and `n_params` do not enter)."""
    del kept_per_pair, n_params
    return n2 * out_per_example * (n1 + 1) * forward_flops


def written_bytes_lower_bound(params: PyTree, vmap_axes: VmapAxes | None, fx1: PyTree,
                              fx2: PyTree) -> int:
    """Bytes the lowered program writes at least, as XLA's cost analysis counts them: every VJP pulls
    a basis cotangent back to a parameter-shaped vector, `min(N1, N2) · (outputs per example)` of them
    in each of this module's forms (per-example blocks: the VJPs of x1's examples, shared by every
    x2 example; columns: one per output entry of x2; the whole batch: one per output entry of f(x2)).
    `fx1`, `fx2`: `f`'s output shapes on x1 and x2 (the same when x2 is x1)."""
    leaves1, leaves2 = jax.tree_util.tree_leaves(fx1), jax.tree_util.tree_leaves(fx2)
    if vmap_axes is None:
        vectors = sum(math.prod(leaf.shape) for leaf in leaves2)
    else:
        vectors = sum(min(a.shape[b], c.shape[b]) * math.prod(a.shape) // max(a.shape[b], 1)
                      for a, c, b in zip(leaves1, leaves2, batch_axes_of_output(fx1, vmap_axes)))
    return vectors * param_bytes(params)


def empirical_ntk(f: Callable[..., PyTree], x1: PyTree, x2: PyTree | None, params: PyTree,
                  kwargs1: dict, kwargs2: dict, axes: KernelAxes,
                  vmap_axes: VmapAxes | None) -> PyTree:
    """The eNTK by NTK-vector products (`KernelAlgorithm` contract, see `entk.algorithms`)."""
    fx1 = output_shapes(f, x1, kwargs1, params)
    leaves1, treedef = jax.tree_util.tree_flatten(fx1)
    leaf_axes = [axes.for_leaf(len(s.shape)) for s in leaves1]

    if vmap_axes is not None:
        batch_axes = batch_axes_of_output(fx1, vmap_axes)
        diagonal = [b in la.diagonal for b, la in zip(batch_axes, leaf_axes)]
        free = [b in la.free for b, la in zip(batch_axes, leaf_axes)]
        if all(diagonal) or all(free):
            kernels = _per_example_kernels(f, x1, x2, params, kwargs1, kwargs2, leaf_axes, leaves1,
                                           batch_axes, vmap_axes, diagonal=all(diagonal))
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


def _small_kernels(f, x1, x2, params, kwargs1, kwargs2,
                   leaf_axes: Sequence[LeafAxes]) -> list[jax.Array]:
    """Kernels of every output leaf, in output layout, for outputs small enough to hold whole blocks.

    Neural-tangents' form: the linear map `δ ↦ J1 J2ᵀ δ` (a VJP through `f(x2)`, then a JVP through
    `f(x1)`) is transposed by `jax.linear_transpose` and applied to every basis vector of an x1 output
    leaf, giving the rows `Θ[a, :]` over the matching x2 leaf; traced and diagonal axes are then read off
    the `(S1, S2)` block. Used per example (a block is `O×O`) when the blocks fit (`_blocks_fit`):
    there XLA:CPU runs this form up to 3x faster than the same pairs built by columns of VJP then JVP
    (the benchmark MLP, N=8, one output: 0.9 against 2.5 ms).
    """
    leaves1 = jax.tree_util.tree_leaves(output_shapes(f, x1, kwargs1, params))
    leaves2 = jax.tree_util.tree_leaves(output_shapes(f, x2, kwargs2, params))
    _, vjp2 = jax.vjp(lambda p: jax.tree_util.tree_leaves(f(p, x2, **kwargs2)), params)

    def vjp_then_jvp(cotangents: list[jax.Array]) -> list[jax.Array]:
        tangent = vjp2(cotangents)[0]
        return jax.jvp(lambda p: jax.tree_util.tree_leaves(f(p, x1, **kwargs1)), (params,),
                       (tangent,))[1]

    rows_of = jax.linear_transpose(vjp_then_jvp, leaves2)
    kernels = []
    for i, (la, s1, s2) in enumerate(zip(leaf_axes, leaves1, leaves2)):
        basis = jnp.eye(s1.size, dtype=s1.dtype).reshape((s1.size, *s1.shape))

        def row(e: jax.Array, i=i) -> jax.Array:
            cts = [jnp.zeros(s.shape, s.dtype) for s in leaves1]
            cts[i] = e
            return rows_of(cts)[0][i]

        block = jax.vmap(row)(basis).reshape(tuple(s1.shape) + tuple(s2.shape))
        kernels.append(la.finish(_reduce_block(block, la), s1.shape))
    return kernels


def _reduce_block(block: jax.Array, la: LeafAxes) -> jax.Array:
    """`block[a..., b...]` (x1 output dims, then x2's) in canonical order: traced axes summed over
    their matching entries, diagonal axes kept once, free axes of x1 then of x2."""
    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    side1 = [next(letters) for _ in range(la.ndim)]
    side2 = [side1[a] if a in la.trace or a in la.diagonal else next(letters)
             for a in range(la.ndim)]
    out = ([side1[a] for a in la.diagonal] + [side1[a] for a in la.free]
           + [side2[a] for a in la.free])
    return jnp.einsum(f"{''.join(side1)}{''.join(side2)}->{''.join(out)}", block)


BLOCK_ENTRIES = 2 ** 25


def _blocks_fit(f, x2, params, kwargs2, leaf_axes: Sequence[LeafAxes], leaves1: Sequence[Any],
                batch_axes: Sequence[int], diagonal: bool) -> bool:
    """Whether the whole `(S1, S2)` output blocks of every example pair may be held at once.

    The blocks hold, per pair, every product of an x1 output entry with an x2 one; a traced or diagonal
    axis of size `s` keeps only `1/s` of them. They are allowed up to `BLOCK_ENTRIES` entries in all
    (128 MiB in float32) or 4x the kernel itself, whichever is larger; beyond that (large traced
    per-example outputs, e.g. per-token logits) columns keep only the entries the kernel needs.
    """
    leaves2 = (leaves1 if x2 is None
               else jax.tree_util.tree_leaves(output_shapes(f, x2, kwargs2, params)))
    blocks = kept = 0
    for la, b, s1, s2 in zip(leaf_axes, batch_axes, leaves1, leaves2):
        n1, n2 = s1.shape[b], s2.shape[b]
        pairs = n1 if diagonal else n1 * n2
        blocks += pairs * (s1.size // max(n1, 1)) * (s2.size // max(n2, 1))
        kept += math.prod(la.output_shape(s1.shape, s2.shape))
    return blocks <= max(4 * kept, BLOCK_ENTRIES)


def _per_example_kernels(f, x1, x2, params, kwargs1, kwargs2, leaf_axes: Sequence[LeafAxes],
                         leaves1: Sequence[Any], batch_axes: Sequence[int], vmap_axes: VmapAxes,
                         diagonal: bool) -> list[jax.Array]:
    """With `vmap_axes`, kernels built from single-example kernels, vmapped.

    `diagonal`: the batch axis is diagonal, so example `n` of x1 is paired with example `n` of x2 alone
    (one vmap over the zipped batches). Otherwise the batch axis is free and every pair `(i, j)` gets
    its kernel from a vmap over x1 inside a vmap over x2 (neural-tangents' batching): each forward pass
    runs once per example (it does not depend on the other side), the VJPs and JVPs once per pair.
    Each single kernel has size-1 batch axes, squeezed before the vmaps put the batch back at the
    leaf's output position (x1's, then x2's right after it). A single kernel is built in blocks
    (`_small_kernels`) when they fit, else by columns (`_kernels`).
    """
    in_axes = vmap_axes.input_axes(x1)
    kw_axes1 = vmap_axes.kwarg_axes(kwargs1)
    kw_axes2 = vmap_axes.kwarg_axes(kwargs2)
    positions = [la.output_position(b) for la, b in zip(leaf_axes, batch_axes)]
    if _blocks_fit(f, x2, params, kwargs2, leaf_axes, leaves1, batch_axes, diagonal):
        single_kernels = _small_kernels
    else:
        single_kernels = functools.partial(_kernels, batch_axes=None, vmap_axes=None)

    def expand(tree, axes_tree):
        return jax.tree_util.tree_map(jnp.expand_dims, tree, axes_tree)

    def expand_kwargs(kw, kw_axes):
        return {k: v if kw_axes[k] is None else expand(v, kw_axes[k]) for k, v in kw.items()}

    def single(x1_n, x2_n, kw1_n, kw2_n):
        x1_n, kw1_n = expand(x1_n, in_axes), expand_kwargs(kw1_n, kw_axes1)
        x2_n, kw2_n = expand(x2_n, in_axes), expand_kwargs(kw2_n, kw_axes2)
        kernels = single_kernels(f, x1_n, x2_n, params, kw1_n, kw2_n, leaf_axes)
        squeeze = (lambda p: p) if diagonal else (lambda p: (p, p + 1))
        return [jnp.squeeze(k, squeeze(p)) for k, p in zip(kernels, positions)]

    if x2 is None:
        x2, kwargs2, kw_axes2 = x1, kwargs1, kw_axes1
    if diagonal:
        return jax.vmap(single, in_axes=(in_axes, in_axes, kw_axes1, kw_axes2),
                        out_axes=positions)(x1, x2, kwargs1, kwargs2)
    over_x1 = jax.vmap(single, in_axes=(in_axes, None, kw_axes1, None), out_axes=positions)
    return jax.vmap(over_x1, in_axes=(None, in_axes, None, kw_axes2),
                    out_axes=[p + 1 for p in positions])(x1, x2, kwargs1, kwargs2)
