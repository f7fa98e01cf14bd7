"""The kernel from per-use factorisations: Θ = Σ over pairs of uses (one per side) sharing parameters.

Uses of one side with the same parameter view and the same plan (a weight applied at every step of an
unrolled scan, ...) are stacked into a *group* along a summed axis `t`, so the cross terms between them
cost one einsum. For each pair of groups (side 1, side 2) whose views share parameter entries:

- same view, injective and constant-free, same `v_fine` (or two axis permutations of one whole leaf,
  such as a tied embedding `E` and `Eᵀ`): one einsum over both sides' tensors with the parameter labels
  shared; an index tensor on both sides along the same label becomes the equality matrix of the two
  index tensors (embedding rows), otherwise a one-hot;
- otherwise (a bias broadcast over positions, overlapping slices, padded or concatenated parameters):
  each side's Jacobian is formed, summed onto the parameter entries both views touch, and contracted.

Output labels follow `LeafAxes`: traced and diagonal output axes share a label between the sides (traced
ones are summed), free axes get one label per side; the result is in canonical order.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum
from jax import lax

from entk.algorithms.axes import LeafAxes

from .cotangents import PlannedUse, UseTensors
from .graph import Side
from .views import View


@dataclasses.dataclass(eq=False)
class Group:
    """Uses of one side with equal view and plan; tensors stacked on a leading axis when `stacked`."""

    view: View
    planned: PlannedUse
    cts: list
    factors: list
    stacked: bool


def build_groups(planned: list[PlannedUse], tensors: list[UseTensors]) -> list[Group]:
    """Stacks the tensors of uses with the same view and plan (their Jacobians add up)."""
    buckets: dict = {}
    for pu, t in zip(planned, tensors):
        buckets.setdefault((pu.use.view.key, pu.plan), []).append((pu, t))
    groups = []
    for members in buckets.values():
        pu = members[0][0]
        if len(members) == 1:
            t = members[0][1]
            groups.append(Group(pu.use.view, pu, t.cts, t.factors, False))
            continue
        n_leaves = len(members[0][1].cts)
        cts = [None if members[0][1].cts[j] is None
               else jnp.stack([t.cts[j] for _, t in members]) for j in range(n_leaves)]
        factors = [jnp.stack([t.factors[i] for _, t in members])
                   for i in range(len(members[0][1].factors))]
        groups.append(Group(pu.use.view, pu, cts, factors, True))
    return groups


def _einsum(operands: list[tuple[jax.Array, list]], out: list) -> jax.Array:
    args: list = []
    for array, labels in operands:
        assert array.ndim == len(labels), (array.shape, labels)
        args += [array, list(labels)]
    args.append(list(out))
    optimize = "optimal" if len(operands) <= 5 else "dp"
    subscripts = (",".join("".join(map(opt_einsum.get_symbol, labels)) for _, labels in operands)
                  + "->" + "".join(map(opt_einsum.get_symbol, out)))
    path = _contraction_path(subscripts, tuple(tuple(a.shape) for a, _ in operands), optimize)
    return jnp.einsum(*args, optimize=list(path), precision=lax.Precision.HIGHEST)


@functools.lru_cache(maxsize=4096)
def _contraction_path(subscripts: str, shapes: tuple, optimize: str) -> tuple:
    """The contraction order `jnp.einsum(..., optimize=optimize)` would pick, searched once per
    subscripts and shapes (the layers of a deep model repeat them; the search costs milliseconds)."""
    path, _ = opt_einsum.contract_path(subscripts, *shapes, shapes=True, optimize=optimize)
    return tuple(tuple(step) for step in path)


class _Counter:
    def __init__(self) -> None:
        self._it = itertools.count()

    def __call__(self) -> int:
        return next(self._it)


class LeafContraction:
    """Contracts all group pairs for one output leaf."""

    def __init__(self, side1: Side, side2: Side, leaf: int, leaf_axes: LeafAxes):
        self.sides = (side1, side2)
        self.leaf = leaf
        self.new = _Counter()
        ndim = leaf_axes.ndim
        l1, l2 = [], []
        for i in range(ndim):
            if i in leaf_axes.trace or i in leaf_axes.diagonal:
                a = self.new()
                l1.append(a), l2.append(a)
            else:
                l1.append(self.new()), l2.append(self.new())
        self.out_labels = ([l1[d] for d in leaf_axes.diagonal] + [l1[i] for i in leaf_axes.free]
                           + [l2[i] for i in leaf_axes.free])
        self.lead = (self._lead(side1, l1), self._lead(side2, l2))
        self._materialized: dict = {}

    def _lead(self, side: Side, labels: list) -> list:
        """Labels of a tensor's leading output dims: `[E] + per-example dims` with vmap, else all."""
        if not side.vmapped:
            return labels
        e = side.out_batch_axes[self.leaf]
        return [labels[e]] + [l for i, l in enumerate(labels) if i != e]

    def _e_prefix(self, s: int) -> list:
        return self.lead[s][:1] if self.sides[s].vmapped else []

    # -- per-side operands ---------------------------------------------------------------------

    def _side_operands(self, s: int, group: Group, v_labels: list) -> tuple[list, list]:
        """(`[(array, labels)]` for C and factors, `[(ids, labels, v_label)]`) of one side."""
        plan = group.planned.plan
        local: dict = {i: v_labels[i] for i in range(plan.n_v)}

        def g(label: int) -> int:
            if label not in local:
                local[label] = self.new()
            return local[label]

        prefix = [self.new()] if group.stacked else []
        e = self._e_prefix(s)
        ops = [(group.cts[self.leaf], prefix + self.lead[s] + [g(l) for l in plan.y_labels])]
        n_f = len(plan.factor_labels)
        for array, labels in zip(group.factors[:n_f], plan.factor_labels):
            ops.append((array, prefix + e + [g(l) for l in labels]))
        index = [(ids, prefix + e + [g(l) for l in labels], g(v))
                 for ids, (labels, v) in zip(group.factors[n_f:], plan.index_labels)]
        return ops, index

    @staticmethod
    def _one_hot(ids: jax.Array, labels: list, v_label: int, size: int, dtype: Any
                 ) -> tuple[jax.Array, list]:
        return (ids[..., None] == jnp.arange(size)).astype(dtype), labels + [v_label]

    def _materialize(self, s: int, group: Group) -> jax.Array:
        """This side's Jacobian for the group: `[E?] + out_leaf + v.shape`."""
        key = (s, id(group))
        if key not in self._materialized:
            plan = group.planned.plan
            v_labels = [self.new() for _ in plan.v_fine]
            ops, index = self._side_operands(s, group, v_labels)
            dtype = ops[0][0].dtype
            for ids, labels, v in index:
                ops.append(self._one_hot(ids, labels, v, plan.v_fine[v_labels.index(v)], dtype))
            j = _einsum(ops, self.lead[s] + v_labels)
            n_lead = len(self.lead[s])
            self._materialized[key] = j.reshape(j.shape[:n_lead] + group.view.shape)
        return self._materialized[key]

    # -- pairs ---------------------------------------------------------------------------------

    def pair(self, g1: Group, g2: Group) -> jax.Array:
        shared = self._shared_v_labels(g1, g2)
        if shared is not None:
            return self._joint(g1, g2, *shared)
        j1, j2 = self._materialize(0, g1), self._materialize(1, g2)
        n1, n2 = len(self.lead[0]), len(self.lead[1])
        j1 = j1.reshape(j1.shape[:n1] + (-1,))
        j2 = j2.reshape(j2.shape[:n2] + (-1,))
        if not (g1.view.key == g2.view.key and g1.view.clean):
            touched = np.intersect1d(g1.view.flat_params, g2.view.flat_params, assume_unique=True)
            j1 = _onto(j1, g1.view, touched)
            j2 = _onto(j2, g2.view, touched)
        k = self.new()
        return _einsum([(j1, self.lead[0] + [k]), (j2, self.lead[1] + [k])], self.out_labels)

    def _shared_v_labels(self, g1: Group, g2: Group) -> tuple[list, list] | None:
        """Labels for both sides' `v_fine` dims such that one einsum over both is the kernel term.

        Same clean view and same `v_fine`: dim by dim. Two permutations of one whole leaf (`W`, `Wᵀ`)
        with unsplit dims: through the leaf's dims. Otherwise None (Jacobians are formed).
        """
        p1, p2 = g1.planned.plan, g2.planned.plan
        v1, v2 = g1.view, g2.view
        if v1.key == v2.key and v1.clean and p1.v_fine == p2.v_fine:
            labels = [self.new() for _ in p1.v_fine]
            return labels, labels
        if (v1.leaf_perm is not None and v2.leaf_perm is not None
                and v1.leaf_perm[0] == v2.leaf_perm[0]
                and p1.v_fine == v1.shape and p2.v_fine == v2.shape):
            leaf_labels = [self.new() for _ in v1.leaf_perm[1]]
            return ([leaf_labels[d] for d in v1.leaf_perm[1]],
                    [leaf_labels[d] for d in v2.leaf_perm[1]])
        return None

    def _joint(self, g1: Group, g2: Group, labels1: list, labels2: list) -> jax.Array:
        ops1, index1 = self._side_operands(0, g1, labels1)
        ops2, index2 = self._side_operands(1, g2, labels2)
        size = dict(zip(labels1, g1.planned.plan.v_fine)) | dict(zip(labels2, g2.planned.plan.v_fine))
        dtype = ops1[0][0].dtype
        ops = ops1 + ops2
        by_label2: dict = {}
        for ids, labels, v in index2:
            by_label2.setdefault(v, []).append((ids, labels))
        paired2 = set()
        for ids1, labels1_, v in index1:
            partners = by_label2.get(v, [])
            if len(partners) == 1 and v not in paired2:
                # Σ_row onehot₁[b₁, row] onehot₂[b₂, row] = [ids₁(b₁) = ids₂(b₂)]
                ids2, labels2_ = partners[0]
                paired2.add(v)
                expand = (1,) * ids2.ndim
                eq = (ids1.reshape(ids1.shape + expand) == ids2) & (ids1 >= 0).reshape(
                    ids1.shape + expand)
                ops.append((eq.astype(dtype), labels1_ + labels2_))
            else:
                ops.append(self._one_hot(ids1, labels1_, v, size[v], dtype))
        for ids2, labels2_, v in index2:
            if v not in paired2:
                ops.append(self._one_hot(ids2, labels2_, v, size[v], dtype))
        return _einsum(ops, self.out_labels)


