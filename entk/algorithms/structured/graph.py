"""The model as one flat jaxpr with the parameters as explicit inputs.

Structured derivatives reason about individual equations of `f`, so `f` is traced to a jaxpr whose first
inputs are the parameter leaves, followed by the array leaves of `x` and of the keyword arguments (static
keyword values, such as a `train=False` flag, are closed over). Then call-like equations through which a
parameter flows are inlined (`jit`, `closed_call`, `remat`), a `scan`
that consumes a parameter is unrolled (up to `SCAN_UNROLL_LIMIT` iterations), a `cond` whose branch index
is known at trace time is replaced by its branch, and small integer computations on constants (loop
counters, index arithmetic) are folded, so that a `dynamic_slice` of a parameter at a known position is
recognised as a static view. `custom_jvp` / `custom_vjp` functions are never inlined: their custom rule
is the derivative (a straight-through estimator's is not that of its primal, and torch's custom autograd
Functions arrive as `custom_jvp`), so one that receives a parameter is differentiated as one equation by
its own rule (`rules.base.CUSTOM_RULE`), and elsewhere the rule shapes the cotangents.

With `vmap_axes`, the jaxpr is that of one example (batch axis of size one inside the model, removed from
the outputs); callers `jax.vmap` over the examples.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex

from entk.algorithms.axes import VmapAxes

from .views import INDEX_FNS, VIEW_PRIMITIVES, is_float

PyTree = Any

SCAN_UNROLL_LIMIT = 64
"""Longest `scan` (in iterations) that is unrolled when a parameter flows into it; longer scans are
treated as one equation with the generic Jacobian (correct, slower)."""

_FOLD_MAX_SIZE = 4096

# Call-like primitives: name -> (param holding the body, whether the body is a ClosedJaxpr).
_CALLS = {
    "jit": ("jaxpr", True), "pjit": ("jaxpr", True), "closed_call": ("call_jaxpr", True),
    "core_call": ("call_jaxpr", False), "call": ("call_jaxpr", False),
    "remat2": ("jaxpr", False), "checkpoint": ("jaxpr", False),
}


def is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, jax.core.Tracer))


@dataclasses.dataclass
class Side:
    """One side (x1 or x2) of the kernel, as a flat jaxpr and the arrays it is applied to.

    Attributes:
      jaxpr: flat `ClosedJaxpr` of `(*param_leaves, *args) -> output leaves` (one example with vmap).
      n_params: number of parameter leaves (the first inputs of `jaxpr`).
      args: the array arguments (whole batches).
      arg_axes: batch axis of each arg (None: shared by all examples); all None without vmap.
      out_shapes: full (batched) shape of each output leaf; out_dtypes likewise.
      out_batch_axes: batch axis of each output leaf with vmap, else None.
      out_tree: treedef of `f`'s output.
    """

    jaxpr: jex.ClosedJaxpr
    n_params: int
    args: list
    arg_axes: list
    out_shapes: list
    out_dtypes: list
    out_batch_axes: list | None
    out_tree: Any

    @property
    def vmapped(self) -> bool:
        return self.out_batch_axes is not None


def _split_arrays(tree: PyTree) -> tuple[list, Any, list[bool]]:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return leaves, treedef, [is_array(l) for l in leaves]


def build_side(f: Callable[..., PyTree], x: PyTree, kwargs: dict, params: PyTree,
               vmap_axes: VmapAxes | None,
               unroll_limit: int = SCAN_UNROLL_LIMIT) -> Side:
    """Traces `f` on `(x, kwargs)` into a flat jaxpr with the parameter leaves as leading inputs."""
    param_leaves, param_tree = jax.tree_util.tree_flatten(params)
    n_params = len(param_leaves)
    leaves, treedef, is_arr = _split_arrays((x, kwargs))
    if vmap_axes is None:
        axes: list = [None] * len(leaves)
    else:
        x_axes = jax.tree_util.tree_leaves(vmap_axes.input_axes(x))
        kw_axes = vmap_axes.kwarg_axes(kwargs)
        axes = list(x_axes)
        for key in sorted(kwargs):
            n = len(jax.tree_util.tree_leaves(kwargs[key]))
            axes += (jax.tree_util.tree_leaves(kw_axes[key]) if kw_axes[key] is not None
                     else [None] * n)
        if len(axes) != len(leaves):
            raise ValueError("vmap_axes does not match the structure of x and the keyword arguments.")
    args = [l for l, a in zip(leaves, is_arr) if a]
    arg_axes = [ax for ax, a in zip(axes, is_arr) if a]
    for leaf, ax, a in zip(leaves, axes, is_arr):
        if ax is not None and not a:
            raise TypeError(f"vmap_axes maps over a non-array input leaf {leaf!r}; only arrays can "
                            f"carry a batch axis.")
    batch = [np.shape(a)[ax] for a, ax in zip(args, arg_axes) if ax is not None]
    if vmap_axes is not None and not batch:  # nothing mapped: fall back to the full problem
        return build_side(f, x, kwargs, params, None, unroll_limit)

    out: dict = {}  # f's output structure and batch axes, found while tracing (no separate trace)

    def g(*flat: Any) -> list:
        p = param_tree.unflatten(flat[:n_params])
        it = iter(flat[n_params:])
        full = []
        for leaf, ax, a in zip(leaves, axes, is_arr):
            if not a:
                full.append(leaf)
                continue
            value = next(it)
            full.append(value if ax is None else jnp.expand_dims(value, ax))
        xx, kw = treedef.unflatten(full)
        result = f(p, xx, **kw)
        outs, out["tree"] = jax.tree_util.tree_flatten(result)
        out["axes"] = None
        if vmap_axes is not None:
            out["axes"] = jax.tree_util.tree_leaves(vmap_axes.output_axes(result))
            outs = [jnp.squeeze(o, a) for o, a in zip(outs, out["axes"])]
        return outs

    def aval(a: Any, ax: int | None) -> jax.ShapeDtypeStruct:
        shape = tuple(np.shape(a))
        if ax is not None:
            shape = shape[:ax] + shape[ax + 1:]
        return jax.ShapeDtypeStruct(shape, jnp.result_type(a))

    in_avals = ([jax.ShapeDtypeStruct(np.shape(p), jnp.result_type(p)) for p in param_leaves]
                + [aval(a, ax) for a, ax in zip(args, arg_axes)])
    traced = jax.make_jaxpr(g)(*in_avals)
    out_avals = [v.aval for v in traced.jaxpr.outvars]
    out_shapes = [tuple(o.shape) for o in out_avals]
    if out["axes"] is not None:  # per example -> whole batch: the batch axis put back
        out_shapes = [s[:a] + (batch[0],) + s[a:] for s, a in zip(out_shapes, out["axes"])]
    flat = flatten(traced, n_params, unroll_limit)
    return Side(flat, n_params, args, arg_axes, out_shapes, [o.dtype for o in out_avals],
                out["axes"], out["tree"])


# ----------------------------------------------------------------------------------------------
# Flattening interpreter


def eval_eqn(eqn: jex.JaxprEqn, invals: Sequence[Any]) -> list:
    """Applies one equation to values (tracers or arrays); always returns a list of outputs."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _concrete(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer)


