"""Rules for the bilinear primitives: `dot_general` (parameter in either operand) and
`conv_general_dilated` (parameter as kernel, any dimension numbers, strides, padding, dilations and
feature groups).

dot_general, parameter `v` against data `x`: `J[a, v] = Σ_{x-free} C[a, y] x[...]`, one factor.
Convolution kernel: `y[n, p, g, o] = Σ_{i, k} patches[n, p, g, i, k] · w[g, o, i, k]`, so
`J[a, w] = Σ_{n, p} C[a, n, p, g, o] · patches[n, p, g, i, k]` with the patches of the input (the
transposed-convolution case is the same with input dilation), the output-feature dimension split into
(group, feature-in-group). A parameter used as a convolution's *input* goes to the linear rule.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex

from .base import Plan, register, shape_signature


class _Labels:
    def __init__(self, start: int):
        self.next = start

    def new(self) -> int:
        self.next += 1
        return self.next - 1


@register("dot_general")
class DotGeneralRule:
    name = "dot_general"
    warns = False

    def plan(self, eqn: jex.JaxprEqn, k: int) -> Plan | None:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = (tuple(a.aval.shape) for a in eqn.invars)
        if k == 0:
            v_shape, x_shape, vc, xc, vb, xb = lhs, rhs, lc, rc, lb, rb
        else:
            v_shape, x_shape, vc, xc, vb, xb = rhs, lhs, rc, lc, rb, lb
        n_v = len(v_shape)
        labels = _Labels(n_v)
        x_labels = []
        for j in range(len(x_shape)):
            if j in xc:
                x_labels.append(vc[list(xc).index(j)])
            elif j in xb:
                x_labels.append(vb[list(xb).index(j)])
            else:
                x_labels.append(labels.new())
        v_free = [d for d in range(n_v) if d not in vc and d not in vb]
        x_free = [x_labels[j] for j in range(len(x_shape)) if j not in xc and j not in xb]
        batch = list(vb)
        y_labels = batch + (v_free + x_free if k == 0 else x_free + v_free)
        return Plan(self.name, v_shape, tuple(y_labels), (tuple(x_labels),),
                    signature=(k, shape_signature(eqn)))

    def prepare(self, plan, eqn, k, cts, n_lead, ops):
        return cts[0]

    def factors(self, plan, eqn, k, ops):
        return [ops[1 - k]]


@register("conv_general_dilated")
class ConvKernelRule:
    """`conv_general_dilated` with the parameter as kernel (operand 1)."""

    name = "conv_general_dilated"
    warns = False

    def plan(self, eqn: jex.JaxprEqn, k: int) -> Plan | None:
        p = eqn.params
        if k != 1 or p["batch_group_count"] != 1:
            return None
        dn = p["dimension_numbers"]
        rhs = tuple(eqn.invars[1].aval.shape)
        groups = p["feature_group_count"]
        o_dim, i_dim, spatial = dn.rhs_spec[0], dn.rhs_spec[1], tuple(dn.rhs_spec[2:])
        n_out_feat = rhs[o_dim]
        if n_out_feat % groups:
            return None
        # v_fine: the kernel's dims in array order, output-feature dim split into (group, feature).
        v_fine, pos = [], {}
        for d, size in enumerate(rhs):
            if d == o_dim:
                pos["g"], pos["o"] = len(v_fine), len(v_fine) + 1
                v_fine += [groups, n_out_feat // groups]
            else:
                pos[d] = len(v_fine)
                v_fine.append(size)
        labels = _Labels(len(v_fine))
        n_label = labels.new()
        out_spatial = [labels.new() for _ in dn.out_spec[2:]]
        y_labels = (n_label, *out_spatial, pos["g"], pos["o"])
        patch_labels = (n_label, *out_spatial, pos["g"], pos[i_dim], *(pos[d] for d in spatial))
        sig = (shape_signature(eqn), tuple(sorted((key, str(val)) for key, val in p.items())))
        return Plan(self.name, tuple(v_fine), y_labels, (patch_labels,), signature=sig)

    @staticmethod
    def _to_canonical(t: jax.Array, out_spec: Sequence[int], n_lead: int) -> jax.Array:
        """`t[lead..., out layout]` -> `t[lead..., N, spatial..., features]`."""
        perm = (out_spec[0], *out_spec[2:], out_spec[1])
        return jnp.transpose(t, tuple(range(n_lead)) + tuple(n_lead + d for d in perm))

    def prepare(self, plan, eqn, k, cts, n_lead, ops):
        dn = eqn.params["dimension_numbers"]
        c = self._to_canonical(cts[0], dn.out_spec, n_lead)
        groups = eqn.params["feature_group_count"]
        return c.reshape(c.shape[:-1] + (groups, c.shape[-1] // groups))

    def factors(self, plan, eqn, k, ops):
        p = eqn.params
        dn = p["dimension_numbers"]
        lhs, rhs = ops
        spatial = [rhs.shape[d] for d in dn.rhs_spec[2:]]
        patches = lax.conv_general_dilated_patches(
            lhs, spatial, p["window_strides"], p["padding"], lhs_dilation=p["lhs_dilation"],
            rhs_dilation=p["rhs_dilation"], dimension_numbers=dn,
            precision=lax.Precision.HIGHEST)
        patches = self._to_canonical(patches, dn.out_spec, 0)
        groups = p["feature_group_count"]
        in_per_group = rhs.shape[dn.rhs_spec[1]]
        return [patches.reshape(patches.shape[:-1] + (groups, in_per_group, *spatial))]
