"""Batch-axis rules, one per primitive, for the interpreter in `entk.algorithms.batch_axis`.

A rule `fn(ctx, eqn, ins) -> outs` maps the `Axis` of each operand to that of each result. It raises
`Coupled` (with a phrase completing "`<primitive>` at <line> ...") when the equation reduces, slices,
shifts, sorts, scans or gathers across the batch axis, or combines the batch with an unbatched value
that varies along it; `Opaque` when it cannot follow the shapes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from entk.algorithms.batch_axis import (POSITIONS, RANDOM, Axis, Context, Coupled, Opaque,
                                        align, const_elementwise, first_origin, rule, run_closed,
                                        same_batch, shape_of, unbatched)

# ----------------------------------------------------------------------------------------------
# Rules: elementwise and shape-only

ELEMENTWISE = (
    "add", "sub", "mul", "div", "rem", "pow", "max", "min", "atan2", "nextafter", "and", "or", "xor",
    "not", "neg", "sign", "floor", "ceil", "round", "is_finite", "exp", "exp2", "log", "log1p", "expm1",
    "tanh", "logistic", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh",
    "atanh", "sqrt", "rsqrt", "cbrt", "abs", "integer_pow", "square", "erf", "erfc", "erf_inv",
    "lgamma", "digamma", "igamma", "igammac", "polygamma", "zeta", "bessel_i0e", "bessel_i1e",
    "random_gamma_grad", "regularized_incomplete_beta", "select_n", "clamp", "convert_element_type",
    "eq", "ne", "lt", "le", "gt", "ge", "real", "imag", "conj", "complex", "shift_left",
    "shift_right_arithmetic", "shift_right_logical", "population_count", "clz", "copy", "copy_p",
    "stop_gradient", "reduce_precision", "random_fold_in", "random_seed", "random_clone",
    "threefry2x32", "optimization_barrier", "sharding_constraint", "device_put", "pvary",
    "mesh_cast", "reshard", "square", "bitcast_convert_type",
)


@rule(*ELEMENTWISE)
def _elementwise(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    out_shapes = [shape_of(v) for v in eqn.outvars]
    if eqn.primitive.name in ("optimization_barrier", "device_put", "sharding_constraint"):
        return list(ins)  # identity on each operand
    if any(s != out_shapes[0] for s in out_shapes) or any(
            len(shape_of(v)) not in (0, len(out_shapes[0])) for v in eqn.invars):
        if all(i.batch is None for i in ins):
            return [unbatched(origin=first_origin(ins)) for _ in eqn.outvars]
        raise Opaque("changes shapes in a way entk cannot follow")
    b = same_batch(ins, "combines")
    if b is None:
        return [unbatched(const_elementwise(eqn, ins), first_origin(ins)) for _ in eqn.outvars]
    for v, i in zip(eqn.invars, ins):
        if i.batch is None and len(shape_of(v)) == len(out_shapes[0]):
            align(ctx, i, shape_of(v), b.batch)
    return [Axis(b.batch, b.inner) for _ in eqn.outvars]


@rule("broadcast_in_dim")
def _broadcast_in_dim(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    op, dims = ins[0], eqn.params["broadcast_dimensions"]
    in_shape, out_shape = shape_of(eqn.invars[0]), shape_of(eqn.outvars[0])
    if op.batch is not None:
        return [Axis(dims[op.batch], op.inner)]
    const = {d for d in range(len(out_shape)) if d not in dims}
    const |= {dims[i] for i in op.const} | {dims[i] for i, s in enumerate(in_shape) if s == 1}
    return [unbatched(const, op.origin)]


def _blocks(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Groups the dims of two shapes of equal size into minimal blocks of equal product."""
    blocks, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        bi, bj, pa, pb = [], [], 1, 1
        while True:
            if pa <= pb and i < len(a):
                pa *= a[i]; bi.append(i); i += 1  # noqa: E702
            elif j < len(b):
                pb *= b[j]; bj.append(j); j += 1  # noqa: E702
            else:
                break
            if pa == pb and (i == len(a) or a[i] != 1) and (j == len(b) or b[j] != 1):
                break
        blocks.append((bi, bj))
    return blocks


