"""Does `f(params, x)` treat the examples of a batch independently? Proved on the jaxpr, checked on values.

`vmap_axes` lets a strategy compute one example at a time, which is only right if every example's output
depends on that example alone. This module decides that, in two lines of defence:

1. `analyse`: a structural proof over the jaxpr of `f` (traced on `jax.ShapeDtypeStruct`s, so it works on
   tracers and under `jax.jit`). Every variable gets an abstract value `Axis`: which of its dimensions
   holds the batch (`batch`), or none. Rules, one per primitive and registered beside their code, carry
   it through each equation: an elementwise op keeps it, a transpose moves it, a reduction over another
   axis drops a dimension before it, and so on. An equation that reduces, slices, shifts, sorts, scans
   or gathers ACROSS the batch axis couples examples. So does combining a batched value with an
   unbatched one that varies along the batch-aligned dimension (an undeclared per-example keyword
   argument, `jnp.arange(N)`, random numbers drawn with one key for the whole batch): the result then
   depends on where an example sits in the batch. A primitive without a rule (e.g. a call back into
   another framework) ends the proof: independence cannot be shown. The interpreter is
   `entk.algorithms.batch_axis`; the rules are in `entk.algorithms.batch_axis_rules`.
2. `probe`: when values are concrete, `f` on the whole batch is compared with `f` on each example alone
   (one `jax.vmap` over size-1 slices). This catches what no structure shows (a constant computed from
   `x.shape[0]`) and decides for primitives the proof cannot see into.

`check` (explicit `vmap_axes`: refuse with an error naming the operation and the user's source line)
and `auto_vmap_axes` (`vmap_axes="auto"`: per-example where proven, else the whole batch) build on them.
Both are cached per function, shapes and settings, so the work is done once, never in a timed loop.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from typing import Any, Callable

import jax
import numpy as np

from entk.algorithms import batch_axis_rules  # noqa: F401  (registers the rules)
from entk.algorithms._apply import is_concrete, per_example
from entk.algorithms.axes import VmapAxes
from entk.algorithms.batch_axis import (Axis, Context, Found, Origin, captured, run_jaxpr, shape_of,
                                       unbatched)

PyTree = Any

COUPLING_HINT = ("(BatchNorm in training mode, normalisation, attention or mixing across the batch "
                 "couple examples.)")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The analysis of `f` for one set of shapes.

    `independent`: proven to treat examples independently; then `out_axes[i]` is the frozenset of axes
    of output leaf `i` (in `tree_leaves` order) that can serve as its batch axis: one axis for a leaf
    computed from the batch, the constant axes of batch size for a leaf that ignores it. Otherwise
    `reason` says why, naming the primitive and the user's source line; `opaque` is True when a
    primitive without a rule stopped the proof (no coupling was found, but none could be excluded).
    """

    independent: bool
    out_axes: tuple = ()
    reason: str = ""
    opaque: bool = False


# ----------------------------------------------------------------------------------------------
# The analysis of a model


class UnverifiedVmapAxesWarning(UserWarning):
    """`vmap_axes` could be neither proven nor probed (an opaque primitive, under tracing)."""


_CACHE: "collections.OrderedDict[Any, tuple[Any, Any]]" = collections.OrderedDict()
_CACHE_MAX = 64  # entries hold their function (and what it closes over)


def _cached(key: Any, f: Any, compute: Callable[[], Any]) -> Any:
    entry = _CACHE.get(key)
    if entry is not None and entry[0] is f:
        return entry[1]
    value = compute()
    _CACHE[key] = (f, value)  # holding f keeps its id from being reused while cached
    while len(_CACHE) > _CACHE_MAX:
        _CACHE.popitem(last=False)
    return value


def _is_array(leaf: Any) -> bool:
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def _aval(leaf: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(np.shape(leaf)), leaf.dtype)


def _signature(tree: PyTree) -> str:
    """Shapes and dtypes of array leaves, values of the others (static arguments change the jaxpr)."""
    return str(jax.tree_util.tree_map(
        lambda l: (tuple(np.shape(l)), str(l.dtype)) if _is_array(l) else repr(l), tree))


