"""Jacobian contraction (JC): Θ = Σ_leaves J1 J2ᵀ from explicitly materialised Jacobians.

Cost (Novak et al. 2022): N·O·[FP] to build the Jacobians plus N1·N2·O²·P to contract them (traced axes
fold into the contraction, so a traced kernel costs N1·N2·O·P). Each parameter leaf is contracted with
its own `lax.dot_general` (diagonal axes as batch dimensions, traced axes and the leaf's dimensions as
contracting ones) as soon as XLA has produced it, so the full Jacobian is never concatenated.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from entk.algorithms._apply import bind_input, output_shapes, param_count, per_example
from entk.algorithms.axes import KernelAxes, VmapAxes

PyTree = Any


def jacobian(f: Callable[..., PyTree], x: PyTree, kwargs: dict, params: PyTree,
             vmap_axes: VmapAxes | None) -> PyTree:
    """∂f(params, x)/∂params as a pytree: output structure outside, params structure inside.

    Each leaf has shape `output_leaf.shape + param_leaf.shape`. With `vmap_axes` it is built one
    example at a time. Reverse mode is used when the (per-example) output is smaller than the parameter
    count, forward mode otherwise.
    """
    n_params = param_count(params)

    def jac_of(g: Callable[[PyTree], PyTree]) -> PyTree:
        out_size = sum(s.size for s in jax.tree_util.tree_leaves(jax.eval_shape(g, params)))
        transform = jax.jacrev if out_size <= n_params else jax.jacfwd
        return transform(g)(params)

    if vmap_axes is None:
        return jac_of(bind_input(f, x, kwargs))
    return per_example(f, x, kwargs, params, vmap_axes, jac_of)


def asymptotic_flops(*, n1: int, n2: int, out_per_example: int, kept_per_pair: int, n_params: int,
                     forward_flops: float) -> float:
    """Novak et al. (2022): N·O·[FP] to build the Jacobians + N1·N2·O²·P to contract them (`O²` is
    `kept_per_pair`, the output entries each pair of examples keeps)."""
    return (n1 + n2) * out_per_example * forward_flops + n1 * n2 * kept_per_pair * n_params


def empirical_ntk(f: Callable[..., PyTree], x1: PyTree, x2: PyTree | None, params: PyTree,
                  kwargs1: dict, kwargs2: dict, axes: KernelAxes,
                  vmap_axes: VmapAxes | None) -> PyTree:
    """The eNTK by Jacobian contraction (`KernelAlgorithm` contract, see `entk.algorithms`)."""
    fx1 = output_shapes(f, x1, kwargs1, params)
    fx2 = fx1 if x2 is None else output_shapes(f, x2, kwargs2, params)
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