@rule("reshape")
def _reshape(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    op = ins[0]
    in_shape, out_shape = shape_of(eqn.invars[0]), shape_of(eqn.outvars[0])
    if op.batch is None:
        const = set()
        for bi, bj in _blocks(in_shape, out_shape):
            if all(i in op.const or in_shape[i] == 1 for i in bi):
                const |= set(bj)
        return [unbatched(const, op.origin)]
    prefix = math.prod(in_shape[:op.batch])
    for k, size in enumerate(out_shape):
        if math.prod(out_shape[:k]) == prefix and size % ctx.n == 0 and size > 0:
            return [Axis(k, size // ctx.n)]
    raise Coupled(f"reshapes {in_shape} -> {out_shape}, splitting the batch axis {op.batch} across "
                  f"dimensions; entk cannot prove the examples stay apart")


@rule("transpose")
def _transpose(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    op, perm = ins[0], tuple(eqn.params["permutation"])
    if op.batch is not None:
        return [Axis(perm.index(op.batch), op.inner)]
    return [unbatched({k for k, p in enumerate(perm) if p in op.const}, op.origin)]


@rule("squeeze")
def _squeeze(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    op, dims = ins[0], tuple(d % len(shape_of(eqn.invars[0])) for d in eqn.params["dimensions"])
    new = {d: d - sum(x < d for x in dims) for d in range(len(shape_of(eqn.invars[0]))) if d not in dims}
    if op.batch is not None:
        return [Axis(new[op.batch], op.inner)]
    return [unbatched({new[d] for d in op.const if d in new}, op.origin)]


@rule("expand_dims")
def _expand_dims(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    op, out_nd = ins[0], len(shape_of(eqn.outvars[0]))
    dims = sorted(d % out_nd for d in eqn.params["dimensions"])
    kept = [d for d in range(out_nd) if d not in dims]
    if op.batch is not None:
        return [Axis(kept[op.batch], op.inner)]
    return [unbatched(set(dims) | {kept[d] for d in op.const}, op.origin)]


@rule("rev")
def _rev(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    op = ins[0]
    if op.batch is not None and op.batch in eqn.params["dimensions"]:
        raise Coupled(f"reverses the batch axis {op.batch}: example i gets example N-1-i's values")
    return [op if op.batch is not None else unbatched(op.const, op.origin)]


@rule("iota")
def _iota(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    shape, dim = shape_of(eqn.outvars[0]), eqn.params["dimension"]
    return [unbatched(set(range(len(shape))) - {dim}, POSITIONS)]


# ----------------------------------------------------------------------------------------------
# Rules: reductions, scans along an axis, sorting

REDUCTIONS = ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
              "reduce_xor", "argmax", "argmin")


@rule(*REDUCTIONS, "reduce")
def _reduce(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    axes = tuple(eqn.params.get("axes", eqn.params.get("dimensions", ())))
    n_out = len(eqn.outvars)
    ops = ins[:n_out] if eqn.primitive.name == "reduce" else ins[:1]
    b = same_batch(ops, "reduces together")
    if b is None:
        op = ops[0]
        keep = [d for d in range(len(shape_of(eqn.invars[0]))) if d not in axes]
        return [unbatched({k for k, d in enumerate(keep) if d in op.const}, op.origin)] * n_out
    if b.batch in axes:
        raise Coupled(f"reduces over the batch axis {b.batch} (a sum, mean, max or norm over examples)")
    return [Axis(b.batch - sum(a < b.batch for a in axes), b.inner)] * n_out


@rule("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")
def _cumulative(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    op, axis = ins[0], eqn.params["axis"]
    if op.batch is None:
        return [unbatched(op.const - {axis}, op.origin)]
    if op.batch == axis:
        raise Coupled(f"accumulates along the batch axis {axis}: each example gets a running "
                      f"total over the examples before (or after) it")
    return [op]


@rule("sort")
def _sort(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    dim = eqn.params["dimension"] % max(len(shape_of(eqn.invars[0])), 1)
    b = same_batch(ins, "sorts together")
    if b is None:
        return [unbatched(origin=first_origin(ins)) for _ in eqn.outvars]
    if b.batch == dim:
        raise Coupled(f"sorts along the batch axis {dim}: examples trade places by value")
    for v, i in zip(eqn.invars, ins):
        align(ctx, i, shape_of(v), b.batch)
    return [Axis(b.batch, b.inner) for _ in eqn.outvars]


@rule("top_k")
def _top_k(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    op, nd = ins[0], len(shape_of(eqn.invars[0]))
    axis = eqn.params.get("axis", -1) % nd
    if op.batch is None:
        return [unbatched(origin=op.origin) for _ in eqn.outvars]
    if op.batch == axis:
        raise Coupled(f"takes the top k along the batch axis {axis}")
    return [op, op]


@rule("reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window")
def _reduce_window(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    n_out = len(eqn.outvars)
    ops = ins[:n_out]
    b = same_batch(ops, "pools together")
    if b is None:
        return [unbatched(origin=first_origin(ops)) for _ in range(n_out)]
    p = eqn.params
    d = b.batch
    trivial = (p["window_dimensions"][d] == 1 and p["window_strides"][d] == 1
               and tuple(p["padding"][d]) == (0, 0)
               and (p.get("base_dilation") or (1,) * (d + 1))[d] == 1
               and (p.get("window_dilation") or (1,) * (d + 1))[d] == 1)
    if not trivial:
        raise Coupled(f"pools over a window that spans the batch axis {d}")
    return [Axis(d, b.inner) for _ in range(n_out)]


@rule("fft")
def _fft(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    op, nd = ins[0], len(shape_of(eqn.invars[0]))
    if op.batch is None:
        return [unbatched(origin=op.origin)]
    if op.batch >= nd - len(eqn.params["fft_lengths"]):
        raise Coupled(f"transforms along the batch axis {op.batch}")
    return [op]


@rule("cholesky", "eigh", "qr", "svd", "lu", "triangular_solve", "householder_product")
def _matrix_op(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    """Linear algebra on the trailing two dims; leading dims are a batch of matrices."""
    b = same_batch(ins, "solves together")
    if b is None:
        return [unbatched(origin=first_origin(ins)) for _ in eqn.outvars]
    for v, i in zip(eqn.invars, ins):
        if b.batch >= len(shape_of(v)) - 2 or b.inner != 1:
            raise Coupled(f"treats the batch axis {b.batch} as a matrix dimension")
        align(ctx, i, shape_of(v), b.batch)
    return [Axis(b.batch) for _ in eqn.outvars]


# ----------------------------------------------------------------------------------------------
# Rules: contractions

@rule("dot_general")
def _dot_general(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = ins
    ls, rs = shape_of(eqn.invars[0]), shape_of(eqn.invars[1])
    lfree = [d for d in range(len(ls)) if d not in lc and d not in lb]
    rfree = [d for d in range(len(rs)) if d not in rc and d not in rb]
    if lhs.batch is None and rhs.batch is None:
        const = {j for j in range(len(lb)) if lb[j] in lhs.const and rb[j] in rhs.const}
        const |= {len(lb) + k for k, d in enumerate(lfree) if d in lhs.const}
        const |= {len(lb) + len(lfree) + k for k, d in enumerate(rfree) if d in rhs.const}
        return [unbatched(const, lhs.origin or rhs.origin)]
    for side, info, contracting, batch, other, other_batch, other_shape in (
            ("left", lhs, lc, lb, rhs, rb, rs), ("right", rhs, rc, rb, lhs, lb, ls)):
        if info.batch is None:
            continue
        if info.batch in contracting:
            raise Coupled(f"contracts over the batch axis {info.batch} (a sum over examples)")
        if info.batch in batch:
            j = tuple(batch).index(info.batch)
            if other.batch is None:
                align(ctx, other, other_shape, other_batch[j])
            elif other.batch != other_batch[j] or other.inner != info.inner:
                raise Coupled("pairs examples of one operand with other examples of the other")
            return [Axis(j, info.inner)]
        if other.batch is not None:
            raise Coupled("multiplies every example with every other (an outer product across "
                          "the batch, e.g. x @ x.T)")
        free = lfree if side == "left" else rfree
        offset = len(lb) + (0 if side == "left" else len(lfree))
        return [Axis(offset + free.index(info.batch), info.inner)]
    raise AssertionError("unreachable")


@rule("conv_general_dilated")
def _conv(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    lhs, rhs = ins
    dn = eqn.params["dimension_numbers"]
    lhs_spec, out_spec = dn.lhs_spec, dn.out_spec
    if rhs.batch is not None:
        raise Coupled("convolves with a kernel that depends on the examples; entk cannot prove "
                      "independence")
    if lhs.batch is None:
        return [unbatched(origin=lhs.origin or rhs.origin)]
    if lhs.batch != lhs_spec[0]:
        raise Coupled(f"convolves along the batch axis {lhs.batch} (it is a feature or spatial "
                      f"dimension of the convolution)")
    if eqn.params.get("batch_group_count", 1) != 1:
        raise Coupled("groups the batch (batch_group_count > 1)")
    return [Axis(out_spec[0], lhs.inner)]


# ----------------------------------------------------------------------------------------------
# Rules: slicing, indexing, padding, joining

def _full(info: Axis, shape: Sequence[int], what: str) -> None:
    raise Coupled(f"{what} the batch axis {info.batch} (size {shape[info.batch]}): examples are "
                  f"selected, dropped or moved by position")


@rule("slice")
def _slice(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    op, p, shape = ins[0], eqn.params, shape_of(eqn.invars[0])
    if op.batch is None:
        return [unbatched(op.const, op.origin)]
    d = op.batch
    strides = p.get("strides") or (1,) * len(shape)
    if p["start_indices"][d] != 0 or p["limit_indices"][d] != shape[d] or strides[d] != 1:
        _full(op, shape, f"slices [{p['start_indices'][d]}:{p['limit_indices'][d]}:{strides[d]}] of")
    return [op]


@rule("dynamic_slice")
def _dynamic_slice(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    op, shape = ins[0], shape_of(eqn.invars[0])
    if op.batch is None:
        return [unbatched(op.const, op.origin)]
    if eqn.params["slice_sizes"][op.batch] != shape[op.batch]:
        _full(op, shape, "takes a dynamic slice of")
    return [op]


@rule("dynamic_update_slice")
def _dynamic_update_slice(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    op, upd = ins[0], ins[1]
    os_, us = shape_of(eqn.invars[0]), shape_of(eqn.invars[1])
    b = same_batch([op, upd], "writes together")
    if b is None:
        return [unbatched(op.const & upd.const, op.origin or upd.origin)]
    if us[b.batch] != os_[b.batch]:
        raise Coupled(f"writes into part of the batch axis {b.batch} (examples updated by position)")
    align(ctx, op, os_, b.batch)
    align(ctx, upd, us, b.batch)
    return [Axis(b.batch, b.inner)]


@rule("pad")
def _pad(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    op, config = ins[0], eqn.params["padding_config"]
    if op.batch is None:
        return [unbatched({d for d in op.const if tuple(config[d]) == (0, 0, 0)}, op.origin)]
    if tuple(config[op.batch]) != (0, 0, 0):
        raise Coupled(f"pads the batch axis {op.batch} with {tuple(config[op.batch])}: examples "
                      f"shift position")
    return [op]


@rule("concatenate")
def _concatenate(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    dim = eqn.params["dimension"]
    b = same_batch(ins, "concatenates")
    if b is None:
        const = frozenset.intersection(*[i.const for i in ins]) - {dim}
        return [unbatched(const, first_origin(ins))]
    if b.batch == dim:
        raise Coupled(f"concatenates along the batch axis {dim}: examples shift position")
    for v, i in zip(eqn.invars, ins):
        align(ctx, i, shape_of(v), b.batch)
    return [Axis(b.batch, b.inner)]


@rule("stack")
def _stack(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    """`jnp.stack` (a primitive since JAX 0.10): a new axis at `axis`; input dim d lands at d or
    d + 1. Examples stay apart when every batched input has the batch on the same dim."""
    axis = eqn.params["axis"]

    def moved(d: int) -> int:
        return d if d < axis else d + 1

    b = same_batch(ins, "stacks")
    if b is None:
        const = frozenset.intersection(*[i.const for i in ins])
        return [unbatched({moved(d) for d in const}, first_origin(ins))]
    for v, i in zip(eqn.invars, ins):
        align(ctx, i, shape_of(v), b.batch)
    return [Axis(moved(b.batch), b.inner)]


@rule("split")
def _split(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    op, axis = ins[0], eqn.params["axis"]
    if op.batch is None:
        return [unbatched(op.const, op.origin) for _ in eqn.outvars]
    if op.batch == axis:
        raise Coupled(f"splits the batch axis {axis} into parts")
    return [op for _ in eqn.outvars]


@rule("gather")
def _gather(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    op, idx = ins
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    os_, is_ = shape_of(eqn.invars[0]), shape_of(eqn.invars[1])
    out_nd = len(shape_of(eqn.outvars[0]))
    offset_dims = tuple(dn.offset_dims)
    out_batch_dims = [d for d in range(out_nd) if d not in offset_dims]  # indices dims but the last
    window = [d for d in range(len(os_))
              if d not in dn.collapsed_slice_dims and d not in dn.operand_batching_dims]
    if op.batch is None and idx.batch is None:
        # Constant along an output dimension where the indices (or a whole operand window) are:
        # e.g. token-type embeddings looked up with ids broadcast over the batch.
        const = {out_batch_dims[i] for i in idx.const
                 if i < len(is_) - 1 and i not in dn.start_indices_batching_dims}
        const |= {offset_dims[window.index(w)] for w in window
                  if w in op.const and sizes[w] == os_[w]}
        return [unbatched(const, origin=op.origin or idx.origin)]
    if idx.batch is not None and idx.batch == len(is_) - 1:
        raise Coupled("has the batch on the index-vector axis of its indices")
    if op.batch is not None:
        d = op.batch
        if d in dn.start_index_map:
            raise Coupled(f"indexes along the batch axis {d} (examples read other examples' values)")
        if d in dn.operand_batching_dims:
            j = tuple(dn.operand_batching_dims).index(d)
            if idx.batch != dn.start_indices_batching_dims[j] or idx.inner != op.inner:
                raise Coupled("pairs examples of the operand with other examples' indices")
            return [Axis(out_batch_dims[idx.batch], op.inner)]
        if d in dn.collapsed_slice_dims or sizes[d] != os_[d]:
            _full(op, os_, "gathers a part of")
        if idx.batch is not None:
            raise Coupled("indexes every example with every example's indices (an outer product "
                          "across the batch)")
        return [Axis(offset_dims[window.index(d)], op.inner)]
    if idx.batch in dn.start_indices_batching_dims:
        j = tuple(dn.start_indices_batching_dims).index(idx.batch)
        align(ctx, op, os_, dn.operand_batching_dims[j])
    return [Axis(out_batch_dims[idx.batch], idx.inner)]


@rule("scatter", "scatter-add", "scatter_add", "scatter-mul", "scatter_mul", "scatter-min",
      "scatter_min", "scatter-max", "scatter_max", "scatter_sub", "scatter-sub")
def _scatter(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    op, idx, upd = ins[0], ins[1], ins[2]
    dn = eqn.params["dimension_numbers"]
    os_, is_, us = (shape_of(v) for v in eqn.invars[:3])
    if op.batch is None and idx.batch is None and upd.batch is None:
        return [unbatched(origin=first_origin(ins))]
    window = [d for d in range(len(os_))
              if d not in dn.inserted_window_dims and d not in dn.operand_batching_dims]
    scatter_upd_dims = [d for d in range(len(us)) if d not in dn.update_window_dims]
    if idx.batch is None:  # the batch is a window dimension, written whole
        d = op.batch if op.batch is not None else (
            window[tuple(dn.update_window_dims).index(upd.batch)]
            if upd.batch in dn.update_window_dims else None)
        if d is None or d not in window:
            raise Coupled("scatters across the batch axis (examples written by position)")
        ud = dn.update_window_dims[window.index(d)]
        if us[ud] != os_[d]:
            _full(Axis(d), os_, "scatters into part of")
        inner = (op if op.batch is not None else upd).inner
        if upd.batch is not None and (upd.batch, upd.inner) != (ud, inner):
            raise Coupled("writes examples' updates into other examples")
        align(ctx, upd, us, ud)
        align(ctx, op, os_, d)
        return [Axis(d, inner)]
    if idx.batch in dn.scatter_indices_batching_dims and idx.batch != len(is_) - 1:
        j = tuple(dn.scatter_indices_batching_dims).index(idx.batch)
        d = dn.operand_batching_dims[j]
        ud = scatter_upd_dims[[k for k in range(len(is_) - 1)].index(idx.batch)]
        for info, dim, shape in ((op, d, os_), (upd, ud, us)):
            if info.batch is None:
                align(ctx, info, shape, dim)
            elif info.batch != dim:
                raise Coupled("writes examples' updates into other examples")
        return [Axis(d, idx.inner)]
    raise Coupled("scatters with indices that depend on the examples; entk cannot prove that each "
                  "example writes only its own entries")


# ----------------------------------------------------------------------------------------------
# Rules: randomness

@rule("random_bits", "random_split", "random_unwrap")
def _random_keys_out(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    """Outputs of shape `keys.shape + extra`: per-example keys stay per-example."""
    keys = ins[0]
    if keys.batch is not None:
        return [Axis(keys.batch, keys.inner)]
    return [unbatched(origin=RANDOM if eqn.primitive.name == "random_bits" else keys.origin)]


@rule("random_wrap")
def _random_wrap(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    base, nd = ins[0], len(shape_of(eqn.invars[0]))
    if base.batch is None:
        return [unbatched(origin=base.origin)]
    if base.batch == nd - 1:
        raise Coupled("wraps key data along the batch axis")
    return [base]


@rule("rng_bit_generator", "rng_uniform")
def _rng(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    if any(i.batch is not None for i in ins):
        raise Opaque("with a per-example key has no batch-independence rule")
    return [unbatched(origin=RANDOM) for _ in eqn.outvars]


# ----------------------------------------------------------------------------------------------
# Rules: control flow

def join(ctx: Context, a: Axis, b: Axis, shape: Sequence[int]) -> Axis:
    """Least upper bound of two facts about one loop carry (or branch output)."""
    if a.batch is None and b.batch is None:
        return unbatched(a.const & b.const, a.origin or b.origin)
    batched = same_batch([a, b], "carries")
    for i in (a, b):
        align(ctx, i, shape, batched.batch)
    return Axis(batched.batch, batched.inner)


def _fixed_point(ctx: Context, body: Callable[[list[Axis]], list[Axis]], carry: list[Axis],
                 shapes: Sequence[Sequence[int]]) -> tuple[list[Axis], list[Axis]]:
    """Iterates `body` on the loop carries until their facts stop changing; returns (carry, outs)."""
    for _ in range(len(carry) + 2):
        outs = body(carry)
        new = [join(ctx, c, o, s) for c, o, s in zip(carry, outs, shapes)]
        if new == carry:
            return carry, outs
        carry = new
    raise Opaque("a loop whose carries never settle")


@rule("scan")
def _scan(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    p = eqn.params
    nc, ncar = p["num_consts"], p["num_carry"]
    consts, carry, xs = ins[:nc], ins[nc:nc + ncar], ins[nc + ncar:]
    slices = []
    for x in xs:
        if x.batch == 0:
            raise Coupled("loops over the batch axis 0: each step sees the examples before it "
                          "(e.g. a scan or a reverse cumulative sum over the batch)")
        slices.append(Axis(x.batch - 1, x.inner) if x.batch is not None
                      else unbatched({d - 1 for d in x.const if d > 0}, x.origin))
    shapes = [shape_of(v) for v in eqn.invars[nc:nc + ncar]]
    carry, outs = _fixed_point(
        ctx, lambda c: run_closed(ctx, p["jaxpr"], list(consts) + c + slices), list(carry), shapes)
    ys = [Axis(y.batch + 1, y.inner) if y.batch is not None
          else unbatched({d + 1 for d in y.const}, y.origin) for y in outs[ncar:]]
    return carry + ys


@rule("while")
def _while(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, carry = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
    shapes = [shape_of(v) for v in eqn.invars[cn + bn:]]
    carry, _ = _fixed_point(
        ctx, lambda c: run_closed(ctx, p["body_jaxpr"], list(bconsts) + c), list(carry), shapes)
    run_closed(ctx, p["cond_jaxpr"], list(cconsts) + carry)  # a reduction over the batch raises
    return carry


@rule("cond")
def _cond(ctx: Context, eqn: Any, ins: list[Axis]) -> list[Axis]:
    ops = ins[1:]
    outs = None
    for branch in eqn.params["branches"]:
        res = run_closed(ctx, branch, ops)
        outs = res if outs is None else [join(ctx, a, b, shape_of(v))
                                         for a, b, v in zip(outs, res, eqn.outvars)]
    return outs