def _foldable(eqn: jex.JaxprEqn, invals: Sequence[Any]) -> bool:
    if eqn.effects or eqn.primitive.name in _CALLS or not all(map(_concrete, invals)):
        return False
    for v in eqn.outvars:
        aval = v.aval
        if not hasattr(aval, "dtype") or is_float(aval.dtype) or aval.size > _FOLD_MAX_SIZE:
            return False
        if not (jnp.issubdtype(aval.dtype, jnp.integer) or aval.dtype == jnp.bool_):
            return False
    return True


def _iota(eqn: jex.JaxprEqn, ops: list) -> np.ndarray:
    p = eqn.params
    shape, dim = tuple(p["shape"]), p["dimension"]
    ramp = np.arange(shape[dim]).reshape([-1 if d == dim else 1 for d in range(len(shape))])
    return np.broadcast_to(ramp, shape)


def _select_n(eqn: jex.JaxprEqn, ops: list) -> np.ndarray:
    which, cases = ops[0], np.broadcast_arrays(*ops[1:])
    return np.choose(np.asarray(which, dtype=np.intp), cases)


# Integer/boolean primitives evaluated with NumPy when folded (same results as XLA for these); any other
# foldable primitive is evaluated by JAX, at the cost of compiling a tiny program for it.
_NUMPY_FOLDS: dict[str, Callable[[jex.JaxprEqn, list], Any]] = {
    "add": lambda e, o: np.add(*o), "sub": lambda e, o: np.subtract(*o),
    "mul": lambda e, o: np.multiply(*o), "neg": lambda e, o: np.negative(o[0]),
    "max": lambda e, o: np.maximum(*o), "min": lambda e, o: np.minimum(*o),
    "lt": lambda e, o: np.less(*o), "le": lambda e, o: np.less_equal(*o),
    "gt": lambda e, o: np.greater(*o), "ge": lambda e, o: np.greater_equal(*o),
    "eq": lambda e, o: np.equal(*o), "ne": lambda e, o: np.not_equal(*o),
    "and": lambda e, o: np.bitwise_and(*o), "or": lambda e, o: np.bitwise_or(*o),
    "xor": lambda e, o: np.bitwise_xor(*o), "not": lambda e, o: np.invert(o[0]),
    "clamp": lambda e, o: np.minimum(np.maximum(o[1], o[0]), o[2]),
    "convert_element_type": lambda e, o: o[0],
    "select_n": _select_n, "iota": _iota,
    **{name: fn for name, fn in INDEX_FNS.items() if name not in ("pad", "convert_element_type")},
}


