"""A prepared, validated kernel call: what `entk.empirical` and the cost model hand a strategy.

`prepare(f, x1, x2, params, kwargs, axes, vmap)` checks everything a strategy may take for granted, once
per call, and returns a `PreparedCall`:

- `params` are floating-point arrays (anything else cannot be differentiated);
- `x2` is `None` when it is `x1` (strategies then reuse the work of one side), else it has `x1`'s
  structure and shapes except along the batch axis;
- keyword arguments are split into those for `f(x1)` and for `f(x2)` (`_apply.split_kwargs`: shared or
  folded `rng`, 2-tuples);
- every output leaf admits the requested trace / diagonal axes, with equal sizes on both sides
  (`f` is traced for its output shapes, nothing is computed);
- `vmap_axes` is verified: `"auto"` resolved to a `VmapAxes` or `None` by the batch-independence
  analysis, an explicit one refused if `f` couples examples (`entk.algorithms.batch_independence`).

`call.run(strategy)` then runs any registered strategy on it; `entk.algorithms.cost` lowers strategies
from the same object, so validation never runs once per candidate.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from entk import algorithms
from entk.algorithms import Strategy
from entk.algorithms._apply import output_shapes, split_kwargs
from entk.algorithms.axes import KernelAxes, VmapAxes

PyTree = Any

AUTO = "auto"  # `vmap_axes="auto"`: resolved per shapes by `batch_independence.auto_vmap_axes`


def is_auto(vmap_axes: Any) -> bool:
    """Whether `vmap_axes` asks for the batch axis to be found by analysis (`"auto"`, any case)."""
    return isinstance(vmap_axes, str) and vmap_axes.strip().lower() == AUTO


def kernel_settings(trace_axes: Any = (-1,), diagonal_axes: Any = (),
                    vmap_axes: Any = None) -> tuple[KernelAxes, VmapAxes | str | None]:
    """The user's `trace_axes`, `diagonal_axes`, `vmap_axes` as `(KernelAxes, VmapAxes | "auto" | None)`."""
    axes = KernelAxes.create(trace_axes, diagonal_axes)
    return axes, AUTO if is_auto(vmap_axes) else VmapAxes.create(vmap_axes)


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedCall:
    """One validated kernel call `Θ(x1, x2)` of `f(params, x, **kw)`.

    Attributes:
      f: the model, `f(params, x, **kw) -> output pytree`.
      x1, x2: the inputs; `x2` is `None` when it is `x1`.
      params: the parameter pytree (floating-point leaves).
      kwargs1, kwargs2: keyword arguments for `f(x1)` and `f(x2)` (the same dict when `x2` is `None`).
      axes: the requested trace / diagonal axes.
      vmap: the verified `VmapAxes` (`"auto"` resolved), or `None`: the whole batch at once.
      out1, out2: `f`'s output shapes for `x1` and `x2` (`jax.ShapeDtypeStruct` pytrees; `out2 is
        out1` when `x2` is `None`), e.g. for the cost model's output-size terms.
    """

    f: Callable[..., PyTree]
    x1: PyTree
    x2: PyTree | None
    params: PyTree
    kwargs1: dict
    kwargs2: dict
    axes: KernelAxes
    vmap: VmapAxes | None
    out1: PyTree = None
    out2: PyTree = None

    def run(self, strategy: Strategy | str | int) -> PyTree:
        """The kernel by a concrete strategy (`algorithms.get`), each leaf in the output layout."""
        return algorithms.get(strategy)(self.f, self.x1, self.x2, self.params, self.kwargs1,
                                        self.kwargs2, self.axes, self.vmap)


