"""The contract of a structured-derivative rule, and the generic (Jacobian) rule every other one falls back to.

For a use (equation `y = op(..., v, ...)` consuming a parameter view `v` through operand `k`), the
parameter Jacobian of that use is `J[a, v] = Σ_y C[a, y] ∂y/∂v`, with `C[a, y] = ∂f_a/∂y` the cotangent.
A rule writes `J` as an einsum of small tensors instead of forming it:

    J[a, v_fine] = einsum(C'[a, y_labels], F_1[labels_1], ..., onehot(ids_1)[in_1, v_l1], ...)

where `C'` is the cotangent rearranged by `prepare` (transposed / reshaped; or, for the generic rule,
`J` itself), `F_i` are factor tensors built from the other operands (the input of a dense layer, the
patches of a convolution, a derivative), and `ids_i` are integer index tensors (which embedding row each
position reads). `v_fine` is `v`'s shape, possibly with dimensions split (`v.reshape(v_fine)` is the same
data). Labels are small ints local to the plan; `0 .. len(v_fine)-1` name the dimensions of `v_fine`.

A kernel term between two uses with the same parameter view and the same `v_fine` is then one einsum over
both sides' tensors, whose contraction order `opt_einsum` picks by FLOP count: e.g. for a dense layer
(C₁C₂ᵀ)⊙(x₁x₂ᵀ) when that is cheaper than J₁J₂ᵀ.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence, TypeVar

import jax
import jax.numpy as jnp
from jax.extend import core as jex

from ..graph import eval_eqn, is_float


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of one use's factorisation (see module docstring).

    Attributes:
      rule: name of the rule (for messages and grouping).
      v_fine: shape of the Jacobian's parameter part (a refinement of the operand's shape).
      y_labels: labels of the trailing (non-output) dimensions of the prepared cotangent.
      factor_labels: labels of each factor tensor.
      index_labels: for each index tensor, `(labels of its dims, v label it selects along)`.
      signature: hashable rule-specific data; uses with equal plans can be stacked and summed.
    """

    rule: str
    v_fine: tuple[int, ...]
    y_labels: tuple[int, ...]
    factor_labels: tuple[tuple[int, ...], ...] = ()
    index_labels: tuple[tuple[tuple[int, ...], int], ...] = ()
    signature: tuple = ()

    @property
    def n_v(self) -> int:
        return len(self.v_fine)


class Rule(Protocol):
    """A structured-derivative rule for one primitive (or family of primitives)."""

    name: str
    warns: bool

    def plan(self, eqn: jex.JaxprEqn, k: int) -> Plan | None:
        """The factorisation for operand `k` of `eqn`, or None if this case is not covered."""

    def prepare(self, plan: Plan, eqn: jex.JaxprEqn, k: int, cts: Sequence[Any], n_lead: int,
                ops: Sequence[Any]) -> jax.Array:
        """The tensor `C'` of shape `lead + sizes(y_labels)`.

        `cts[j]` is the cotangent of output `j` of `eqn`, shape `lead + out_j.shape` (None where zero);
        `ops` are the operand values.
        """

    def factors(self, plan: Plan, eqn: jex.JaxprEqn, k: int, ops: Sequence[Any]) -> list:
        """The factor tensors, then the index tensors, in plan order."""


def shape_signature(eqn: jex.JaxprEqn) -> tuple:
    """Shapes and dtypes of every operand and result: part of every plan's signature."""
    return tuple((tuple(a.aval.shape), str(a.aval.dtype)) for a in (*eqn.invars, *eqn.outvars))


def substitute(ops: Sequence[Any], k: int, value: Any) -> list:
    ops = list(ops)
    ops[k] = value
    return ops


# ----------------------------------------------------------------------------------------------
# Registration: each rule registers the primitives it handles beside its code (`@register(...)`), as
# the ATen ops of the torch adapter do; `rules.rule_for` looks them up here.

