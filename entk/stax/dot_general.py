"""`DotGeneral`: `jax.lax.dot_general` of the activations with a constant array, and its kernel.

The layer computes `dot_general(x, rhs)` or `dot_general(lhs, x)` with a fixed array, a linear map
`T` of the non-channel axes (pooling, permutations, masks, fixed spatial mixing, ...). Its kernel
takes `T` on both sides of every kernel entry,

    K'[n1, n2, o, o'] = Σ_{i, i'} T[o, i]·T[o', i']·K[n1, n2, i, i'],

computed by applying the layer's own `dot_general` twice: once to the kernel arranged as an
activation whose spatial axes are the x1 side (the x2 side folded into the channel axis), once to
the result arranged with the x2 side's axes. entk kernels keep the batch axis first and the
channel axis last, so the output of `dot_general` must too: the batch axis of `x` must come out
first (free, or as the first dot batch dimension) and its channel axis last (never contracted).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from entk.stax.kernel import Kernel, Layer, check_default_axes, expect_single, layer

Array = jax.Array


def _output_origins(n_x: int, n_other: int, dimension_numbers, x_is_lhs: bool) -> list:
    """`dot_general`'s output axes as `("x", axis)` / `("other", axis)`: batch dims, then the
    lhs's free dims, then the rhs's."""
    (lc, rc), (lb, rb) = dimension_numbers
    n_lhs, n_rhs = (n_x, n_other) if x_is_lhs else (n_other, n_x)
    lc, rc = [a % n_lhs for a in lc], [a % n_rhs for a in rc]
    lb, rb = [a % n_lhs for a in lb], [a % n_rhs for a in rb]
    lhs_name, rhs_name = ("x", "other") if x_is_lhs else ("other", "x")
    out = [(lhs_name, a) if x_is_lhs else (rhs_name, b) for a, b in zip(lb, rb)]
    out += [(lhs_name, a) for a in range(n_lhs) if a not in lc + lb]
    out += [(rhs_name, a) for a in range(n_rhs) if a not in rc + rb]
    return out


def DotGeneral(*, lhs: Any = None, rhs: Any = None,
               dimension_numbers=(((), ()), ((), ())), precision: Any = None,
               batch_axis: int = 0, channel_axis: int = -1) -> Layer:
    """`lax.dot_general(x, rhs, dimension_numbers, precision)` (or `(lhs, x)`) with a constant.

    At most one of `lhs` / `rhs` may be given (neither: the identity). The kernel needs the output
    batch-first and channels-last (module docstring); other layouts raise `NotImplementedError`.
    """
    if lhs is not None and rhs is not None:
        raise ValueError("DotGeneral: pass at most one of lhs and rhs; the layer's inputs are the "
                         "other factor.")
    name = "DotGeneral"
    check_default_axes(name, batch_axis, channel_axis)
    x_is_lhs = lhs is None
    other = None if (lhs is None and rhs is None) else np.asarray(rhs if x_is_lhs else lhs)

    def dot(x: Array) -> Array:
        if other is None:
            return x
        c = jnp.asarray(other, x.dtype)
        args = (x, c) if x_is_lhs else (c, x)
        return lax.dot_general(*args, dimension_numbers, precision=precision)

    def check_layout(ndim: int) -> None:
        origins = _output_origins(ndim, other.ndim, dimension_numbers, x_is_lhs)
        if origins[0] != ("x", 0) or origins[-1] != ("x", ndim - 1):
            raise NotImplementedError(
                f"{name}: with dimension_numbers={dimension_numbers} the output axes come from "
                f"{origins} (input axis 0 is the batch, {ndim - 1} the channels); entk's kernels "
                f"need the batch axis first and the channel axis last in the output.")

    def init_fn(rng, input_shape):
        del rng
        out = jax.eval_shape(dot, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
        return out.shape, ()

    def apply_fn(params, x, **kwargs):
        del params, kwargs
        return dot(x)

    def apply_to_leading(act: Array, d: int) -> tuple[Array, int]:
        """`dot` on `act = (b, S_1..S_d, rest...)`, `rest` folded into the channel axis:
        returns `(b, O..., rest...)` and the number of output spatial axes."""
        rest = act.shape[1 + d:]
        y = dot(act.reshape(act.shape[:1 + d] + (-1,)))
        return y.reshape(y.shape[:-1] + rest), y.ndim - 2

    def both_sides(mat: Array | None, n_batch_axes: int) -> Array | None:
        """`T` on the x1 side, then on the x2 side, of a kernel matrix (module docstring)."""
        if mat is None:
            return None
        d = (mat.ndim - n_batch_axes) // 2
        s1 = list(range(n_batch_axes, mat.ndim, 2))
        s2 = list(range(n_batch_axes + 1, mat.ndim, 2))
        if n_batch_axes == 2:
            y, e = apply_to_leading(jnp.transpose(mat, [0] + s1 + [1] + s2), d)
            # y: (b1, O1..., b2, S2...) -> (b2, S2..., b1, O1...)
            y = jnp.transpose(y, [1 + e] + list(range(2 + e, 2 + e + d)) + [0]
                              + list(range(1, 1 + e)))
            z, _ = apply_to_leading(y, d)  # (b2, O2..., b1, O1...)
            order = [1 + e, 0] + [a for i in range(e) for a in (2 + e + i, 1 + i)]
        else:
            y, e = apply_to_leading(jnp.transpose(mat, [0] + s1 + s2), d)  # (b, O1..., S2...)
            y = jnp.transpose(y, [0] + list(range(1 + e, 1 + e + d)) + list(range(1, 1 + e)))
            z, _ = apply_to_leading(y, d)  # (b, O2..., O1...)
            order = [0] + [a for i in range(e) for a in (1 + e + i, 1 + i)]
        return jnp.transpose(z, order)

    def transform(k: Kernel, **kwargs) -> Kernel:
        k = expect_single(k, name)
        if other is None:
            return k
        check_layout(len(k.shape1))

        shape1 = jax.eval_shape(dot, jax.ShapeDtypeStruct(k.shape1, jnp.float32)).shape
        shape2 = jax.eval_shape(dot, jax.ShapeDtypeStruct(k.shape2, jnp.float32)).shape
        return k.replace(nngp=both_sides(k.nngp, 2), ntk=both_sides(k.ntk, 2),
                         cov1=both_sides(k.cov1, 1), cov2=both_sides(k.cov2, 1),
                         shape1=tuple(shape1), shape2=tuple(shape2))

    return layer(name, init_fn, apply_fn, transform)
