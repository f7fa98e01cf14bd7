"""Where the parameters enter the flat jaxpr: parameter *views* and their *uses*.

A *view* is a value that is a rearrangement of parameter entries: a parameter leaf itself, or the result
of reshape / transpose / broadcast / slice / pad / concatenate / convert ... applied to views (and to
parameter-independent constants). It is represented by an integer index map of its shape: entry `j` holds
the global index of the parameter entry it equals (leaves numbered consecutively in `tree_leaves` order),
or -1 where the value is a constant (padding, concatenated data).

A *use* is an equation that consumes a view through operand `k` and is not itself a view: its Jacobian
with respect to that operand, composed with the view's index map, is this equation's share of
∂f/∂params. Two uses whose index maps share no entry have no cross term in the kernel; two uses with the
same injective, constant-free map can be contracted directly in the space of the operand.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Callable

import jax
import numpy as np
from jax.extend import core as jex


IndexFn = Callable[[jex.JaxprEqn, list], "np.ndarray | None"]


def is_float(dtype: Any) -> bool:
    return bool(jax.numpy.issubdtype(dtype, jax.numpy.inexact))


@dataclasses.dataclass(eq=False)
class View:
    """Index map of a parameter view: `idx[j]` = global parameter index of element `j`, or -1.

    `leaf_perm = (leaf, perm)` when the view is a whole parameter leaf with its axes permuted
    (`idx == transpose(leaf entries, perm)`: the leaf itself, its transpose, ...), else None; it lets two
    uses of `W` and `Wᵀ` be contracted without forming their Jacobians.
    """

    idx: np.ndarray
    leaf_perm: tuple[int, tuple[int, ...]] | None = None

    @functools.cached_property
    def key(self) -> tuple:
        return (self.idx.shape, hashlib.sha1(np.ascontiguousarray(self.idx).tobytes()).hexdigest())

    @functools.cached_property
    def flat_params(self) -> np.ndarray:
        """The parameter entries this view touches (sorted, unique)."""
        return np.unique(self.idx[self.idx >= 0])

    @functools.cached_property
    def clean(self) -> bool:
        """No constant entries and no parameter entry repeated: the map is a partial isometry."""
        return bool(np.all(self.idx >= 0)) and self.flat_params.size == self.idx.size

    @functools.cached_property
    def bounds(self) -> tuple[int, int]:
        f = self.flat_params
        return (int(f[0]), int(f[-1])) if f.size else (0, -1)

    def overlaps(self, other: "View") -> bool:
        if self.key == other.key:
            return self.flat_params.size > 0
        (a0, a1), (b0, b1) = self.bounds, other.bounds
        if a1 < b0 or b1 < a0:
            return False
        return np.intersect1d(self.flat_params, other.flat_params, assume_unique=True).size > 0


@dataclasses.dataclass
class Use:
    """Equation `eqn` (index in the flat jaxpr) consumes view `view` through operand `operand`.

    `eqn is None` marks a model output that is itself a view (then `operand` is the output position).
    """

    eqn: int | None
    operand: int
    view: View


@dataclasses.dataclass
class Analysis:
    """Uses of the parameters in a flat jaxpr, and the perturbation slots their cotangents need.

    `slots` lists where cotangents ∂f/∂y are taken: `(eqn index, output position)` for outputs of
    equations that use a parameter, `(None, j)` for model output `j` when it is a view.
    """

    uses: list[Use]
    slots: list[tuple[int | None, int]]
    slot_avals: list[Any]
    recorded_eqns: frozenset
    forward_mode: bool

    def slot_index(self, eqn: int | None, position: int) -> int | None:
        return self._index.get((eqn, position))

    def __post_init__(self) -> None:
        self._index = {s: i for i, s in enumerate(self.slots)}


# ----------------------------------------------------------------------------------------------
# Index maps of structural primitives (numpy, evaluated at trace time)


def _fill(aval: Any) -> np.ndarray:
    return np.full(aval.shape, -1, np.int64)


def _reshape(eqn, ops):
    x = ops[0]
    if eqn.params.get("dimensions") is not None:
        x = np.transpose(x, eqn.params["dimensions"])
    return x.reshape(eqn.params["new_sizes"])


def _broadcast_in_dim(eqn, ops):
    shape = tuple(eqn.params["shape"])
    tmp = [1] * len(shape)
    for i, d in enumerate(eqn.params["broadcast_dimensions"]):
        tmp[d] = ops[0].shape[i]
    return np.broadcast_to(ops[0].reshape(tmp), shape)


def _slice(eqn, ops):
    p = eqn.params
    strides = p["strides"] or (1,) * ops[0].ndim
    return ops[0][tuple(slice(s, l, st) for s, l, st in zip(p["start_indices"], p["limit_indices"],
                                                             strides))]


def _pad(eqn, ops):
    x = ops[0]
    for axis, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
        n = x.shape[axis]
        if interior and n > 1:
            size = n + (n - 1) * interior
            out = np.full(x.shape[:axis] + (size,) + x.shape[axis + 1:], -1, np.int64)
            index = [slice(None)] * x.ndim
            index[axis] = slice(None, None, interior + 1)
            out[tuple(index)] = x
            x = out
        for amount, at_end in ((lo, False), (hi, True)):
            if amount > 0:
                pad = np.full(x.shape[:axis] + (amount,) + x.shape[axis + 1:], -1, np.int64)
                x = np.concatenate([x, pad] if at_end else [pad, x], axis=axis)
            elif amount < 0:
                index = [slice(None)] * x.ndim
                index[axis] = slice(None, amount) if at_end else slice(-amount, None)
                x = x[tuple(index)]
    return x


def _dynamic_slice(eqn, ops):
    x, starts = ops[0], ops[1:]
    sizes = eqn.params["slice_sizes"]
    index = []
    for start, size, dim in zip(starts, sizes, x.shape):
        s = int(np.clip(int(start), 0, dim - size))
        index.append(slice(s, s + size))
    return x[tuple(index)]


_INDEX_FNS: dict[str, IndexFn] = {
    "reshape": _reshape,
    "transpose": lambda eqn, ops: np.transpose(ops[0], eqn.params["permutation"]),
    "broadcast_in_dim": _broadcast_in_dim,
    "squeeze": lambda eqn, ops: np.squeeze(ops[0], axis=tuple(eqn.params["dimensions"])),
    "expand_dims": lambda eqn, ops: np.expand_dims(ops[0], tuple(eqn.params["dimensions"])),
    "convert_element_type": lambda eqn, ops: ops[0],
    "copy": lambda eqn, ops: ops[0],
    "copy_p": lambda eqn, ops: ops[0],
    "sharding_constraint": lambda eqn, ops: ops[0],
    "device_put": lambda eqn, ops: ops[0],
    "slice": _slice,
    "rev": lambda eqn, ops: np.flip(ops[0], tuple(eqn.params["dimensions"])),
    "pad": _pad,
    "concatenate": lambda eqn, ops: np.concatenate(ops, axis=eqn.params["dimension"]),
    "dynamic_slice": _dynamic_slice,
}

VIEW_PRIMITIVES = frozenset(_INDEX_FNS)
"""Primitives whose output can be a rearrangement of a parameter (decides inlining in `graph`)."""

# Operand positions that may be parameter-independent data (filled with -1) rather than views; any other
# operand must be a view, a literal or a known constant (dynamic_slice's start indices).
_DATA_OPERANDS = {"pad": {1}, "concatenate": "all"}


def _index_map(eqn: jex.JaxprEqn, in_views: list, in_dep: list[bool], constants: dict
               ) -> np.ndarray | None:
    """The index map of `eqn`'s output if it is a view of its view operands, else None."""
    name = eqn.primitive.name
    fn = _INDEX_FNS.get(name)
    if fn is None or len(eqn.outvars) != 1 or not is_float(eqn.outvars[0].aval.dtype):
        return None
    data_ok = _DATA_OPERANDS.get(name, ())
    ops: list = []
    for k, (a, view, dep) in enumerate(zip(eqn.invars, in_views, in_dep)):
        if view is not None:
            if k > 0 and name not in ("concatenate",):
                return None  # e.g. a parameter used as pad value: not a rearrangement
            ops.append(view.idx)
        elif k == 0 and name != "concatenate":
            return None
        elif dep:
            return None  # mixed with a parameter-dependent activation: a use, not a view
        elif name == "dynamic_slice":
            value = a.val if isinstance(a, jex.Literal) else constants.get(a)
            if value is None:
                return None
            ops.append(np.asarray(value))
        elif data_ok == "all" or k in data_ok:
            ops.append(_fill(a.aval))
        else:
            return None
    return np.asarray(fn(eqn, ops), dtype=np.int64)


