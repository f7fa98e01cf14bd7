"""Jacobian contraction (JC): Θ = Σ_leaves J1 J2ᵀ from explicitly materialised Jacobians.

Cost (Novak et al. 2022): N·O·[FP] to build the Jacobians plus N1·N2·O²·P to contract them (traced axes
fold into the contraction, so a traced kernel costs N1·N2·O·P). Each parameter leaf is contracted with
its own `lax.dot_general` (diagonal axes as batch dimensions, traced axes and the leaf's dimensions as
contracting ones) as soon as XLA has produced it, so the full Jacobian is never concatenated.

A traced kernel whose Jacobian would not stay in cache (one side over `TRACE_CHUNK_BYTES`) is summed
over blocks of traced output entries instead (`_by_traced_blocks`): Θ = Σ_B J1[B] J2[B]ᵀ, each block's
Jacobian (about `BLOCK_BYTES`) made and contracted in one loop step, so the contraction reads cached
memory instead of streaming the whole Jacobian twice (XLA:CPU's product of two (N, O·P) operands runs
at memory speed): the MLP 256-512-512-10, N=8, traced 10 logits, 94 -> 39 ms. It re-runs the forward
pass per block, so it is used only above that size, with `vmap_axes` (per-example Jacobians), and
for models without convolutions: in a loop's body XLA:CPU runs the per-example weight-gradient
convolutions at a fraction of their rate (the CNN of `benchmarks/run.py`, N=32, traced 10 logits:
125 ms whole, 1230 ms by entry).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex

from entk.algorithms._apply import (batch_axes_of_output, bind_input, output_shapes, param_bytes,
                                    param_count, per_example)
from entk.algorithms.axes import KernelAxes, LeafAxes, VmapAxes

PyTree = Any

TRACE_CHUNK_BYTES = 32 << 20
"""One side's Jacobian above this size, with traced axes and `vmap_axes`: contracted in blocks of
traced entries (see the module docstring)."""
BLOCK_BYTES = 8 << 20
"""The size of one block's Jacobian (one side) the blocks aim at: what stays in cache."""
MAX_UNROLLED_STEPS = 16
"""Blocks up to this many are unrolled (the cost model then counts each); more run in a loop."""


def jacobian(f: Callable[..., PyTree], x: PyTree, kwargs: dict, params: PyTree,
             vmap_axes: VmapAxes | None) -> PyTree:
    """∂f(params, x)/∂params as a pytree: output structure outside, params structure inside.

    Each leaf has shape `output_leaf.shape + param_leaf.shape`. With `vmap_axes` it is built one
    example at a time. Reverse mode is used when the (per-example) output is smaller than the parameter
    count, forward mode otherwise.
    """
    def jac_of(g: Callable[[PyTree], PyTree]) -> PyTree:
        return _jacobian_of(g, params)

    if vmap_axes is None:
        return jac_of(bind_input(f, x, kwargs))
    return per_example(f, x, kwargs, params, vmap_axes, jac_of)


def _jacobian_of(g: Callable[[PyTree], PyTree], params: PyTree) -> PyTree:
    """∂g/∂params, reverse mode when g's output is smaller than the parameter count."""
    out_size = sum(s.size for s in jax.tree_util.tree_leaves(jax.eval_shape(g, params)))
    transform = jax.jacrev if out_size <= param_count(params) else jax.jacfwd
    return transform(g)(params)


def asymptotic_flops(*, n1: int, n2: int, out_per_example: int, kept_per_pair: int, n_params: int,
                     forward_flops: float) -> float:
    """Novak et al. (2022): N·O·[FP] to build the Jacobians + N1·N2·O²·P to contract them (`O²` is
    `kept_per_pair`, the output entries each pair of examples keeps)."""
    return (n1 + n2) * out_per_example * forward_flops + n1 * n2 * kept_per_pair * n_params