def prepare(f: Callable[..., PyTree], x1: PyTree, x2: PyTree | None, params: PyTree, kwargs: dict,
            axes: KernelAxes, vmap: VmapAxes | str | None) -> PreparedCall:
    """Validates one kernel call and returns it prepared (see the module docstring for the checks)."""
    _check_params(params)
    if x2 is x1:
        x2 = None
    in_axes = (vmap.input_axes(x1) if isinstance(vmap, VmapAxes)
               else jax.tree_util.tree_map(lambda _: 0, x1))
    if x2 is not None:
        _check_inputs(x1, x2, in_axes)
    kwargs1, kwargs2 = split_kwargs(kwargs, x1, x2)
    if x2 is None:
        kwargs2 = kwargs1
    out1 = output_shapes(f, x1, kwargs1, params)
    out2 = out1 if x2 is None else output_shapes(f, x2, kwargs2, params)
    _check_outputs(out1, out2, axes)
    if is_auto(vmap):
        from entk.algorithms.batch_independence import auto_vmap_axes

        vmap = auto_vmap_axes(f, x1, x2, params, kwargs1, kwargs2)
    elif vmap is not None:
        _check_batch_independent(f, x1, params, kwargs1, vmap)
        if x2 is not None:
            _check_batch_independent(f, x2, params, kwargs2, vmap)
    return PreparedCall(f, x1, x2, params, kwargs1, kwargs2, axes, vmap, out1, out2)


def _path(keypath) -> str:
    return jax.tree_util.keystr(keypath) or "(root)"


def _check_params(params: PyTree) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for path, leaf in leaves:
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise TypeError(f"params{_path(path)} is a {type(leaf).__name__} ({leaf!r}), not an array; "
                            f"parameters must be floating-point arrays (wrap it in jnp.asarray(..., "
                            f"dtype=jnp.float32) or move it out of params).")
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise TypeError(f"params{_path(path)} has dtype {leaf.dtype}; only floating-point "
                            f"parameters can be differentiated. Move integer leaves (indices, "
                            f"step counters) out of params, e.g. into the model's state or kwargs.")


def _check_inputs(x1: PyTree, x2: PyTree, in_axes: PyTree) -> None:
    s1, s2 = jax.tree_util.tree_structure(x1), jax.tree_util.tree_structure(x2)
    if s1 != s2:
        raise ValueError(f"x1 and x2 must have the same structure, got {s1} and {s2}.")
    for (path, a), b, axis in zip(jax.tree_util.tree_leaves_with_path(x1),
                                  jax.tree_util.tree_leaves(x2), jax.tree_util.tree_leaves(in_axes)):
        sa, sb = list(jnp.shape(a)), list(jnp.shape(b))
        if len(sa) != len(sb) or (sa[:axis] + sa[axis + 1:]) != (sb[:axis] + sb[axis + 1:]):
            raise ValueError(f"x1{_path(path) if path else ''} has shape {tuple(sa)} and x2 has "
                             f"{tuple(sb)}: they may differ only in the batch axis {axis}.")


def _check_outputs(out1: PyTree, out2: PyTree, axes: KernelAxes) -> None:
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(out1), jax.tree_util.tree_leaves(out2)):
        where = f"the output{_path(path) if path else ''} of shape {a.shape}"
        leaf_axes = axes.for_leaf(len(a.shape), where)
        for name, group in (("trace_axes", leaf_axes.trace), ("diagonal_axes", leaf_axes.diagonal)):
            for axis in group:
                if a.shape[axis] != b.shape[axis]:
                    raise ValueError(
                        f"{name} includes axis {axis} of {where}, which has size {a.shape[axis]} for "
                        f"x1 but {b.shape[axis]} for x2; a {name[:-5]} axis pairs entries with equal "
                        f"index, so both sizes must agree (e.g. use the same batch size for x1 and x2 "
                        f"or drop axis {axis} from {name}).")


def _check_batch_independent(f, x, params, kwargs, vmap: VmapAxes) -> None:
    """Refuses `vmap_axes` for a model whose outputs mix examples, eagerly and under tracing alike.

    A structural proof over `f`'s jaxpr, plus a numerical probe (whole batch vs one example at a
    time) when values are concrete; both cached per function and shapes. See
    `entk.algorithms.batch_independence`.
    """
    from entk.algorithms import batch_independence

    batch_independence.check(f, x, params, kwargs, vmap)
