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
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.extend import core as jex


IndexFn = Callable[[jex.JaxprEqn, list], "np.ndarray | None"]


def is_float(dtype: Any) -> bool:
    return bool(jax.numpy.issubdtype(dtype, jax.numpy.inexact))


class View:
    """Index map of a parameter view: `idx[j]` = global parameter index of element `j`, or -1.

    `leaf_perm = (leaf, perm)` when the view is a whole parameter leaf with its axes permuted
    (`idx == transpose(leaf entries, perm)`: the leaf itself, its transpose, ...), else None; it lets two
    uses of `W` and `Wᵀ` be contracted without forming their Jacobians. Such a view is described by its
    leaf's offset and shape and its `idx` is only built when asked for (a rearrangement other than a
    transpose, a Jacobian formed explicitly): the weights of a large model are mostly used whole, and
    their index maps would cost 8 bytes per parameter and seconds to build and hash.
    """

    def __init__(self, idx: np.ndarray | None = None,
                 leaf_perm: tuple[int, tuple[int, ...]] | None = None, *,
                 leaf_offset: int = 0, leaf_shape: tuple[int, ...] = ()):
        if (idx is None) == (leaf_perm is None):
            raise ValueError("A View is either an index map or a permuted leaf, not both.")
        self._idx = idx
        self.leaf_perm = leaf_perm
        self._leaf_offset = leaf_offset
        self._leaf_shape = tuple(leaf_shape)

    @classmethod
    def of_leaf(cls, leaf: int, offset: int, shape: tuple[int, ...],
                perm: tuple[int, ...] | None = None) -> "View":
        """Parameter leaf number `leaf` (entries `offset ...`, shape `shape`), axes permuted by `perm`."""
        perm = tuple(range(len(shape))) if perm is None else tuple(perm)
        return cls(leaf_perm=(leaf, perm), leaf_offset=offset, leaf_shape=shape)

    def permuted(self, permutation: Sequence[int]) -> "View":
        """This whole-leaf view transposed by `permutation` (requires `leaf_perm`)."""
        leaf, perm = self.leaf_perm
        return View.of_leaf(leaf, self._leaf_offset, self._leaf_shape,
                            tuple(perm[p] for p in permutation))

    @property
    def shape(self) -> tuple[int, ...]:
        if self._idx is not None:
            return tuple(self._idx.shape)
        return tuple(self._leaf_shape[p] for p in self.leaf_perm[1])

    @property
    def idx(self) -> np.ndarray:
        if self._idx is None:
            size = int(np.prod(self._leaf_shape, dtype=np.int64))
            entries = np.arange(self._leaf_offset, self._leaf_offset + size, dtype=np.int64)
            self._idx = np.transpose(entries.reshape(self._leaf_shape), self.leaf_perm[1])
        return self._idx

    @functools.cached_property
    def key(self) -> tuple:
        """Equal keys mean equal index maps (unequal keys may still be equal maps: then only the cheaper
        contraction paths are missed)."""
        if self.leaf_perm is not None:
            return ("leaf", self.leaf_perm, self._leaf_offset, self._leaf_shape)
        return (self.idx.shape, hashlib.sha1(np.ascontiguousarray(self.idx).tobytes()).hexdigest())

    @functools.cached_property
    def flat_params(self) -> np.ndarray:
        """The parameter entries this view touches (sorted, unique)."""
        if self.leaf_perm is not None:  # every entry of one leaf exactly once: a contiguous range
            lo, hi = self.bounds
            return np.arange(lo, hi + 1, dtype=np.int64)
        return sorted_unique(self.idx[self.idx >= 0])

    @functools.cached_property
    def clean(self) -> bool:
        """No constant entries and no parameter entry repeated: the map is a partial isometry."""
        if self.leaf_perm is not None:
            return True
        lo, hi = self.bounds
        if hi - lo + 1 < self.idx.size or not bool(np.all(self.idx >= 0)):
            return False  # more entries than distinct indices in range (a broadcast), or padding
        return self.flat_params.size == self.idx.size

    @functools.cached_property
    def bounds(self) -> tuple[int, int]:
        """Smallest and largest parameter entry touched ((0, -1) when none)."""
        if self.leaf_perm is not None:
            size = int(np.prod(self._leaf_shape, dtype=np.int64))
            return (self._leaf_offset, self._leaf_offset + size - 1) if size else (0, -1)
        touched = self.idx[self.idx >= 0]
        return (int(touched.min()), int(touched.max())) if touched.size else (0, -1)

    def overlaps(self, other: "View") -> bool:
        (a0, a1), (b0, b1) = self.bounds, other.bounds
        if a1 < a0 or b1 < b0 or a1 < b0 or b1 < a0:
            return False
        if self.key == other.key or (self.leaf_perm is not None and other.leaf_perm is not None):
            return True  # equal maps, or two whole leaves whose ranges intersect (so the same leaf)
        return np.intersect1d(self.flat_params, other.flat_params, assume_unique=True).size > 0


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """`np.unique(values)` of integers by sorting (numpy >= 2.3's hash-based `unique` takes seconds on
    the millions of entries of a large weight's index map; a sort takes milliseconds)."""
    flat = np.sort(values, axis=None)
    if flat.size == 0:
        return flat
    keep = np.empty(flat.size, dtype=bool)
    keep[0] = True
    np.not_equal(flat[1:], flat[:-1], out=keep[1:])
    return flat[keep]


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

INDEX_FNS: dict[str, IndexFn] = {}
"""Primitive name -> its index map in numpy (`fn(eqn, operand index maps) -> output index map`),
registered beside each function by `@index_map(...)`; also used to fold integer constants (`graph`)."""