def batch_size(x: PyTree, in_axes: PyTree) -> int:
    """The size of the batch axis, the same for every input leaf (else a ValueError naming them)."""
    sizes = {}
    for (path, leaf), axis in zip(jax.tree_util.tree_leaves_with_path(x),
                                  jax.tree_util.tree_leaves(in_axes)):
        sizes[jax.tree_util.keystr(path) or "x"] = np.shape(leaf)[axis]
    if len(set(sizes.values())) > 1:
        raise ValueError(f"vmap_axes: the inputs disagree on the batch size ({sizes}); every input "
                         f"leaf must have the same number of examples on its batch axis.")
    return next(iter(sizes.values()), 1)


def describe(in_axes: Any, out_axes: Any, kwargs_axes: dict) -> str:
    return f"({in_axes!r}, {out_axes!r}, {kwargs_axes!r})"


def analyse(f: Callable[..., PyTree], x: PyTree, params: PyTree, kwargs: dict, in_axes: PyTree,
            kw_axes: dict, suggest: Callable[[str, int], str]) -> Verdict:
    """Proves (or refutes) that `f` treats the examples of `x` independently; cached per shapes.

    Args:
      in_axes: batch axis of every leaf of `x` (non-negative, matching `x`).
      kw_axes: batch axis pytree of every keyword argument, None for shared ones.
      suggest: `(kwarg name, axis) -> vmap_axes` text that would declare that keyword argument.

    Returns:
      A `Verdict`; `out_axes[i]` is the set of axes of output leaf `i` that can serve as its batch axis
      (one when the leaf is batched; the constant axes of batch size when it ignores the batch).
    """
    key = ("analyse", id(f), _signature((params, x, kwargs)), repr(in_axes), repr(kw_axes))
    return _cached(key, f, lambda: _analyse(f, x, params, kwargs, in_axes, kw_axes, suggest))


def _analyse(f, x, params, kwargs, in_axes, kw_axes, suggest) -> Verdict:
    n = batch_size(x, in_axes)
    infos: list[Axis] = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        infos.append(unbatched(origin=Origin(f"the parameter params{jax.tree_util.keystr(path)}",
                                             "use vmap_axes=None")))
    infos += [Axis(a) for a in jax.tree_util.tree_leaves(in_axes)]
    for name in sorted(kwargs):  # the order in which jax flattens a dict
        leaves = [l for l in jax.tree_util.tree_leaves(kwargs[name]) if _is_array(l)]
        if kw_axes.get(name) is not None:
            infos += [Axis(a) for a in jax.tree_util.tree_leaves(kw_axes[name])]
            continue
        for leaf in leaves:
            axis = next((d for d, s in enumerate(np.shape(leaf)) if s == n), 0)
            infos.append(unbatched(origin=Origin(
                f"keyword argument {name!r} (shape {tuple(np.shape(leaf))})",
                f"if it holds one entry per example, declare it: vmap_axes={suggest(name, axis)}")))

    leaves, treedef = jax.tree_util.tree_flatten((params, x, kwargs))
    arrays = [l for l in leaves if _is_array(l)]
    out_tree = []

    def g(*flat: Any) -> list:
        it = iter(flat)
        p, xx, kw = treedef.unflatten([next(it) if _is_array(l) else l for l in leaves])
        out_leaves, tree = jax.tree_util.tree_flatten(f(p, xx, **kw))
        out_tree.append(tree)
        return out_leaves

    closed = jax.make_jaxpr(g)(*[_aval(l) for l in arrays])
    out_shapes = [tuple(v.aval.shape) for v in closed.jaxpr.outvars]
    if n <= 1:  # one example: the whole batch is that example
        return Verdict(True, tuple(frozenset(d for d, s in enumerate(s_) if s == 1)
                                   for s_ in out_shapes))
    try:
        ctx = Context(n)
        consts = [captured(ctx, v, shape_of(var))
                  for v, var in zip(closed.consts, closed.jaxpr.constvars)]
        outs = run_jaxpr(ctx, closed.jaxpr, consts, infos)
    except Found as found:
        return Verdict(False, reason=found.message, opaque=found.opaque)
    out_axes = []
    for i, (info, shape) in enumerate(zip(outs, out_shapes)):
        where = _leaf_name(out_tree[0], i)
        if info.batch is not None and info.inner != 1:
            return Verdict(False, reason=f"the output{where} of shape {shape} holds the batch merged "
                                         f"with other dimensions on axis {info.batch}")
        if info.batch is not None:
            out_axes.append(frozenset({info.batch}))
            continue
        candidates = frozenset(d for d in info.const if shape[d] == n)
        if not candidates:
            origin = f" (it depends on {info.origin.what})" if info.origin else ""
            return Verdict(False, reason=f"the output{where} of shape {shape} does not carry the "
                                         f"batch on any axis{origin}")
        out_axes.append(candidates)
    return Verdict(True, tuple(out_axes))


