"""Cotangents ∂f/∂y at every parameter use, and the per-use tensors the rules build from them.

`f` is re-evaluated from its flat jaxpr with an additive perturbation `δ_s` on every output `y_s` of an
equation that uses a parameter (and on every model output that is a parameter view); the Jacobian of the
outputs with respect to the perturbations at `δ = 0` gives all cotangents `C_s[a, y] = ∂f_a/∂y_s` in one
reverse-mode sweep (forward mode if the graph has a `while` loop, which has no reverse rule). The same
evaluation records the operands of each using equation, from which the rules build their factors.

With `vmap_axes` this runs on one example and is `jax.vmap`ped over the batch, so every tensor gets a
leading example axis `E` and the cotangents are per example: `out_ex × y_ex` instead of `out × y`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jex

from .graph import SCAN_UNROLL_LIMIT, Side, eval_eqn
from .rules import IDENTITY_RULE, Plan, rule_for
from .views import Analysis, Use, is_float


@dataclasses.dataclass
class PlannedUse:
    """A use with the rule that handles it and that rule's plan."""

    use: Use
    rule: Any
    plan: Plan


@dataclasses.dataclass
class UseTensors:
    """Per-use tensors of one side: `cts[leaf]` (prepared cotangent, None for non-float outputs) of shape
    `[E?] + out_leaf + y_fine`, and the rule's factor / index tensors, each `[E?] + ...`."""

    cts: list
    factors: list


def plan_uses(side: Side, analysis: Analysis) -> tuple[list[PlannedUse], dict[str, str]]:
    """Picks a rule for every use; also returns {primitive name: description} of generic fallbacks."""
    eqns = side.jaxpr.jaxpr.eqns
    planned, fallbacks = [], {}
    for use in analysis.uses:
        if use.eqn is None:
            shape = use.view.shape
            planned.append(PlannedUse(use, IDENTITY_RULE, IDENTITY_RULE.plan_for_shape(shape)))
            continue
        eqn = eqns[use.eqn]
        rule, plan = rule_for(eqn, use.operand)
        if rule.warns:
            shapes = ", ".join(str(tuple(a.aval.shape)) for a in eqn.invars)
            why = (f"; scans longer than {SCAN_UNROLL_LIMIT} steps are not unrolled"
                   if eqn.primitive.name == "scan" else "")
            fallbacks.setdefault(eqn.primitive.name, f"operand {use.operand} of "
                                 f"{eqn.primitive.name}({shapes}){why}")
        planned.append(PlannedUse(use, rule, plan))
    return planned, fallbacks


def _evaluate(jaxpr: jex.Jaxpr, consts: Sequence[Any], inputs: Sequence[Any], analysis: Analysis,
              deltas: Sequence[Any]) -> tuple[list, dict]:
    """Runs the flat jaxpr with perturbations added at the slots; records the using equations' operands."""
    env: dict = {}

    def read(a: Any) -> Any:
        return a.val if isinstance(a, jex.Literal) else env[a]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, x in zip(jaxpr.invars, inputs):
        env[v] = x
    recorded: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(a) for a in eqn.invars]
        outs = eval_eqn(eqn, invals)
        if i in analysis.recorded_eqns:
            recorded[i] = invals
            for pos in range(len(outs)):
                s = analysis.slot_index(i, pos)
                if s is not None:
                    outs[pos] = outs[pos] + deltas[s]
        for v, o in zip(eqn.outvars, outs):
            if not isinstance(v, jex.DropVar):
                env[v] = o
    outs = [read(a) for a in jaxpr.outvars]
    for j in range(len(outs)):
        s = analysis.slot_index(None, j)
        if s is not None:
            outs[j] = outs[j] + deltas[s]
    return outs, recorded


def side_tensors(side: Side, analysis: Analysis, planned: list[PlannedUse],
                 param_leaves: Sequence[Any]) -> list[UseTensors]:
    """Prepared cotangents and factors of every planned use, stacked over examples with vmap."""
    closed = side.jaxpr
    eqns = closed.jaxpr.eqns
    float_leaves = [j for j, dt in enumerate(side.out_dtypes) if is_float(dt)]
    n_leaves = len(side.out_dtypes)

    def compute(args: Sequence[Any]) -> list:
        inputs = list(param_leaves) + list(args)

        def perturbed(deltas: list) -> tuple[list, dict]:
            outs, recorded = _evaluate(closed.jaxpr, closed.consts, inputs, analysis, deltas)
            return [outs[j] for j in float_leaves], recorded

        zeros = [jnp.zeros(a.shape, a.dtype) for a in analysis.slot_avals]
        transform = jax.jacfwd if analysis.forward_mode else jax.jacrev
        jac, recorded = transform(perturbed, has_aux=True)(zeros)
        by_leaf = dict(zip(float_leaves, jac))

        results = []
        for pu in planned:
            use, rule, plan = pu.use, pu.rule, pu.plan
            cts: list = [None] * n_leaves
            if use.eqn is None:
                s = analysis.slot_index(None, use.operand)
                for j, c in by_leaf.items():
                    cts[j] = IDENTITY_RULE.prepare_output(c[s])
                results.append((cts, []))
                continue
            eqn = eqns[use.eqn]
            ops = recorded[use.eqn]
            slots = [analysis.slot_index(use.eqn, pos) for pos in range(len(eqn.outvars))]
            for j, c in by_leaf.items():
                n_lead = len(side_leaf_shape(side, j))
                eq_cts = [None if s is None else c[s] for s in slots]
                cts[j] = rule.prepare(plan, eqn, use.operand, eq_cts, n_lead, ops)
            results.append((cts, rule.factors(plan, eqn, use.operand, ops)))
        return results

    if side.vmapped:
        results = jax.vmap(compute, in_axes=(list(side.arg_axes),))(side.args)
    else:
        results = compute(side.args)
    return [UseTensors(list(cts), list(factors)) for cts, factors in results]


def side_leaf_shape(side: Side, j: int) -> tuple[int, ...]:
    """Shape of output leaf `j` as the jaxpr produces it (per example with vmap)."""
    return tuple(side.jaxpr.jaxpr.outvars[j].aval.shape)
