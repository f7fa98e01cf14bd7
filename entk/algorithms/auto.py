"""`implementation="auto"` before the cost model: a rule from the asymptotic costs of Novak et al. (2022).

With P parameters, O outputs per example (after trace/diagonal reduction counted per the request) and a
forward pass costing ~P multiply-adds per example:
- JC  ≈ (N1 + N2)·O·P  (Jacobians)  +  N1·N2·O_kept·P  (contraction; traced axes fold into it),
- NTVP ≈ N2·O·(N1 + 1)·P  (one VJP of one example and one JVP of the x1 batch per column).
Structured derivatives are preferred whenever the model supports them: they never cost more than JC's
contraction and are usually orders of magnitude cheaper. The calibrated cost model in
`entk.algorithms.cost` (when present) replaces this rule.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from entk.algorithms import Strategy, concrete_strategies

PyTree = Any


def simple_rule(n1: int, n2: int, out_per_example: int, kept_per_pair: int, n_params: int,
                available: Iterable[Strategy]) -> Strategy:
    """Picks a strategy from sizes alone (see module docstring)."""
    available = set(available)
    if Strategy.STRUCTURED_DERIVATIVES in available:
        return Strategy.STRUCTURED_DERIVATIVES
    jc = (n1 + n2) * out_per_example * n_params + n1 * n2 * kept_per_pair * n_params
    ntvp = n2 * out_per_example * (n1 + 1) * n_params
    if Strategy.NTK_VECTOR_PRODUCTS in available and (
            ntvp < jc or Strategy.JACOBIAN_CONTRACTION not in available):
        return Strategy.NTK_VECTOR_PRODUCTS
    return Strategy.JACOBIAN_CONTRACTION


def choose(capabilities: Iterable[str], *, n1: int, n2: int, out_shapes: list[tuple[int, ...]],
           kept_sizes: list[int], n_params: int) -> Strategy:
    """The strategy `"auto"` runs, among the registered ones the model supports."""
    allowed = {s for s in concrete_strategies() if s.short_name in set(capabilities)}
    if not allowed:
        raise ValueError(f"No registered strategy is supported by this model "
                         f"(capabilities={sorted(capabilities)}).")
    per_example = sum(math.prod(s) for s in out_shapes) // max(n1, 1)
    kept = sum(kept_sizes) // max(n1 * n2, 1)
    return simple_rule(n1, n2, per_example, max(kept, 1), n_params, allowed)