def written_bytes_lower_bound(f: Callable[..., PyTree], x1: PyTree, x2: PyTree | None,
                              params: PyTree, kwargs1: dict, axes: KernelAxes,
                              vmap_axes: VmapAxes | None, fx1: PyTree, fx2: PyTree) -> int:
    """Bytes the lowered program writes at least, as XLA's cost analysis counts them: the Jacobians,
    which the method materialises, `N·O·P` entries per side (x1's, and x2's when given). With a loop
    over traced blocks (`_by_traced_blocks` beyond MAX_UNROLLED_STEPS steps), one step's share, as the
    analysis counts a loop's body once. `fx1`, `fx2`: `f`'s output shapes on x1 and x2."""
    sides = [fx1] if x2 is None else [fx1, fx2]
    entries = sum(math.prod(leaf.shape) for fx in sides for leaf in jax.tree_util.tree_leaves(fx))
    block = _traced_block(fx1, params, axes, vmap_axes, f, x1, kwargs1)
    if block is not None:
        (out,) = jax.tree_util.tree_leaves(fx1)
        steps = axes.for_leaf(len(out.shape)).trace_size(out.shape) // block
        if steps > MAX_UNROLLED_STEPS:
            entries //= steps
    return entries * param_bytes(params)


def empirical_ntk(f: Callable[..., PyTree], x1: PyTree, x2: PyTree | None, params: PyTree,
                  kwargs1: dict, kwargs2: dict, axes: KernelAxes,
                  vmap_axes: VmapAxes | None) -> PyTree:
    """The eNTK by Jacobian contraction (`KernelAlgorithm` contract, see `entk.algorithms`)."""
    fx1 = output_shapes(f, x1, kwargs1, params)
    fx2 = fx1 if x2 is None else output_shapes(f, x2, kwargs2, params)
    block = _traced_block(fx1, params, axes, vmap_axes, f, x1, kwargs1)
    if block is not None:
        return _by_traced_blocks(f, x1, x2, params, kwargs1, kwargs2, axes, vmap_axes, fx1, fx2,
                                 block)
    j1 = jacobian(f, x1, kwargs1, params, vmap_axes)
    j2 = j1 if x2 is None else jacobian(f, x2, kwargs2, params, vmap_axes)

    out_leaves1, treedef = jax.tree_util.tree_flatten(fx1)
    out_leaves2 = treedef.flatten_up_to(fx2)
    jac_leaves1 = treedef.flatten_up_to(j1)
    jac_leaves2 = treedef.flatten_up_to(j2)

    kernels = []
    for s1, s2, jac1, jac2 in zip(out_leaves1, out_leaves2, jac_leaves1, jac_leaves2):
        leaf_axes = axes.for_leaf(len(s1.shape))
        total = None
        for a, b in zip(jax.tree_util.tree_leaves(jac1), jax.tree_util.tree_leaves(jac2)):
            term = leaf_axes.contract(a, b, n_out=len(s1.shape))
            total = term if total is None else total + term
        if total is None:  # no parameters at all: the kernel is zero
            total = jax.numpy.zeros(leaf_axes.canonical_shape(s1.shape, s2.shape), s1.dtype)
        kernels.append(leaf_axes.finish(total, s1.shape))
    return treedef.unflatten(kernels)