def _leaf_name(treedef: Any, i: int) -> str:
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_leaves_with_path(treedef.unflatten(range(treedef.num_leaves)))]
    return paths[i] if i < len(paths) else ""


# ----------------------------------------------------------------------------------------------
# The numerical probe


def probe(f: Callable[..., PyTree], x: PyTree, params: PyTree, kwargs: dict,
          vmap: VmapAxes) -> str | None:
    """Compares `f` on the whole batch with `f` on each example alone; None if they agree.

    Needs concrete values (two forward passes: one batched, one `jax.vmap` over size-1 slices).
    Returns a description of the first disagreement otherwise.
    """
    whole = f(params, x, **kwargs)
    try:
        alone = per_example(f, x, kwargs, params, vmap, lambda g: g(params))
    except Exception as e:  # noqa: BLE001 - the model may not run on one example; say so
        return f"f fails on one example at a time ({type(e).__name__}: {e})"
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(whole), jax.tree_util.tree_leaves(alone)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return f"the output{jax.tree_util.keystr(path)} has shape {b.shape} per example but " \
                   f"{a.shape} for the batch"
        if not np.issubdtype(a.dtype, np.inexact):
            if not np.array_equal(a, b):
                return f"the output{jax.tree_util.keystr(path)} differs"
            continue
        scale = max(float(np.max(np.abs(a))), 1e-30) if a.size else 1.0
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        tolerance = 1e-9 if a.dtype == np.float64 else 1e-4 if a.dtype == np.float32 else 1e-2
        if not diff <= tolerance * scale:
            return (f"computing the output{jax.tree_util.keystr(path)} one example at a time "
                    f"differs from computing it on the whole batch (max change {diff:.3g}, "
                    f"relative {diff / scale:.3g})")
    return None


# ----------------------------------------------------------------------------------------------
# Entry points: explicit vmap_axes, and "auto"


