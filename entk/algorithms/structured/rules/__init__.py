"""Per-primitive structured-derivative rules and the lookup that picks one for a use.

Each rule registers the primitives it handles beside its code (`@register(...)` in `base.py`, as the
torch adapter's ATen ops do): a new rule is one class in one of these modules (or a new module imported
below) plus its tests.

`rule_for(eqn, k)` returns the rule and its plan for operand `k` of `eqn`: a factorised rule when one
covers the case (`dot_general`, convolution kernels, element-wise ops, `reduce_sum`, `gather`), the
linear rule (one VJP, no warning) for other primitives linear in that operand, and otherwise the generic
Jacobian rule, which the caller reports with a warning naming the primitive.
"""

from __future__ import annotations

from jax.extend import core as jex

# The rule modules register their rules when imported.
from . import dense, indexing, pointwise  # noqa: F401
from .base import GenericRule, IdentityRule, Plan, Rule, registered
from .indexing import LINEAR_RULE

GENERIC_RULE = GenericRule("generic", warns=True)
IDENTITY_RULE = IdentityRule()


def rule_for(eqn: jex.JaxprEqn, k: int) -> tuple[Rule, Plan]:
    """The rule and plan for the use of operand `k` of `eqn` (see module docstring)."""
    rule, fallback = registered(eqn.primitive.name)
    if rule is not None:
        plan = rule.plan(eqn, k)
        if plan is not None:
            return rule, plan
    fallback = fallback or GENERIC_RULE
    return fallback, fallback.plan(eqn, k)


__all__ = ["Plan", "Rule", "rule_for", "GENERIC_RULE", "IDENTITY_RULE", "LINEAR_RULE"]