def _traced_block(fx1: PyTree, params: PyTree, axes: KernelAxes, vmap_axes: VmapAxes | None,
                  f: Callable[..., PyTree], x1: PyTree, kwargs1: dict) -> int | None:
    """How many traced entries `_by_traced_blocks` takes per step, or None for the whole Jacobian.

    Blocks are used for one output leaf with per-example Jacobians over TRACE_CHUNK_BYTES, its batch
    axis before the traced axes, and no convolution in the model; a block's Jacobian is about
    BLOCK_BYTES (a divisor of the traced size, so the blocks tile it)."""
    leaves = jax.tree_util.tree_leaves(fx1)
    if vmap_axes is None or len(leaves) != 1:
        return None
    out = leaves[0]
    leaf_axes = axes.for_leaf(len(out.shape))
    traced = leaf_axes.trace_size(out.shape)
    if (not leaf_axes.trace or traced < 2
            or batch_axes_of_output(fx1, vmap_axes)[0] >= min(leaf_axes.trace)):
        return None
    itemsize = max(jnp.dtype(p.dtype).itemsize for p in jax.tree_util.tree_leaves(params))
    whole = math.prod(out.shape) * param_count(params) * itemsize
    if whole <= TRACE_CHUNK_BYTES:
        return None
    target = max(1, traced * BLOCK_BYTES // whole)
    block = max(d for d in range(1, min(target, traced) + 1) if traced % d == 0)
    if block == traced:
        return None
    jaxpr = jax.make_jaxpr(lambda p: f(p, x1, **kwargs1))(params).jaxpr
    return None if "conv_general_dilated" in _primitive_names(jaxpr) else block


def _primitive_names(jaxpr: Any) -> set[str]:
    """The primitives a jaxpr applies, its sub-jaxprs (calls, loops, custom rules) included."""
    names = {eqn.primitive.name for eqn in jaxpr.eqns}
    for sub in jex.subjaxprs(jaxpr):
        names |= _primitive_names(sub)
    return names


def _by_traced_blocks(f: Callable[..., PyTree], x1: PyTree, x2: PyTree | None, params: PyTree,
                      kwargs1: dict, kwargs2: dict, axes: KernelAxes, vmap_axes: VmapAxes,
                      fx1: PyTree, fx2: PyTree, block: int) -> PyTree:
    """The kernel of a single-leaf output as Σ over blocks B of traced entries of J1[B] J2[B]ᵀ.

    Each step takes the per-example output with its traced axes moved last and flattened, slices
    `block` entries of that axis, and contracts the block's Jacobians with the axes of that layout
    (the same diagonal and free axes in the same order, one traced axis last), so the sum is laid
    out as the whole Jacobian's contraction and `finish`es the same way."""
    (out1,), treedef = jax.tree_util.tree_flatten(fx1)
    (out2,) = treedef.flatten_up_to(fx2)
    leaf_axes: LeafAxes = axes.for_leaf(len(out1.shape))
    traced = [t - 1 for t in leaf_axes.trace]  # in one example's output: the batch axis is
    # before every traced one (`_traced_block` checks), so each moves down by one
    n_traced = leaf_axes.trace_size(out1.shape)
    ndim = len(out1.shape) - len(traced) + 1
    block_axes = LeafAxes(ndim, (ndim - 1,), tuple(
        d - sum(t < d for t in leaf_axes.trace) for d in leaf_axes.diagonal))

    def block_jacobian(x: PyTree, kwargs: dict, start: jax.Array) -> list[jax.Array]:
        def of_block(g: Callable[[PyTree], PyTree]) -> PyTree:
            def g_block(p: PyTree) -> PyTree:
                def take(y: jax.Array) -> jax.Array:
                    y = jnp.moveaxis(y, traced, range(y.ndim - len(traced), y.ndim))
                    y = y.reshape(y.shape[:y.ndim - len(traced)] + (n_traced,))
                    return lax.dynamic_slice_in_dim(y, start, block, axis=-1)

                return jax.tree_util.tree_map(take, g(p))

            return _jacobian_of(g_block, params)

        (jac,) = treedef.flatten_up_to(per_example(f, x, kwargs, params, vmap_axes, of_block))
        return jax.tree_util.tree_leaves(jac)

    def step(i: jax.Array, total: jax.Array) -> jax.Array:
        j1 = block_jacobian(x1, kwargs1, i * block)
        j2 = j1 if x2 is None else block_jacobian(x2, kwargs2, i * block)
        for a, b in zip(j1, j2):
            total = total + block_axes.contract(a, b, n_out=ndim).astype(total.dtype)
        return total

    zero = jnp.zeros(leaf_axes.canonical_shape(out1.shape, out2.shape), out1.dtype)
    steps = n_traced // block
    # Unrolled, XLA's cost analysis (and so "auto") sees every step; a loop's body counts once.
    total = lax.fori_loop(0, steps, step, zero, unroll=steps <= MAX_UNROLLED_STEPS)
    return treedef.unflatten([leaf_axes.finish(total, out1.shape)])