def check(f: Callable[..., PyTree], x: PyTree, params: PyTree, kwargs: dict, vmap: VmapAxes) -> None:
    """Refuses `vmap_axes` unless `f` treats examples independently (proven, or probed when opaque).

    Raises ValueError naming the coupling operation and the user's source line, and saying what to do.
    Under tracing, a model the proof cannot see into (e.g. a call back into PyTorch) is accepted with
    an `UnverifiedVmapAxesWarning`, once; run the kernel function once outside `jax.jit` to probe it.
    """
    in_axes = vmap.input_axes(x)
    kw_axes = vmap.kwarg_axes(kwargs)
    text = describe(vmap.in_axes, vmap.out_axes, vmap.kwargs_axes)
    n = batch_size(x, in_axes)

    def suggest(name: str, axis: int) -> str:
        return describe(vmap.in_axes, vmap.out_axes, {**vmap.kwargs_axes, name: axis})

    fx = jax.eval_shape(lambda p: f(p, x, **kwargs), params)
    out_axes = vmap.output_axes(fx)
    for (path, leaf), axis in zip(jax.tree_util.tree_leaves_with_path(fx),
                                  jax.tree_util.tree_leaves(out_axes)):
        if leaf.shape[axis] != n:
            raise ValueError(f"vmap_axes={text}: the output{jax.tree_util.keystr(path)} has size "
                             f"{leaf.shape[axis]} on its batch axis {axis}, but the input batch has "
                             f"{n} examples. Give the right output axis in vmap_axes.")
    verdict = analyse(f, x, params, kwargs, in_axes, kw_axes, suggest)
    if not verdict.independent and not verdict.opaque:
        raise ValueError(f"vmap_axes={text} says f treats examples independently, but f couples "
                         f"examples along the batch here: {verdict.reason}. {COUPLING_HINT} Use "
                         f"vmap_axes=None (the whole batch at once) or vmap_axes='auto' (entk "
                         f"decides).")
    if verdict.independent:
        for (path, _), axis, allowed in zip(jax.tree_util.tree_leaves_with_path(fx),
                                            jax.tree_util.tree_leaves(out_axes), verdict.out_axes):
            if axis not in allowed:
                raise ValueError(f"vmap_axes={text}: the output{jax.tree_util.keystr(path)} carries "
                                 f"the batch on axis {min(allowed)}, not on axis {axis}. Give the "
                                 f"right output axis in vmap_axes.")
    if not is_concrete((x, params, kwargs)):
        if verdict.opaque:
            _cached(("warned", id(f), _signature((params, x, kwargs)), text), f, lambda: warnings.warn(
                f"vmap_axes={text} cannot be verified under tracing: {verdict.reason}. Call the "
                f"kernel function once outside jax.jit to check it numerically, or use "
                f"vmap_axes=None.", UnverifiedVmapAxesWarning, stacklevel=4))
        return
    failure = _cached(("probe", id(f), _signature((params, x, kwargs)), text), f,
                      lambda: probe(f, x, params, kwargs, vmap))
    if failure is not None:
        why = f" ({verdict.reason})" if verdict.opaque else ""
        raise ValueError(f"vmap_axes={text} says f treats examples independently, but {failure}: "
                         f"f couples examples along the batch{why}. {COUPLING_HINT} Use "
                         f"vmap_axes=None (the whole batch at once) or vmap_axes='auto' (entk "
                         f"decides).")


def auto_vmap_axes(f: Callable[..., PyTree], x1: PyTree, x2: PyTree | None, params: PyTree,
                   kwargs1: dict, kwargs2: dict) -> VmapAxes | None:
    """`vmap_axes="auto"`: batch axis 0 on inputs where `f` is proven per-example, else None.

    Proven means: the structural analysis shows independence for `x1` (and `x2`), and, when values
    are concrete, the numerical probe agrees. Keyword arguments are treated as shared. Cached per
    function and shapes, so the decision is made once, outside any timed loop.
    """
    sides = [(x1, kwargs1)] + ([] if x2 is None else [(x2, kwargs2)])
    if any(any(np.ndim(l) == 0 for l in jax.tree_util.tree_leaves(x)) for x, _ in sides):
        return None
    allowed = None
    for x, kwargs in sides:
        in_axes = jax.tree_util.tree_map(lambda _: 0, x)
        if len({np.shape(l)[0] for l in jax.tree_util.tree_leaves(x)}) > 1:
            return None  # input leaves disagree on axis 0: it is not a batch axis
        verdict = analyse(f, x, params, kwargs, in_axes, {k: None for k in kwargs},
                          lambda name, axis: describe(0, 0, {name: axis}))
        if not verdict.independent:
            return None
        allowed = verdict.out_axes if allowed is None else tuple(
            a & b for a, b in zip(allowed, verdict.out_axes))
    if not allowed or any(not a for a in allowed):
        return None
    fx = jax.eval_shape(lambda p: f(p, x1, **kwargs1), params)
    axes = [min(a) for a in allowed]
    out_axes = axes[0] if len(set(axes)) == 1 else jax.tree_util.tree_structure(fx).unflatten(axes)
    vmap = VmapAxes(0, out_axes, {})
    for x, kwargs in sides:
        if is_concrete((x, params, kwargs)) and batch_size(x, jax.tree_util.tree_map(lambda _: 0, x)) > 1:
            key = ("probe", id(f), _signature((params, x, kwargs)), describe(0, out_axes, {}))
            if _cached(key, f, lambda: probe(f, x, params, kwargs, vmap)) is not None:
                return None
    return vmap
