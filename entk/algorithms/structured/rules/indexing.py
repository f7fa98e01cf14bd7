"""Rules for indexing: `gather` (embedding lookups), and the linear primitives whose Jacobian is formed
directly by one VJP (`dynamic_slice` at a traced position, `concatenate` / `pad` mixed with activations,
a convolution whose *input* is the parameter, ...).

gather with whole-row windows: `y[b, off] = v[ids(b), off]`, so `J[a, v] = Σ_b C[a, b, off] · [ids(b) = row]`.
The one-hot matrix is never formed for a kernel term between two lookups of the same table: their
contraction over the table rows is the equality matrix `[ids₁(b₁) = ids₂(b₂)]` (see `contract.py`), so an
embedding costs (positions₁ × positions₂ × width), independent of the vocabulary size.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex

from .base import GenericRule, Plan, register, shape_signature

_CLIP_MODES = (lax.GatherScatterMode.CLIP, lax.GatherScatterMode.PROMISE_IN_BOUNDS)


@register("gather")
class GatherRule:
    name = "gather"
    warns = False

    def plan(self, eqn: jex.JaxprEqn, k: int) -> Plan | None:
        if k != 0:
            return None
        p = eqn.params
        dn = p["dimension_numbers"]
        mode = p["mode"]
        v_shape = tuple(eqn.invars[0].aval.shape)
        idx_shape = tuple(eqn.invars[1].aval.shape)
        out_rank = len(eqn.outvars[0].aval.shape)
        collapsed = tuple(dn.collapsed_slice_dims)
        if (dn.operand_batching_dims or dn.start_indices_batching_dims
                or set(dn.start_index_map) != set(collapsed)
                or mode not in (*_CLIP_MODES, lax.GatherScatterMode.FILL_OR_DROP)):
            return None
        for d, size in enumerate(p["slice_sizes"]):
            if size != (1 if d in collapsed else v_shape[d]):
                return None
        n_v = len(v_shape)
        batch_labels = tuple(range(n_v, n_v + len(idx_shape) - 1))
        non_collapsed = [d for d in range(n_v) if d not in collapsed]
        offset_dims = list(dn.offset_dims)
        y_labels, b = [], iter(batch_labels)
        for o in range(out_rank):
            y_labels.append(non_collapsed[offset_dims.index(o)] if o in offset_dims else next(b))
        index_labels = tuple((batch_labels, d) for d in dn.start_index_map)
        return Plan(self.name, v_shape, tuple(y_labels), index_labels=index_labels,
                    signature=(shape_signature(eqn), str(mode), tuple(dn.start_index_map),
                               tuple(offset_dims)))

    def prepare(self, plan, eqn, k, cts, n_lead, ops):
        return cts[0]

    def factors(self, plan, eqn, k, ops):
        v, indices = ops[0], ops[1]
        clip = eqn.params["mode"] in _CLIP_MODES
        out = []
        for j, d in enumerate(eqn.params["dimension_numbers"].start_index_map):
            ids = indices[..., j].astype(jnp.int32)
            size = v.shape[d]
            if clip:
                ids = jnp.clip(ids, 0, size - 1)
            else:
                ids = jnp.where((ids >= 0) & (ids < size), ids, -1)
            out.append(ids)
        return out


LINEAR_RULE = register(
    "dynamic_slice", "dynamic_update_slice", "concatenate", "stack", "pad", "gather", "scatter-add",
    "scatter_add", "scatter", "conv_general_dilated", "transpose", "reshape", "broadcast_in_dim",
    "squeeze", "expand_dims", "slice", "rev", "reduce_window_sum", "select_and_gather_add", "copy",
    "copy_p", "convert_element_type", "device_put", "sharding_constraint", "dot_general",
    "reduce_sum", "cumsum", fallback=True,
)(GenericRule("linear", warns=False))
"""For primitives linear in each floating operand, when no factorised rule applies: their Jacobian is
one VJP, no warning needed."""