def index_map(*primitives: str) -> Callable[[IndexFn], IndexFn]:
    """Decorator: `fn(eqn, ops)` rearranges its operands as `primitives` do (a view of a view)."""
    def decorate(fn: IndexFn) -> IndexFn:
        for name in primitives:
            if name in INDEX_FNS:
                raise ValueError(f"Primitive {name!r} already has an index map.")
            INDEX_FNS[name] = fn
        return fn

    return decorate


def _fill(aval: Any) -> np.ndarray:
    return np.full(aval.shape, -1, np.int64)


@index_map("reshape")
def _reshape(eqn, ops):
    x = ops[0]
    if eqn.params.get("dimensions") is not None:
        x = np.transpose(x, eqn.params["dimensions"])
    return x.reshape(eqn.params["new_sizes"])


@index_map("broadcast_in_dim")
def _broadcast_in_dim(eqn, ops):
    shape = tuple(eqn.params["shape"])
    tmp = [1] * len(shape)
    for i, d in enumerate(eqn.params["broadcast_dimensions"]):
        tmp[d] = ops[0].shape[i]
    return np.broadcast_to(ops[0].reshape(tmp), shape)


@index_map("slice")
def _slice(eqn, ops):
    p = eqn.params
    strides = p["strides"] or (1,) * ops[0].ndim
    return ops[0][tuple(slice(s, l, st) for s, l, st in zip(p["start_indices"], p["limit_indices"],
                                                             strides))]


@index_map("pad")
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


@index_map("dynamic_slice")
def _dynamic_slice(eqn, ops):
    x, starts = ops[0], ops[1:]
    sizes = eqn.params["slice_sizes"]
    index = []
    for start, size, dim in zip(starts, sizes, x.shape):
        s = int(np.clip(int(start), 0, dim - size))
        index.append(slice(s, s + size))
    return x[tuple(index)]


@index_map("transpose")
def _transpose(eqn, ops):
    return np.transpose(ops[0], eqn.params["permutation"])


@index_map("squeeze")
def _squeeze(eqn, ops):
    return np.squeeze(ops[0], axis=tuple(eqn.params["dimensions"]))


@index_map("expand_dims")
def _expand_dims(eqn, ops):
    return np.expand_dims(ops[0], tuple(eqn.params["dimensions"]))


@index_map("convert_element_type", "copy", "copy_p", "sharding_constraint", "device_put")
def _same(eqn, ops):
    return ops[0]


@index_map("rev")
def _rev(eqn, ops):
    return np.flip(ops[0], tuple(eqn.params["dimensions"]))


@index_map("concatenate")
def _concatenate(eqn, ops):
    return np.concatenate(ops, axis=eqn.params["dimension"])


@index_map("stack")
def _stack(eqn, ops):
    return np.stack(ops, axis=eqn.params["axis"])


VIEW_PRIMITIVES = frozenset(INDEX_FNS)
"""Primitives whose output can be a rearrangement of a parameter (decides inlining in `graph`)."""

# Operand positions that may be parameter-independent data (filled with -1) rather than views; any other
# operand must be a view, a literal or a known constant (dynamic_slice's start indices).
_DATA_OPERANDS = {"pad": {1}, "concatenate": "all", "stack": "all"}
_JOINS = ("concatenate", "stack")  # any operand may be the view; the others are data


def _index_map(eqn: jex.JaxprEqn, in_views: list, in_dep: list[bool], constants: dict
               ) -> np.ndarray | None:
    """The index map of `eqn`'s output if it is a view of its view operands, else None."""
    name = eqn.primitive.name
    fn = INDEX_FNS.get(name)
    if fn is None or len(eqn.outvars) != 1 or not is_float(eqn.outvars[0].aval.dtype):
        return None
    data_ok = _DATA_OPERANDS.get(name, ())
    ops: list = []
    for k, (a, view, dep) in enumerate(zip(eqn.invars, in_views, in_dep)):
        if view is not None:
            if k > 0 and name not in _JOINS:
                return None  # e.g. a parameter used as pad value: not a rearrangement
            ops.append(view.idx)
        elif k == 0 and name not in _JOINS:
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


def _permuted_leaf(eqn: jex.JaxprEqn, in_views: list) -> View | None:
    """The output view of a transpose or layout-preserving op (`convert_element_type`, ...) applied to a
    whole-leaf view, kept lazy (see `View`); None for any other equation."""
    name = eqn.primitive.name
    if (name not in _SAME_LAYOUT and name != "transpose") or len(eqn.invars) != 1:
        return None
    operand = in_views[0]
    if (operand is None or operand.leaf_perm is None or len(eqn.outvars) != 1
            or not is_float(eqn.outvars[0].aval.dtype)):
        return None
    if name == "transpose":
        return operand.permuted(eqn.params["permutation"])
    return operand


def analyze(closed: jex.ClosedJaxpr, n_params: int) -> Analysis:
    """Finds the views and uses of the parameters (the first `n_params` inputs) of a flat jaxpr."""
    jaxpr = closed.jaxpr
    constants = {v: np.asarray(c) for v, c in zip(jaxpr.constvars, closed.consts)
                 if not isinstance(c, jax.core.Tracer)}
    views: dict = {}
    dep: set = set()
    offset = 0
    for leaf, v in enumerate(jaxpr.invars[:n_params]):
        views[v] = View.of_leaf(leaf, offset, tuple(v.aval.shape))
        dep.add(v)
        offset += int(np.prod(v.aval.shape, dtype=np.int64))

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
            view = _permuted_leaf(eqn, in_views)
            if view is None:
                idx = _index_map(eqn, in_views, in_dep, constants)
                view = None if idx is None else View(idx)
            if view is not None:
                views[eqn.outvars[0]] = view
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
