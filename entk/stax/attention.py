"""`GlobalSelfAttention`: multi-head dot-product self-attention over all spatial positions, and its
infinite-width kernels (Hron et al. 2020, "Infinite attention"), with neural-tangents' conventions.

Finite layer, per head `h`, inputs `x` `(N, P, C)` (`P` positions flattened, `C` channels, plus
positional embeddings `e` if asked for):

    G_h = QK_std · (x W_Q^h)(x W_K^h)ᵀ / (C · d_k^α),   head_h = mech(G_h) · x W_V^h,
    y = OV_std · concat_h(head_h) W_out / √(d_v · H · C) + b_std · b

with `α = 1` and tied `W_Q = W_K` when `linear_scaling` (the only case with a closed form for
every mechanism), `α = ½` and independent weights otherwise; `QK_std = W_query_std·W_key_std`,
`OV_std = W_out_std·W_value_std`; `mech` is `softmax` (over the key positions), `identity`, `abs`
or `relu`.

Kernel (`Σ` the input covariance with positional embeddings mixed in, see `_mix`):

- `linear_scaling`: the attention weights converge to the deterministic `A = mech(QK_std·Σ(x, x))`
  per example, so `nngp' = OV_std²·A1 · nngp · A2ᵀ + b_std²` (`A` on the position axes of each
  side) and `ntk' = OV_std²·A1·ntk·A2ᵀ + 2·(nngp' − b_std²) + b_std²`;
- `identity` without linear scaling: fourth moments of Gaussians give
  `nngp' = (QK_std·OV_std)²·⟨Σ12, Σ12⟩·Σ12 + b_std²` (`⟨·,·⟩` summing over all position pairs), and
  the NTK from the product rule (`transform` below).
"""

from __future__ import annotations

import enum
import functools
import math
import string
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import random

from entk.stax import masking
from entk.stax.kernel import Kernel, Layer, check_default_axes, expect_single, layer

Array = jax.Array


class AttentionMechanism(enum.Enum):
    """The map applied to the attention logits (neural-tangents' names)."""

    SOFTMAX = "SOFTMAX"
    IDENTITY = "IDENTITY"
    ABS = "ABS"
    RELU = "RELU"

    def fn(self, x: Array, key_axes: tuple[int, ...]) -> Array:
        if self is AttentionMechanism.SOFTMAX:
            return jax.nn.softmax(x, axis=key_axes)
        return {AttentionMechanism.IDENTITY: lambda v: v, AttentionMechanism.ABS: jnp.abs,
                AttentionMechanism.RELU: jax.nn.relu}[self](x)


class PositionalEmbedding(enum.Enum):
    """How learned positional embeddings enter the keys/queries (and values): none, added to the
    inputs, or concatenated to their channels."""

    NONE = "NONE"
    SUM = "SUM"
    CONCAT = "CONCAT"


def _parse(enum_type: type, value, name: str, layer_name: str):
    try:
        return enum_type(value.name if isinstance(value, enum.Enum) else str(value).upper())
    except ValueError:
        raise ValueError(f"{layer_name}: {name}={value!r}; use one of "
                         f"{[m.value for m in enum_type]}.") from None


def positional_covariance(spatial_shape: tuple[int, ...], p_norm: float,
                          decay_fn: Callable[[Array], Array] | None) -> np.ndarray:
    """`R[a, a']` in kernel layout `(S_1, S_1', ..., S_d, S_d')`: `decay_fn(Σ_i |a_i − a'_i|^p)`,
    or the identity (one-hot embeddings) when `decay_fn` is `None`."""
    d = len(spatial_shape)
    if decay_fn is None:
        out = np.ones((1,) * (2 * d))
        for i, s in enumerate(spatial_shape):
            shape = [1] * (2 * d)
            shape[2 * i] = shape[2 * i + 1] = s
            out = out * np.eye(s).reshape(shape)
        return out
    dist = np.zeros((1,) * (2 * d))
    for i, s in enumerate(spatial_shape):
        shape = [1] * (2 * d)
        shape[2 * i] = shape[2 * i + 1] = s
        r = np.arange(s)
        dist = dist + (np.abs(r[:, None] - r[None, :]) ** p_norm).reshape(shape)
    with jax.ensure_compile_time_eval():  # a constant, also while kernel_fn is being traced
        return np.asarray(decay_fn(jnp.asarray(dist)))


