"""Rules for element-wise primitives and `reduce_sum`.

Element-wise `y = op(..., v, ...)` has a diagonal Jacobian: `J[a, v] = C[a, v] · d[v]` with
`d = ∂y/∂v` (one JVP with a tangent of ones; no factor at all for `add`/`sub`/`neg`). A scalar
parameter broadcast into the operation (`s * x`) gets `J[a] = Σ_y C[a, y] d[y]`.
`reduce_sum`: `J[a, v] = C[a, y(v)]`, written with a ones factor over the reduced dimensions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend import core as jex

from ..graph import eval_eqn, is_float
from .base import Plan, register, shape_signature, substitute

_SIGNED = {"add": 1, "add_any": 1, "sub": 1, "neg": -1, "convert_element_type": 1, "copy": 1,
           "copy_p": 1}

@register(
    *_SIGNED,
    "mul", "div", "max", "min", "pow", "integer_pow", "exp", "exp2", "log", "log1p", "expm1", "tanh",
    "logistic", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh",
    "sqrt", "rsqrt", "cbrt", "abs", "sign", "floor", "ceil", "round", "square", "erf", "erfc",
    "erf_inv", "lgamma", "digamma", "atan2", "rem", "select_n", "clamp", "reduce_precision",
    "nextafter",
)
class ElementwiseRule:
    name = "elementwise"
    warns = False

    def plan(self, eqn: jex.JaxprEqn, k: int) -> Plan | None:
        if len(eqn.outvars) != 1 or not is_float(eqn.outvars[0].aval.dtype):
            return None
        v_shape = tuple(eqn.invars[k].aval.shape)
        y_shape = tuple(eqn.outvars[0].aval.shape)
        name = eqn.primitive.name
        if len(v_shape) not in (0, len(y_shape)):
            return None
        # Size-1 (or rank-0) operands broadcast implicitly: their broadcast dims are summed over.
        padded = v_shape if v_shape else (1,) * len(y_shape)
        v_fine, y_labels = [], []
        fresh = sum(1 for a, b in zip(padded, y_shape) if not (a == 1 and b != 1))
        for a, b in zip(padded, y_shape):
            if a == b:
                y_labels.append(len(v_fine))
                v_fine.append(a)
            elif a == 1:
                y_labels.append(fresh)
                fresh += 1
            else:
                return None
        if not v_shape:
            v_fine, y_labels = [], list(range(len(y_shape)))
        v_fine, y_labels = tuple(v_fine), tuple(y_labels)
        sign = _SIGNED.get(name)
        if sign is not None:
            sign = -1 if name == "sub" and k == 1 else sign
            return Plan(self.name, v_fine, y_labels, signature=(sign, v_shape, y_shape))
        return Plan(self.name, v_fine, y_labels, (y_labels,),
                    signature=(name, k, shape_signature(eqn)))

    def prepare(self, plan, eqn, k, cts, n_lead, ops):
        sign = plan.signature[0]
        return -cts[0] if sign == -1 else cts[0]

    def factors(self, plan, eqn, k, ops):
        if not plan.factor_labels:
            return []
        v = ops[k]
        _, d = jax.jvp(lambda value: eval_eqn(eqn, substitute(ops, k, value))[0], (v,),
                       (jnp.ones_like(v),))
        return [d]


@register("reduce_sum")
class ReduceSumRule:
    name = "reduce_sum"
    warns = False

    def plan(self, eqn: jex.JaxprEqn, k: int) -> Plan | None:
        v_shape = tuple(eqn.invars[0].aval.shape)
        axes = tuple(sorted(a % max(len(v_shape), 1) for a in eqn.params["axes"]))
        kept = tuple(d for d in range(len(v_shape)) if d not in axes)
        return Plan(self.name, v_shape, kept, (axes,), signature=(v_shape, axes))

    def prepare(self, plan, eqn, k, cts, n_lead, ops):
        return cts[0]

    def factors(self, plan, eqn, k, ops):
        axes = plan.signature[1]
        v = ops[0]
        return [jnp.ones(tuple(v.shape[a] for a in axes), v.dtype)]
