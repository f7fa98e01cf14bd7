"""Per-primitive structured-derivative rules and the lookup that picks one for a use.

`rule_for(eqn, k)` returns the rule and its plan for operand `k` of `eqn`: a factorised rule when one
covers the case (`dot_general`, convolution kernels, element-wise ops, `reduce_sum`, `gather`), the
linear rule (one VJP, no warning) for other primitives linear in that operand, and otherwise the generic
Jacobian rule, which the caller reports with a warning naming the primitive.
"""

from __future__ import annotations

from jax.extend import core as jex

from .base import GenericRule, IdentityRule, Plan, Rule
from .dense import ConvKernelRule, DotGeneralRule
from .indexing import LINEAR, LINEAR_RULE, GatherRule
from .pointwise import ELEMENTWISE, ElementwiseRule, ReduceSumRule

GENERIC_RULE = GenericRule("generic", warns=True)
IDENTITY_RULE = IdentityRule()

_RULES: dict[str, Rule] = {
    "dot_general": DotGeneralRule(),
    "conv_general_dilated": ConvKernelRule(),
    "gather": GatherRule(),
    "reduce_sum": ReduceSumRule(),
}
_ELEMENTWISE_RULE = ElementwiseRule()


def rule_for(eqn: jex.JaxprEqn, k: int) -> tuple[Rule, Plan]:
    """The rule and plan for the use of operand `k` of `eqn` (see module docstring)."""
    name = eqn.primitive.name
    rule = _RULES.get(name) or (_ELEMENTWISE_RULE if name in ELEMENTWISE else None)
    if rule is not None:
        plan = rule.plan(eqn, k)
        if plan is not None:
            return rule, plan
    fallback = LINEAR_RULE if name in LINEAR else GENERIC_RULE
    return fallback, fallback.plan(eqn, k)


__all__ = ["Plan", "Rule", "rule_for", "GENERIC_RULE", "IDENTITY_RULE", "LINEAR_RULE"]