_FACTORISED: dict[str, Rule] = {}  # primitive name -> its factorised rule (tried first)
_FALLBACK: dict[str, Rule] = {}    # primitive name -> the rule used when that declines (else generic)

_R = TypeVar("_R")


def register(*primitives: str, fallback: bool = False) -> Callable[[_R], _R]:
    """Decorator: the rule (a class, instantiated once, or an instance) handles `primitives`.

    `fallback=True`: used for these primitives only when their factorised rule declines the use (or
    there is none), instead of the generic rule and its warning (e.g. the linear rule).
    """
    table = _FALLBACK if fallback else _FACTORISED

    def decorate(rule: _R) -> _R:
        instance = rule() if isinstance(rule, type) else rule
        for name in primitives:
            if name in table:
                raise ValueError(f"Primitive {name!r} already has a structured-derivative "
                                 f"{'fallback ' if fallback else ''}rule ({table[name].name}).")
            table[name] = instance
        return rule

    return decorate


def registered(name: str) -> tuple[Rule | None, Rule | None]:
    """`(factorised rule, fallback rule)` registered for primitive `name` (None where there is none)."""
    return _FACTORISED.get(name), _FALLBACK.get(name)


class GenericRule:
    """Forms `J = Σ_y C ∂y/∂v` explicitly with one VJP of the equation per output direction.

    Correct for any primitive (forward mode for `while`, which has no reverse rule); costs the size of
    the full Jacobian of this parameter, as in Jacobian contraction.
    """

    def __init__(self, name: str = "generic", warns: bool = True):
        self.name = name
        self.warns = warns

    def plan(self, eqn: jex.JaxprEqn, k: int) -> Plan:
        shape = tuple(eqn.invars[k].aval.shape)
        return Plan(self.name, shape, tuple(range(len(shape))),
                    signature=(eqn.primitive.name, k, shape_signature(eqn)))

    def prepare(self, plan: Plan, eqn: jex.JaxprEqn, k: int, cts: Sequence[Any], n_lead: int,
                ops: Sequence[Any]) -> jax.Array:
        present = [c for c in cts if c is not None]
        lead = present[0].shape[:n_lead]
        v = ops[k]
        positions = [j for j, o in enumerate(eqn.outvars) if is_float(o.aval.dtype)]

        def g(value: Any) -> list:
            outs = eval_eqn(eqn, substitute(ops, k, value))
            return [outs[j] for j in positions]

        flat_cts = []
        for j in positions:
            o = eqn.outvars[j].aval
            c = cts[j] if cts[j] is not None else jnp.zeros(lead + tuple(o.shape), o.dtype)
            flat_cts.append(c.reshape((-1,) + tuple(o.shape)))
        if eqn.primitive.name == "while":
            jac = jax.jacfwd(g)(v)
            total = None
            for c, jj in zip(flat_cts, jac):
                n_y = c.ndim - 1
                term = jnp.tensordot(c, jj, axes=(tuple(range(1, 1 + n_y)), tuple(range(n_y))))
                total = term if total is None else total + term
        else:
            _, vjp = jax.vjp(g, v)
            total = jax.vmap(lambda *c: vjp(list(c))[0])(*flat_cts)
        return total.reshape(lead + tuple(v.shape))

    def factors(self, plan: Plan, eqn: jex.JaxprEqn, k: int, ops: Sequence[Any]) -> list:
        return []


# A `custom_jvp` / `custom_vjp` function of a parameter: differentiated by its own rule (the generic
# Jacobian, through JAX's VJP of the call), without the generic rule's warning: the custom rule is the
# derivative the model asks for (see `graph.py`).
CUSTOM_RULE = register("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", fallback=True)(
    GenericRule("custom rule", warns=False))


class IdentityRule:
    """A model output that is itself a parameter view: `J = C`."""

    name = "identity"
    warns = False

    def plan_for_shape(self, shape: tuple[int, ...]) -> Plan:
        return Plan(self.name, shape, tuple(range(len(shape))), signature=(shape,))

    def prepare_output(self, ct: jax.Array) -> jax.Array:
        return ct