def _zipped_to_matrix(r: np.ndarray) -> np.ndarray:
    """`(S_1, S_1', ..., S_d, S_d')` → `(P, P')` with `P = Π S_i`."""
    d = r.ndim // 2
    r = np.transpose(r, tuple(range(0, 2 * d, 2)) + tuple(range(1, 2 * d, 2)))
    size = int(np.prod(r.shape[:d]))
    return r.reshape(size, size)


def GlobalSelfAttention(n_chan_out: int, n_chan_key: int, n_chan_val: int, n_heads: int,
                        linear_scaling: bool = True, W_key_std: float = 1.0,
                        W_value_std: float = 1.0, W_query_std: float = 1.0,
                        W_out_std: float = 1.0, b_std: float | None = None,
                        attention_mechanism: str = "SOFTMAX", pos_emb_type: str = "NONE",
                        pos_emb_p_norm: float = 2, pos_emb_decay_fn: Callable | None = None,
                        n_chan_pos_emb: int | None = None, W_pos_emb_std: float = 1.0,
                        val_pos_emb: bool = False, batch_axis: int = 0,
                        channel_axis: int = -1) -> Layer:
    """Global self-attention (module docstring); arguments as neural-tangents'.

    Params `(W_Q (H, C_k, d_k) or None when tied, W_K (H, C_k, d_k), W_V (H, C_v, d_v),
    W_out (H·d_v, n_chan_out), b (1, ..., n_chan_out) or None, pos_emb (1, S..., C_pe) or None)`,
    with `C_k`/`C_v` the input channels plus the embedding channels for `"CONCAT"`.
    """
    name = f"GlobalSelfAttention({n_chan_out}, heads={n_heads})"
    check_default_axes(name, batch_axis, channel_axis)
    mech = _parse(AttentionMechanism, attention_mechanism, "attention_mechanism", name)
    pe_type = _parse(PositionalEmbedding, pos_emb_type, "pos_emb_type", name)
    qk_std, ov_std = W_query_std * W_key_std, W_out_std * W_value_std

    def pe_channels(n_in: int) -> int:
        if pe_type is PositionalEmbedding.SUM and n_chan_pos_emb not in (None, n_in):
            raise ValueError(f"{name}: pos_emb_type='SUM' adds embeddings to the inputs, so "
                             f"n_chan_pos_emb={n_chan_pos_emb} must be None or the input channels "
                             f"({n_in}).")
        return n_in if n_chan_pos_emb is None else n_chan_pos_emb

    def init_fn(rng, input_shape):
        n_in = input_shape[-1]
        keys = random.split(rng, 6)
        n_keys = n_vals = n_in
        pos_emb = None
        if pe_type is not PositionalEmbedding.NONE:
            n_pe = pe_channels(n_in)
            pos_emb = random.normal(keys[5], (1,) + tuple(input_shape[1:-1]) + (n_pe,))
            if pe_type is PositionalEmbedding.CONCAT:
                n_keys += n_pe
                n_vals += n_pe if val_pos_emb else 0
        W_K = random.normal(keys[1], (n_heads, n_keys, n_chan_key))
        W_Q = None if linear_scaling else random.normal(keys[0], (n_heads, n_keys, n_chan_key))
        W_V = random.normal(keys[2], (n_heads, n_vals, n_chan_val))
        W_out = random.normal(keys[3], (n_chan_val * n_heads, n_chan_out))
        b = None if b_std is None else random.normal(keys[4], (1,) * (len(input_shape) - 1)
                                                     + (n_chan_out,))
        return tuple(input_shape[:-1]) + (n_chan_out,), (W_Q, W_K, W_V, W_out, b, pos_emb)

    @functools.lru_cache(maxsize=8)
    def embedding_factor(spatial_shape: tuple[int, ...]) -> np.ndarray:
        """`L` with `L Lᵀ = R` (positions flattened), to correlate i.i.d. embeddings."""
        r = positional_covariance(spatial_shape, pos_emb_p_norm, pos_emb_decay_fn)
        return np.linalg.cholesky(_zipped_to_matrix(r))

    def masked_logits(logits: Array, key_mask: Array | None) -> Array:
        """Masked keys get logit −∞ (softmax) or 0 (other mechanisms): no attention weight."""
        if key_mask is None:
            return logits
        fill = masking.NEG_INF if mech is AttentionMechanism.SOFTMAX else 0.0
        return jnp.where(key_mask, jnp.asarray(fill, logits.dtype), logits)

    def apply_fn(params, x, mask=None, **kwargs):
        W_Q, W_K, W_V, W_out, b, pos_emb = params
        if mask is not None and pos_emb is not None:
            raise NotImplementedError(f"{name}: masked inputs with positional embeddings "
                                      f"(pos_emb_type={pe_type.value!r}) are not supported yet.")
        n, spatial_shape = x.shape[0], tuple(x.shape[1:-1])
        keys_in = vals_in = x.reshape(n, -1, x.shape[-1])
        if pos_emb is not None:
            e = pos_emb.reshape(1, -1, pos_emb.shape[-1])
            if pos_emb_decay_fn is not None:
                e = jnp.einsum("pq,bqc->bpc", embedding_factor(spatial_shape), e)
            e = W_pos_emb_std * e
            if pe_type is PositionalEmbedding.SUM:
                keys_in = keys_in + e
            else:
                keys_in = jnp.concatenate([keys_in, jnp.broadcast_to(
                    e, keys_in.shape[:2] + e.shape[-1:])], axis=-1)
            if val_pos_emb:
                vals_in = keys_in
        keys = jnp.einsum("npc,hck->hnpk", keys_in, W_K)
        queries = keys if W_Q is None else jnp.einsum("npc,hck->hnpk", keys_in, W_Q)
        values = jnp.einsum("npc,hcv->hnpv", vals_in, W_V)
        scale = keys_in.shape[-1] * n_chan_key ** (1.0 if linear_scaling else 0.5)
        logits = qk_std * jnp.einsum("hnpk,hnqk->hnpq", queries, keys) / scale
        if mask is not None:  # (N, S..., C) -> keys (1, N, 1, P)
            key_mask = jnp.all(jnp.broadcast_to(mask, mask.shape), axis=-1).reshape(1, n, 1, -1)
            logits = masked_logits(logits, key_mask)
        # Features ordered (value channel, head), i.e. row v·H + h of W_out, as in neural-tangents.
        heads = jnp.einsum("hnpq,hnqv->npvh", mech.fn(logits, (-1,)), values)
        y = jnp.einsum("npf,fo->npo", heads.reshape(heads.shape[:2] + (-1,)), W_out)
        y = ov_std * y / math.sqrt(n_chan_val * n_heads * vals_in.shape[-1])
        y = y.reshape((n,) + spatial_shape + (n_chan_out,))
        return y if b is None else y + b_std * b

    def _mix(mat: Array | None, r: Array | None, n_in: int) -> Array | None:
        """Input covariance with the positional embeddings' `R` mixed in (channel-weighted for
        CONCAT, `W_pos_emb_std²`-weighted for SUM); `mat` itself without embeddings."""
        if mat is None or r is None:
            return mat
        w_in, w_pe = 1.0, W_pos_emb_std ** 2
        if pe_type is PositionalEmbedding.CONCAT:
            n_pe = pe_channels(n_in)
            w_in, w_pe = n_in / (n_in + n_pe), w_pe * n_pe / (n_in + n_pe)
        return w_in * mat + w_pe * r

    def weights(cov: Array, mask: Array | None = None) -> Array:
        """Limiting attention weights `(N, S_1, S_1', ...)` (query, key positions) from `cov`;
        `mask` `(N, S..., 1)` excludes masked keys."""
        key_axes = tuple(range(2, cov.ndim, 2))
        logits = qk_std * cov
        if mask is not None:
            m = masking.position_mask(mask, name)
            m = m.reshape(m.shape[:1] + sum(((1, s) for s in m.shape[1:]), ()))
            logits = masked_logits(logits, m)
        return mech.fn(logits, key_axes)

    def weigh(mat: Array, a1: Array, a2: Array, n_batch_axes: int) -> Array:
        """`A1 · mat · A2ᵀ` on the position axes: out[.., a, b] = Σ A1[n1, a, a'] mat[.., a', b']
        A2[n2, b, b'] (multi-axis positions, kernel layout)."""
        d = (mat.ndim - n_batch_axes) // 2
        letters = iter(string.ascii_letters)
        b1 = next(letters)
        b2 = next(letters) if n_batch_axes == 2 else b1
        q1, k1, q2, k2 = ([next(letters) for _ in range(d)] for _ in range(4))
        batch = b1 + (b2 if n_batch_axes == 2 else "")
        spec_mat = batch + "".join(x + y for x, y in zip(k1, k2))
        spec_a1 = b1 + "".join(x + y for x, y in zip(q1, k1))
        spec_a2 = b2 + "".join(x + y for x, y in zip(q2, k2))
        spec_out = batch + "".join(x + y for x, y in zip(q1, q2))
        return jnp.einsum(f"{spec_a1},{spec_mat},{spec_a2}->{spec_out}", a1, mat, a2,
                          precision=jax.lax.Precision.HIGHEST)

    def affine(mat: Array | None, scale: float) -> Array | None:
        if mat is None:
            return None
        mat = scale ** 2 * mat
        return mat if b_std is None else mat + b_std ** 2

    def inner(lhs: Array | None, rhs: Array | None, n_batch_axes: int) -> Array | None:
        """Σ over every position pair of lhs·rhs, per batch entry, kept as size-1 axes."""
        if lhs is None:
            return None
        axes = tuple(range(n_batch_axes, lhs.ndim))
        return jnp.sum(lhs * (lhs if rhs is None else rhs), axis=axes, keepdims=True)

    def transform(k: Kernel, **kwargs) -> Kernel:
        k = expect_single(k, name)
        if k.n_spatial == 0:
            raise ValueError(f"{name} attends over spatial positions; inputs need at least one "
                             f"spatial axis, (N, S, C), got shape {k.shape1}.")
        if not linear_scaling and mech is not AttentionMechanism.IDENTITY:
            raise NotImplementedError(f"{name}: no closed form for attention_mechanism="
                                      f"'{mech.value}' with linear_scaling=False; use "
                                      f"linear_scaling=True or 'IDENTITY'.")
        n_in = k.shape1[-1]
        r = None
        if pe_type is not PositionalEmbedding.NONE:
            r = jnp.asarray(positional_covariance(tuple(k.shape1[1:-1]), pos_emb_p_norm,
                                                  pos_emb_decay_fn), k.nngp.dtype)
        cov1_m, cov2_m = _mix(k.cov1, r, n_in), _mix(k.cov2, r, n_in)
        nngp_m, ntk_m = _mix(k.nngp, r, n_in), _mix(k.ntk, r, n_in)
        if r is not None and (k.mask1 is not None or k.mask2 is not None):
            raise NotImplementedError(f"{name}: masked inputs with positional embeddings "
                                      f"(pos_emb_type={pe_type.value!r}) are not supported yet.")
        if not linear_scaling and (k.mask1 is not None or k.mask2 is not None):
            raise NotImplementedError(f"{name}: masked inputs need linear_scaling=True (the "
                                      f"linear_scaling=False kernel has no masked closed form).")
        if linear_scaling:
            a1 = weights(cov1_m, k.mask1)
            a2 = a1 if cov2_m is None else weights(cov2_m, k.mask2)
            src = (cov1_m, cov2_m, nngp_m, ntk_m) if val_pos_emb else (k.cov1, k.cov2, k.nngp,
                                                                        k.ntk)
            cov1 = affine(weigh(src[0], a1, a1, 1), ov_std)
            cov2 = None if src[1] is None else affine(weigh(src[1], a2, a2, 1), ov_std)
            nngp = affine(weigh(src[2], a1, a2, 2), ov_std)
            ntk = None
            if k.ntk is not None:
                bias = 0.0 if b_std is None else b_std ** 2
                ntk = affine(weigh(src[3], a1, a2, 2), ov_std) + 2 * (nngp - bias)
        else:
            std = qk_std * ov_std
            dot11 = inner(cov1_m, None if val_pos_emb else k.cov1, 1)
            dot22 = inner(cov2_m, None if val_pos_emb else k.cov2, 1)
            dot12 = inner(nngp_m, None if val_pos_emb else k.nngp, 2)
            nngp = affine(dot12 * nngp_m, std)
            cov1 = affine(dot11 * cov1_m, std)
            cov2 = None if cov2_m is None else affine(dot22 * cov2_m, std)
            ntk = None
            if k.ntk is not None:
                if val_pos_emb or r is None:
                    cross = 2 * inner(nngp_m, ntk_m, 2)
                else:
                    cross = inner(nngp_m, k.ntk, 2) + inner(k.nngp, ntk_m, 2)
                ntk = affine(cross * nngp_m + dot12 * (ntk_m + 4 * nngp_m), std)
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=True,
                         is_input=False, shape1=k.shape1[:-1] + (n_chan_out,),
                         shape2=k.shape2[:-1] + (n_chan_out,))

    def mask_fn(mask, input_shape):
        return masking.collapse_channels(mask, input_shape)

    return layer(name, init_fn, apply_fn, transform, mask_fn=mask_fn, remask=True,
                 apply_uses_mask=True)
