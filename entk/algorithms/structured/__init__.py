"""Structured derivatives (SD): the empirical NTK from the structure of each parameter's use.

Novak et al. (2022), "Fast Finite Width Neural Tangent Kernel": for a dense layer `y = x·W` the parameter
Jacobian is `(∂f/∂y) ⊗ x`, so its share of Θ is the product of two small Gram matrices,
`(∂f/∂y₁ ∂f/∂y₂ᵀ) ⊙ (x₁ x₂ᵀ)`, never the Jacobian itself. This package does that for any JAX function:

1. `graph`: trace `f` to a flat jaxpr with the parameters as inputs (calls inlined, scans unrolled where
   parameters flow through them);
2. `views`: find every equation that consumes a parameter, directly or through reshapes, transposes,
   broadcasts, slices, ... (tracked as integer index maps);
3. `cotangents`: obtain `∂f/∂y` at each such equation's output in one sweep, and the factors each
   per-primitive rule (`rules/`) needs;
4. `contract`: sum, over pairs of uses sharing parameter entries, one einsum per pair whose contraction
   order is chosen by FLOP count.

Primitives without a rule fall back to their explicit Jacobian for that equation only, with one warning
naming the primitive. With `vmap_axes`, everything is computed per example and is much cheaper.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable

import jax
import jax.numpy as jnp

from entk.algorithms.axes import KernelAxes, VmapAxes
# Novak et al. (2022) bound SD's cost by JC's: the cost model uses the same asymptotic FLOP count.
from entk.algorithms.jacobian_contraction import asymptotic_flops

from .contract import build_groups, leaf_kernel
from .cotangents import plan_uses, side_tensors
from .graph import SCAN_UNROLL_LIMIT, build_side, is_array
from .views import analyze, is_float

PyTree = Any


class NoStructureRuleWarning(UserWarning):
    """A primitive consuming a parameter has no structured-derivative rule; its Jacobian is formed."""


def _prepare_side(f, x, kwargs, params, vmap_axes, fallbacks: dict):
    side = build_side(f, x, kwargs, params, vmap_axes)
    analysis = analyze(side.jaxpr, side.n_params)
    planned, missing = plan_uses(side, analysis)
    for name, where in missing.items():
        fallbacks.setdefault(name, where)
    tensors = side_tensors(side, analysis, planned, jax.tree_util.tree_leaves(params))
    return side, build_groups(planned, tensors)


def empirical_ntk(f: Callable[..., PyTree], x1: PyTree, x2: PyTree | None, params: PyTree,
                  kwargs1: dict, kwargs2: dict, axes: KernelAxes,
                  vmap_axes: VmapAxes | None) -> PyTree:
    """The eNTK by structured derivatives (`KernelAlgorithm` contract, see `entk.algorithms`).

    Returns a pytree like `f`'s output; each leaf in neural-tangents' layout (`KernelAxes.output_shape`).
    The computation is staged as one `jax.jit` program (inlined when already under `jit`), cached per
    `f`, axes and static arguments, so eager callers compile once per input shape instead of
    dispatching hundreds of small operations on every call.
    """
    leaves, treedef = jax.tree_util.tree_flatten((x1, x2, params, kwargs1, kwargs2))
    mask = tuple(is_array(leaf) for leaf in leaves)
    statics = tuple(leaf for leaf, dynamic in zip(leaves, mask) if not dynamic)
    fn = _jitted(f, treedef, mask, statics, axes, vmap_axes)
    return fn([leaf for leaf, dynamic in zip(leaves, mask) if dynamic])


_JITTED: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()


def _jitted(f: Callable, treedef: Any, mask: tuple, statics: tuple, axes: KernelAxes,
            vmap_axes: VmapAxes | None) -> Callable:
    """`jax.jit` of the whole computation for these static arguments, reused across calls."""
    key: Any = (treedef, mask, statics, axes, repr(vmap_axes))
    try:
        hash(key)
        per_f = _JITTED.setdefault(f, {})
    except TypeError:  # unhashable static arguments, or an f that cannot be weakly referenced
        key, per_f = None, {}
    if key in per_f:
        return per_f[key]
    f_ref = weakref.ref(f) if key is not None else (lambda: f)

    def run(dynamic: list) -> PyTree:
        dyn, stat = iter(dynamic), iter(statics)
        full = [next(dyn) if d else next(stat) for d in mask]
        return _empirical_ntk(f_ref(), *treedef.unflatten(full), axes, vmap_axes)

    fn = jax.jit(run)
    if key is not None:
        per_f[key] = fn
    return fn


def _empirical_ntk(f: Callable[..., PyTree], x1: PyTree, x2: PyTree | None, params: PyTree,
                   kwargs1: dict, kwargs2: dict, axes: KernelAxes,
                   vmap_axes: VmapAxes | None) -> PyTree:
    fallbacks: dict = {}
    side1, groups1 = _prepare_side(f, x1, kwargs1, params, vmap_axes, fallbacks)
    if x2 is None:
        side2, groups2 = side1, groups1
    else:
        side2, groups2 = _prepare_side(f, x2, kwargs2, params, vmap_axes, fallbacks)
    for name, where in fallbacks.items():
        warnings.warn(
            f"Structured derivatives have no rule for primitive '{name}' ({where}); its Jacobian is "
            f"formed explicitly for that equation (correct, but as costly as Jacobian contraction "
            f"for the parameters it consumes).", NoStructureRuleWarning, stacklevel=3)

    kernels = []
    for leaf, (s1, s2) in enumerate(zip(side1.out_shapes, side2.out_shapes)):
        leaf_axes = axes.for_leaf(len(s1), where=f"output leaf {leaf} of shape {s1}")
        dtype = side1.out_dtypes[leaf] if is_float(side1.out_dtypes[leaf]) else jnp.float32
        summed = leaf_kernel(side1, groups1, side2, groups2, leaf, leaf_axes, dtype)
        kernels.append(leaf_axes.finish(summed, s1, dtype))
    return side1.out_tree.unflatten(kernels)


__all__ = ["empirical_ntk", "asymptotic_flops", "NoStructureRuleWarning", "SCAN_UNROLL_LIMIT"]