_SAME_LAYOUT = frozenset({"convert_element_type", "copy", "copy_p", "device_put",
                          "sharding_constraint"})


def _leaf_perm(eqn: jex.JaxprEqn, operand: View | None) -> tuple[int, tuple[int, ...]] | None:
    """`leaf_perm` of a view op's output, from that of its first operand (see `View`)."""
    if operand is None or operand.leaf_perm is None:
        return None
    leaf, perm = operand.leaf_perm
    name = eqn.primitive.name
    if name in _SAME_LAYOUT:
        return leaf, perm
    if name == "transpose":
        return leaf, tuple(perm[p] for p in eqn.params["permutation"])
    return None


def analyze(closed: jex.ClosedJaxpr, n_params: int) -> Analysis:
    """Finds the views and uses of the parameters (the first `n_params` inputs) of a flat jaxpr."""
    jaxpr = closed.jaxpr
    constants = {v: np.asarray(c) for v, c in zip(jaxpr.constvars, closed.consts)
                 if not isinstance(c, jax.core.Tracer)}
    views: dict = {}
    dep: set = set()
    offset = 0
    for leaf, v in enumerate(jaxpr.invars[:n_params]):
        size = int(np.prod(v.aval.shape, dtype=np.int64))
        views[v] = View(np.arange(offset, offset + size, dtype=np.int64).reshape(v.aval.shape),
                        (leaf, tuple(range(len(v.aval.shape)))))
        dep.add(v)
        offset += size

    uses: list[Use] = []
    forward_mode = False
    for i, eqn in enumerate(jaxpr.eqns):
        in_views = [None if isinstance(a, jex.Literal) else views.get(a) for a in eqn.invars]
        in_dep = [not isinstance(a, jex.Literal) and a in dep for a in eqn.invars]
        if not any(in_dep):
            continue
        if eqn.primitive.name == "while":
            forward_mode = True
        if any(v is not None for v in in_views):
            idx = _index_map(eqn, in_views, in_dep, constants)
            if idx is not None:
                views[eqn.outvars[0]] = View(idx, _leaf_perm(eqn, in_views[0]))
                dep.add(eqn.outvars[0])
                continue
            if any(is_float(o.aval.dtype) for o in eqn.outvars):
                for k, view in enumerate(in_views):
                    if view is not None and is_float(eqn.invars[k].aval.dtype):
                        uses.append(Use(i, k, view))
        dep.update(o for o in eqn.outvars if not isinstance(o, jex.DropVar))

    for j, a in enumerate(jaxpr.outvars):
        if not isinstance(a, jex.Literal) and a in views and is_float(a.aval.dtype):
            uses.append(Use(None, j, views[a]))

    slots: list = []
    slot_avals: list = []
    seen: set = set()
    for use in uses:
        if use.eqn is None:
            slots.append((None, use.operand))
            slot_avals.append(jaxpr.outvars[use.operand].aval)
            continue
        if use.eqn in seen:
            continue
        seen.add(use.eqn)
        for pos, o in enumerate(jaxpr.eqns[use.eqn].outvars):
            if not isinstance(o, jex.DropVar) and is_float(o.aval.dtype):
                slots.append((use.eqn, pos))
                slot_avals.append(o.aval)
    return Analysis(uses, slots, slot_avals, frozenset(seen), forward_mode)