def fold(eqn: jex.JaxprEqn, invals: Sequence[Any]) -> list:
    """Evaluates an integer/boolean equation on concrete values (see `_foldable`)."""
    fn = _NUMPY_FOLDS.get(eqn.primitive.name)
    if fn is not None and len(eqn.outvars) == 1:
        ops = [np.asarray(v) for v in invals]
        if all(not is_float(o.dtype) for o in ops):
            with np.errstate(all="ignore"):  # integer wrap-around, as in XLA
                value = np.asarray(fn(eqn, ops))
            aval = eqn.outvars[0].aval
            if value.shape == tuple(aval.shape):
                return [value.astype(aval.dtype)]
    with jax.ensure_compile_time_eval():
        return eval_eqn(eqn, invals)


class _Flattener:
    """Re-evaluates a jaxpr under `make_jaxpr`, inlining what parameters flow through."""

    def __init__(self, unroll_limit: int):
        self.unroll_limit = unroll_limit

    def run(self, jaxpr: jex.Jaxpr, consts: Sequence[Any], args: Sequence[Any],
            arg_views: Sequence[bool]) -> tuple[list, list]:
        env: dict = {}
        view: dict = {}

        def read(a: Any) -> Any:
            return a.val if isinstance(a, jex.Literal) else env[a]

        def is_view(a: Any) -> bool:
            return not isinstance(a, jex.Literal) and view.get(a, False)

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = c
        for v, a, fl in zip(jaxpr.invars, args, arg_views):
            env[v], view[v] = a, fl
        for eqn in jaxpr.eqns:
            invals = [read(a) for a in eqn.invars]
            inviews = [is_view(a) for a in eqn.invars]
            outs, outviews = self.eqn(eqn, invals, inviews)
            for v, o, fl in zip(eqn.outvars, outs, outviews):
                if not isinstance(v, jex.DropVar):
                    env[v], view[v] = o, fl
        return [read(a) for a in jaxpr.outvars], [is_view(a) for a in jaxpr.outvars]

    def eqn(self, eqn: jex.JaxprEqn, invals: list, inviews: list[bool]) -> tuple[list, list]:
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        if any(inviews):
            if name in _CALLS:
                key, closed = _CALLS[name]
                body = eqn.params[key]
                jaxpr, consts = (body.jaxpr, body.consts) if closed else (body, ())
                return self.run(jaxpr, consts, invals, inviews)
            if name == "scan" and eqn.params["length"] <= self.unroll_limit:
                return self.unroll_scan(eqn, invals, inviews)
        if name == "cond" and _concrete(invals[0]):
            branches = eqn.params["branches"]
            index = int(np.clip(int(np.asarray(invals[0])), 0, len(branches) - 1))
            branch = branches[index]
            return self.run(branch.jaxpr, branch.consts, invals[1:], inviews[1:])
        if _foldable(eqn, invals):
            return fold(eqn, invals), [False] * n_out
        outs = eval_eqn(eqn, invals)
        structural = name in VIEW_PRIMITIVES and any(inviews)
        return outs, [structural] * n_out

    def unroll_scan(self, eqn: jex.JaxprEqn, invals: list, inviews: list[bool]) -> tuple[list, list]:
        p = eqn.params
        n_consts, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
        body = p["jaxpr"]
        consts, cv = invals[:n_consts], inviews[:n_consts]
        carry, carry_v = invals[n_consts:n_consts + n_carry], inviews[n_consts:n_consts + n_carry]
        xs, xs_v = invals[n_consts + n_carry:], inviews[n_consts + n_carry:]
        ys_steps: list = [None] * length
        ys_views = [False] * (len(body.jaxpr.outvars) - n_carry)
        order = range(length - 1, -1, -1) if p["reverse"] else range(length)
        for i in order:
            x_i = [lax.index_in_dim(x, i, 0, keepdims=False) for x in xs]
            outs, outviews = self.run(body.jaxpr, body.consts, consts + carry + x_i,
                                      cv + carry_v + xs_v)
            carry, carry_v = outs[:n_carry], outviews[:n_carry]
            ys_steps[i] = outs[n_carry:]
            ys_views = [a or b for a, b in zip(ys_views, outviews[n_carry:])]
        ys = []
        for j, var in enumerate(body.jaxpr.outvars[n_carry:]):
            if length == 0:
                ys.append(jnp.zeros((0,) + tuple(var.aval.shape), var.aval.dtype))
            else:
                ys.append(jnp.stack([step[j] for step in ys_steps]))
        return carry + ys, carry_v + ys_views


def flatten(closed: jex.ClosedJaxpr, n_params: int, unroll_limit: int = SCAN_UNROLL_LIMIT
            ) -> jex.ClosedJaxpr:
    """`closed` with parameter-carrying calls inlined, scans unrolled and integer constants folded."""
    flattener = _Flattener(unroll_limit)
    n_in = len(closed.jaxpr.invars)
    views = [True] * n_params + [False] * (n_in - n_params)

    def run(*args: Any) -> list:
        return flattener.run(closed.jaxpr, closed.consts, args, views)[0]

    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
    return jax.make_jaxpr(run)(*avals)