def _onto(j: jax.Array, view: View, touched: np.ndarray) -> jax.Array:
    """Sums the last (flattened view) axis of `j` onto the parameter entries `touched`."""
    idx = view.idx.reshape(-1)
    pos = np.searchsorted(touched, idx)
    hit = (idx >= 0) & (pos < touched.size)
    hit[hit] &= touched[pos[hit]] == idx[hit]
    segments = np.where(hit, pos, touched.size).astype(np.int32)
    moved = jnp.moveaxis(j, -1, 0)
    summed = jax.ops.segment_sum(moved, jnp.asarray(segments), num_segments=int(touched.size))
    return jnp.moveaxis(summed, 0, -1)


def leaf_kernel(side1: Side, groups1: list[Group], side2: Side, groups2: list[Group], leaf: int,
                leaf_axes: LeafAxes, dtype: Any) -> jax.Array:
    """Θ for one output leaf, in canonical order, traced axes summed (not yet divided)."""
    lc = LeafContraction(side1, side2, leaf, leaf_axes)
    total = None
    for g1 in groups1:
        if g1.cts[leaf] is None:
            continue
        for g2 in groups2:
            if g2.cts[leaf] is None or not g1.view.overlaps(g2.view):
                continue
            term = lc.pair(g1, g2)
            total = term if total is None else total + term
    if total is None:
        total = jnp.zeros(leaf_axes.canonical_shape(side1.out_shapes[leaf], side2.out_shapes[leaf]),
                          dtype)
    return total
