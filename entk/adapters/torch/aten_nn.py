"""Neural-network ATen ops: matrix products, convolution, normalization, pooling, resampling,
embedding, dropout.

Layouts are PyTorch's (NC + spatial, "NCHW" in 2-D; weights OIHW, transposed-conv weights IOHW) so
inputs are passed exactly as to the PyTorch model. Matrix products and convolutions request
`Precision.HIGHEST` so float32 results agree with PyTorch on accelerators that would otherwise use
reduced-precision (TF32 / bf16) passes.
"""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
from jax import lax
import numpy as np

from entk.adapters.torch.aten import Unavailable, as_int_list, expand_param, register

_HI = lax.Precision.HIGHEST

# ---------------------------------------------------------------- matrix products


def _matmul(a, b):
    return jnp.matmul(a, b, precision=_HI)


def _affine(self, product, beta, alpha):
    product = product if alpha == 1 else alpha * product
    if beta == 0:
        return product
    return product + (self if beta == 1 else beta * self)


@register("mm", "bmm", "matmul", "mv", "dot", "vdot", "inner")
def mm(self, other):
    return _matmul(self, other)


@register("addmm", "baddbmm", "addmv")
def addmm(self, mat1, mat2, *, beta=1, alpha=1):
    return _affine(self, _matmul(mat1, mat2), beta, alpha)


@register("addbmm")
def addbmm(self, batch1, batch2, *, beta=1, alpha=1):
    return _affine(self, jnp.sum(_matmul(batch1, batch2), axis=0), beta, alpha)


@register("linear")
def linear(input, weight, bias=None):  # noqa: A002 - PyTorch's argument name
    out = _matmul(input, weight.T)
    return out if bias is None else out + bias


@register("outer", "ger")
def outer(self, vec2):
    return jnp.outer(self, vec2)


# ---------------------------------------------------------------- convolution

_SPATIAL = {1: "H", 2: "HW", 3: "DHW"}


@register("convolution", "_convolution")
def convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding,  # noqa: A002
                groups, *_):
    """N-d (transposed) convolution in PyTorch's layout; an unbatched input is accepted too."""
    n = weight.ndim - 2
    unbatched = input.ndim == n + 1
    x = input[None] if unbatched else input
    stride, dilation = expand_param(stride, n), expand_param(dilation, n)
    padding = expand_param(padding, n)
    sp = _SPATIAL[n]
    dims = lax.conv_dimension_numbers(x.shape, weight.shape, ("NC" + sp, "OI" + sp, "NC" + sp))
    if not transposed and groups == 1 and _small_maps(x.shape[2:], weight.shape[2:], stride,
                                                      padding, dilation):
        out = _conv_by_taps(x, weight, stride, padding, dilation)
    elif not transposed:
        out = lax.conv_general_dilated(
            x, weight, window_strides=stride, padding=[(p, p) for p in padding],
            rhs_dilation=dilation, dimension_numbers=dims, feature_group_count=groups,
            precision=_HI)
    else:
        out = _conv_transpose(x, weight, stride, padding, dilation,
                              expand_param(output_padding, n), groups, dims)
    if bias is not None:
        out = out + jnp.reshape(bias, (1, -1) + (1,) * n)
    return out[0] if unbatched else out


_MAX_TAPS = 27  # 3x3, 5x5, 3x3x3 kernels; larger ones (ViT's 16x16 patch embedding) stay convolutions


def _small_maps(spatial, kernel, stride, padding, dilation) -> bool:
    """True where the kernel's window spans the whole input or the whole output in every spatial
    dim (a 3x3 kernel on 3x3, 2x2 or 1x1 maps, as in a ResNet's last stages on small images), for
    kernels of at most _MAX_TAPS taps."""
    if math.prod(kernel) > _MAX_TAPS:
        return False
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    out = _out_sizes(spatial, kernel, stride, padding, dilation)
    return all(i <= e for i, e in zip(spatial, extent)) or all(o <= e for o, e in zip(out, extent))


def _out_sizes(spatial, kernel, stride, padding, dilation) -> list[int]:
    """A convolution's output size per spatial dim (symmetric padding, as PyTorch's)."""
    return [(size + 2 * p - (k - 1) * d - 1) // s + 1
            for size, k, s, p, d in zip(spatial, kernel, stride, padding, dilation)]


def _conv_by_taps(x, weight, stride, padding, dilation):
    """A convolution as one matrix product over (input channel, kernel tap): the padded input is
    sliced once per tap into patches (N, *out, C, *taps), contracted with the weight (O, C, *taps)
    on their trailing dims (neither operand is transposed). Taps that read only padding for every
    output position (all but the centre of a padded 3x3 kernel on a 1x1 map) are left out, with
    their weights.

    Exact (the same products and sums). On maps no larger than the kernel XLA:CPU swaps the operands
    of the backward pass's convolutions onto a slow path (and flips the weights at every call):
    ResNet-18 at 32x32, N=4, eNTK by structured derivatives 200 -> 44 ms, NTVP 2.8 -> 0.31 s."""
    n = weight.ndim - 2
    size = x.shape[2:]
    out_sizes = _out_sizes(size, weight.shape[2:], stride, padding, dilation)
    used = []  # per spatial dim: the taps some output position reads the input (not padding) with
    for i in range(n):
        used.append([k for k in range(weight.shape[2 + i])
                     if any(0 <= o * stride[i] + k * dilation[i] - padding[i] < size[i]
                            for o in range(out_sizes[i]))])
    xp = jnp.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in padding])
    taps = []
    for offset in itertools.product(*used):
        start = [0, 0] + [k * d for k, d in zip(offset, dilation)]
        limit = [xp.shape[0], xp.shape[1]] + [s + (m - 1) * st + 1
                                               for s, m, st in zip(start[2:], out_sizes, stride)]
        taps.append(lax.slice(xp, start, limit, [1, 1, *stride]))
    kept = tuple(len(u) for u in used)
    patches = jnp.stack(taps, axis=-1)  # (N, C, *out, taps)
    patches = jnp.moveaxis(patches, 1, -2).reshape((xp.shape[0], *out_sizes, xp.shape[1], *kept))
    if kept != tuple(weight.shape[2:]):  # the used taps are contiguous in each dim
        weight = weight[(slice(None), slice(None)) + tuple(slice(u[0], u[-1] + 1) for u in used)]
    contract = tuple(range(1 + n, 2 + 2 * n))
    out = lax.dot_general(weight, patches, ((tuple(range(1, 2 + n)), contract), ((), ())),
                          precision=_HI)
    return jnp.moveaxis(out, 0, 1)  # (O, N, *out) -> (N, O, *out)


def _conv_transpose(x, weight, stride, padding, dilation, output_padding, groups, dims):
    """Transposed convolution as a stride-1 convolution of the stride-dilated input.

    PyTorch's weight is (C_in, C_out/groups, *k); the equivalent forward kernel swaps in/out within
    each group and flips every spatial axis. Padding `d(k-1) - p` on the low side and that plus
    `output_padding` on the high side gives PyTorch's output size; negative pads crop the result.
    """
    n = weight.ndim - 2
    c_in, c_out_g, k = weight.shape[0], weight.shape[1], weight.shape[2:]
    w = jnp.reshape(weight, (groups, c_in // groups, c_out_g) + k)
    w = jnp.swapaxes(w, 1, 2)
    w = jnp.reshape(w, (groups * c_out_g, c_in // groups) + k)
    w = jnp.flip(w, tuple(range(2, 2 + n)))
    pads = [(d * (kk - 1) - p, d * (kk - 1) - p + op)
            for kk, p, d, op in zip(k, padding, dilation, output_padding)]
    out = lax.conv_general_dilated(
        x, w, window_strides=(1,) * n, padding=[(max(lo, 0), max(hi, 0)) for lo, hi in pads],
        lhs_dilation=stride, rhs_dilation=dilation, dimension_numbers=dims,
        feature_group_count=groups, precision=_HI)
    crop = [slice(None), slice(None)] + [slice(max(-lo, 0), out.shape[2 + i] - max(-hi, 0))
                                         for i, (lo, hi) in enumerate(pads)]
    return out[tuple(crop)]


# ---------------------------------------------------------------- normalization


def _channel_shape(x):
    return (1, -1) + (1,) * (x.ndim - 2)


def _normalize(x, mean, rstd, weight, bias):
    shape = _channel_shape(x)
    out = (x - jnp.reshape(mean, shape)) * jnp.reshape(rstd, shape)
    if weight is not None:
        out = out * jnp.reshape(weight, shape)
    if bias is not None:
        out = out + jnp.reshape(bias, shape)
    return out


def _batch_stats(x):
    axes = (0,) + tuple(range(2, x.ndim))
    mean = jnp.mean(x, axis=axes)
    centered = x - jnp.reshape(mean, _channel_shape(x))
    return mean, jnp.mean(centered * centered, axis=axes), int(np.prod([x.shape[a] for a in axes]))


def _batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps):
    """(out, mean, rstd, new_running_mean, new_running_var) of a batch norm."""
    if training or running_mean is None:
        mean, var, n = _batch_stats(x)
        rstd = lax.rsqrt(var + eps)
        if running_mean is not None:
            new_mean = (1 - momentum) * running_mean + momentum * mean
            new_var = (1 - momentum) * running_var + momentum * var * (n / max(n - 1, 1))
        else:
            new_mean = new_var = None
    else:
        mean, rstd = running_mean, lax.rsqrt(running_var + eps)
        new_mean, new_var = running_mean, running_var
    return _normalize(x, mean, rstd, weight, bias), mean, rstd, new_mean, new_var


@register("_native_batch_norm_legit_no_training")
def batch_norm_no_training(input, weight, bias, running_mean, running_var, momentum, eps):  # noqa: A002
    out = _batch_norm(input, weight, bias, running_mean, running_var, False, momentum, eps)[0]
    return out, Unavailable("batch-norm saved mean"), Unavailable("batch-norm saved rstd")


@register("_native_batch_norm_legit.default")
def batch_norm_legit(input, weight, bias, running_mean, running_var, training, momentum, eps):  # noqa: A002
    return _batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps)[:3]


@register("_native_batch_norm_legit.no_stats")
def batch_norm_no_stats(input, weight, bias, training, momentum, eps):  # noqa: A002
    return _batch_norm(input, weight, bias, None, None, True, momentum, eps)[:3]


@register("_native_batch_norm_legit_functional")
def batch_norm_functional(input, weight, bias, running_mean, running_var, training, momentum,  # noqa: A002
                          eps):
    return _batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps)


@register("native_batch_norm", "batch_norm", "_batch_norm_with_update_functional",
          "_batch_norm_no_update")
def native_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps,  # noqa: A002
                      *_):
    out = _batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps)
    return out[:3]


@register("native_layer_norm", "layer_norm")
def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *_):  # noqa: A002
    k = len(as_int_list(normalized_shape))
    axes = tuple(range(input.ndim - k, input.ndim))
    mean = jnp.mean(input, axis=axes, keepdims=True)
    centered = input - mean
    rstd = lax.rsqrt(jnp.mean(centered * centered, axis=axes, keepdims=True) + eps)
    out = centered * rstd
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out, mean, rstd


@register("native_group_norm")
def group_norm(input, weight, bias, N, C, HxW, group, eps):  # noqa: A002, N803
    x = jnp.reshape(input, (N, group, -1))
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    rstd = lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + eps)
    out = jnp.reshape(centered * rstd, input.shape)
    shape = (1, C) + (1,) * (input.ndim - 2)
    if weight is not None:
        out = out * jnp.reshape(weight, shape)
    if bias is not None:
        out = out + jnp.reshape(bias, shape)
    return out, jnp.reshape(mean, (N, group)), jnp.reshape(rstd, (N, group))


@register("rms_norm", "_fused_rms_norm")
def rms_norm(input, normalized_shape, weight=None, eps=None):  # noqa: A002
    k = len(as_int_list(normalized_shape))
    axes = tuple(range(input.ndim - k, input.ndim))
    eps = float(jnp.finfo(input.dtype).eps) if eps is None else eps
    out = input * lax.rsqrt(jnp.mean(input * input, axis=axes, keepdims=True) + eps)
    return out if weight is None else out * weight


# ---------------------------------------------------------------- pooling


def _pool_geometry(size, k, s, p, d, ceil_mode):
    """Output length and the high-side padding PyTorch's pooling implies (may be negative)."""
    eff = d * (k - 1) + 1
    out = (size + 2 * p - eff + ((s - 1) if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1  # the last window must start inside the input or the low padding
    return out, (out - 1) * s + eff - size - p


def _pool_args(x, kernel_size, stride, padding, dilation, ceil_mode, n):
    k = expand_param(kernel_size, n)
    s = expand_param(stride, n) if stride is not None and len(as_int_list(stride)) else k
    p, d = expand_param(padding, n), expand_param(dilation, n)
    geometry = [_pool_geometry(x.shape[x.ndim - n + i], k[i], s[i], p[i], d[i], ceil_mode)
                for i in range(n)]
    # Negative high padding means trailing input the windows never reach: crop it instead.
    crop = tuple(slice(None) for _ in range(x.ndim - n)) + tuple(
        slice(0, x.shape[x.ndim - n + i] + min(hi, 0)) for i, (_, hi) in enumerate(geometry))
    pads = [(0, 0)] * (x.ndim - n) + [(p[i], max(hi, 0)) for i, (_, hi) in enumerate(geometry)]
    lead = (1,) * (x.ndim - n)
    return x[crop], lead + tuple(k), lead + tuple(s), pads, lead + tuple(d), [o for o, _ in geometry]


def _max_pool(n):
    def translate(self, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
        x, k, s, pads, d, _ = _pool_args(self, kernel_size, stride, padding, dilation, ceil_mode, n)
        # A NumPy (not traced) identity lets JAX pick its differentiable reduce_window_max.
        init = -np.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
        out = lax.reduce_window(x, np.asarray(init, x.dtype), lax.max, k, s, pads,
                                window_dilation=d)
        return out, Unavailable("max-pool indices")
    return translate


for _n in (1, 2, 3):
    register(f"max_pool{_n}d_with_indices")(_max_pool(_n))


@register("max_pool1d", "max_pool2d", "max_pool3d")
def max_pool(self, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    n = len(as_int_list(kernel_size))
    return _max_pool(n)(self, kernel_size, stride, padding, dilation, ceil_mode)[0]


def _window_counts(size, k, s, p, out, include_pad):
    """Per-window element count along one axis, as PyTorch's avg_pool computes its divisor."""
    counts = np.empty(out)
    for i in range(out):
        start = i * s - p
        end = min(start + k, size + p)
        if include_pad:
            counts[i] = end - start
        else:
            counts[i] = min(end, size) - max(start, 0)
    return counts


def _avg_pool(n):
    def translate(self, kernel_size, stride=(), padding=0, ceil_mode=False,
                  count_include_pad=True, divisor_override=None):
        x, k, s, pads, _, outs = _pool_args(self, kernel_size, stride, padding, 1, ceil_mode, n)
        total = lax.reduce_window(x, np.asarray(0, x.dtype), lax.add, k, s, pads)
        if divisor_override:
            return total / divisor_override
        size = self.shape[self.ndim - n:]
        divisor = np.ones(())
        for i in range(n):
            c = _window_counts(size[i], k[-n + i], s[-n + i], pads[-n + i][0], outs[i],
                               count_include_pad)
            divisor = np.multiply.outer(divisor, c)
        return total / jnp.asarray(divisor, x.dtype)
    return translate


for _n in (1, 2, 3):
    register(f"avg_pool{_n}d")(_avg_pool(_n))


def _adaptive_bounds(size, out):
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def _adaptive_avg(n):
    def translate(self, output_size):
        x = self
        for i, o in enumerate(expand_param(output_size, n)):
            axis = x.ndim - n + i
            size = x.shape[axis]
            if size % o == 0:
                shape = x.shape[:axis] + (o, size // o) + x.shape[axis + 1:]
                x = jnp.mean(jnp.reshape(x, shape), axis=axis + 1)
                continue
            weights = np.zeros((o, size))
            for j, (a, b) in enumerate(_adaptive_bounds(size, o)):
                weights[j, a:b] = 1.0 / (b - a)
            x = jnp.moveaxis(jnp.tensordot(x, jnp.asarray(weights, x.dtype), axes=([axis], [1]),
                                           precision=_HI), -1, axis)
        return x
    return translate


for _n in (1, 2, 3):
    register(f"_adaptive_avg_pool{_n}d", f"adaptive_avg_pool{_n}d")(_adaptive_avg(_n))


def _adaptive_max(n):
    def translate(self, output_size):
        out_sizes = expand_param(output_size, n)
        x = self
        for i, o in enumerate(out_sizes):
            axis = x.ndim - n + i
            pieces = [jnp.max(lax.slice_in_dim(x, a, b, axis=axis), axis=axis, keepdims=True)
                      for a, b in _adaptive_bounds(x.shape[axis], o)]
            x = jnp.concatenate(pieces, axis=axis)
        return x, Unavailable("adaptive max-pool indices")
    return translate


for _n in (1, 2, 3):
    register(f"adaptive_max_pool{_n}d")(_adaptive_max(_n))


# ---------------------------------------------------------------- resampling


def _output_sizes(x, n, output_size, scales):
    in_sizes = x.shape[x.ndim - n:]
    scales = list(scales) if scales is not None else [None] * n
    if output_size is not None:
        return list(in_sizes), as_int_list(output_size), scales
    return list(in_sizes), [int(math.floor(s * f)) for s, f in zip(in_sizes, scales)], scales


def _scale(in_size, out_size, scale, align_corners=False):
    if align_corners:
        return (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    return 1.0 / scale if scale is not None and scale > 0 else in_size / out_size


def _nearest(n, exact):
    def translate(self, output_size, *scales):
        if len(scales) == 1 and (scales[0] is None or isinstance(scales[0], (list, tuple))):
            scales = scales[0]  # .vec overload: (input, output_size, scale_factors)
        elif not scales:
            scales = None
        in_sizes, out_sizes, scales = _output_sizes(self, n, output_size, scales)
        x = self
        for i in range(n):
            axis = x.ndim - n + i
            scale = np.float32(_scale(in_sizes[i], out_sizes[i], scales[i]))
            dst = np.arange(out_sizes[i], dtype=np.float32) + (np.float32(0.5) if exact else 0)
            src = np.minimum(np.floor(dst * scale).astype(np.int64), in_sizes[i] - 1)
            x = jnp.take(x, jnp.asarray(src), axis=axis)
        return x
    return translate


for _n in (1, 2, 3):
    register(f"upsample_nearest{_n}d")(_nearest(_n, exact=False))
    register(f"_upsample_nearest_exact{_n}d")(_nearest(_n, exact=True))


def _linear_weights(in_size, out_size, scale, align_corners):
    """The (out, in) matrix of PyTorch's 1-D linear interpolation (upsample_linear / bilinear)."""
    ratio = _scale(in_size, out_size, scale, align_corners)
    weights = np.zeros((out_size, in_size))
    for j in range(out_size):
        src = ratio * j if align_corners else max(ratio * (j + 0.5) - 0.5, 0.0)
        i0 = min(int(math.floor(src)), in_size - 1)
        i1 = i0 + 1 if i0 < in_size - 1 else i0
        lam = src - i0
        weights[j, i0] += 1 - lam
        weights[j, i1] += lam
    return weights


def _linear(n):
    def translate(self, output_size, align_corners, *scales):
        if len(scales) == 1 and (scales[0] is None or isinstance(scales[0], (list, tuple))):
            scales = scales[0]
        elif not scales:
            scales = None
        in_sizes, out_sizes, scales = _output_sizes(self, n, output_size, scales)
        x = self
        for i in range(n):
            axis = x.ndim - n + i
            w = _linear_weights(in_sizes[i], out_sizes[i], scales[i], align_corners)
            x = jnp.moveaxis(jnp.tensordot(x, jnp.asarray(w, x.dtype), axes=([axis], [1]),
                                           precision=_HI), -1, axis)
        return x
    return translate


register("upsample_linear1d")(_linear(1))
register("upsample_bilinear2d")(_linear(2))
register("upsample_trilinear3d")(_linear(3))


@register("pixel_shuffle")
def pixel_shuffle(self, upscale_factor):
    r = upscale_factor
    *lead, c, h, w = self.shape
    x = jnp.reshape(self, (*lead, c // (r * r), r, r, h, w))
    k = len(lead)
    x = jnp.transpose(x, tuple(range(k)) + (k, k + 3, k + 1, k + 4, k + 2))
    return jnp.reshape(x, (*lead, c // (r * r), h * r, w * r))


@register("pixel_unshuffle")
def pixel_unshuffle(self, downscale_factor):
    r = downscale_factor
    *lead, c, h, w = self.shape
    x = jnp.reshape(self, (*lead, c, h // r, r, w // r, r))
    k = len(lead)
    x = jnp.transpose(x, tuple(range(k)) + (k, k + 2, k + 4, k + 1, k + 3))
    return jnp.reshape(x, (*lead, c * r * r, h // r, w // r))


# ---------------------------------------------------------------- attention


@register("scaled_dot_product_attention")
def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 *, scale=None, enable_gqa=False):
    """PyTorch's math SDPA: softmax(q kᵀ · scale + mask) v, fully masked rows giving 0 (not NaN).

    Kept whole by the exporter (its core-ATen decomposition is both slower and, for some
    layouts, fails in `run_decompositions`).
    """
    _check_no_dropout(dropout_p, True)
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key = jnp.repeat(key, repeats, axis=-3)
        value = jnp.repeat(value, repeats, axis=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = _matmul(query, jnp.swapaxes(key, -1, -2)) * scale
    length, source = query.shape[-2], key.shape[-2]
    allowed = None
    if is_causal:
        allowed = jnp.asarray(np.tril(np.ones((length, source), bool)))
    if attn_mask is not None:
        if attn_mask.dtype == jnp.bool_:
            allowed = attn_mask if allowed is None else allowed & attn_mask
        else:
            scores = scores + attn_mask
    if allowed is not None:
        scores = jnp.where(allowed, scores, -jnp.inf)
    peak = lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, jnp.zeros_like(peak)))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = jnp.where(total > 0, weights / jnp.where(total > 0, total, jnp.ones_like(total)), 0)
    return _matmul(weights, value)


@register("_scaled_dot_product_flash_attention_for_cpu")
def scaled_dot_product_attention_cpu(query, key, value, dropout_p=0.0, is_causal=False, *,
                                     attn_mask=None, scale=None):
    """The CPU kernel `scaled_dot_product_attention` dispatches to (what dispatch capture records):
    the same attention; the log-sum-exp it keeps for its backward is not computed."""
    out = scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
    return out, Unavailable("the log-sum-exp of CPU flash attention")


@register("_weight_norm_interface")
def weight_norm_interface(v, g, dim=0):
    """`(v · g / ‖v‖, ‖v‖)`, the norm over every axis but `dim` (over all of them for `dim=-1`, as
    `torch.norm_except_dim`): the CPU kernel of `torch._weight_norm` (weight-norm parametrizations,
    Hugging Face audio models)."""
    axes = tuple(range(v.ndim)) if dim == -1 else tuple(a for a in range(v.ndim) if a != dim % v.ndim)
    norm = jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True))
    return v * (g / norm), jnp.reshape(norm, jnp.shape(g))


# ---------------------------------------------------------------- embedding and dropout


@register("embedding")
def embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    if scale_grad_by_freq:
        raise NotImplementedError(
            "nn.Embedding(scale_grad_by_freq=True) rescales gradients by batch word counts, which "
            "a pure function of the parameters cannot express; use mode='bridge'.")
    out = jnp.take(weight, indices, axis=0)
    if padding_idx is not None and padding_idx >= 0:
        # PyTorch never propagates gradient into the padding row: its lookups are constants.
        is_padding = jnp.expand_dims(indices == padding_idx, tuple(range(indices.ndim, out.ndim)))
        out = jnp.where(is_padding, lax.stop_gradient(out), out)
    return out


def _check_no_dropout(p, train):
    if train and p > 0:
        raise NotImplementedError(
            "dropout in training mode draws random masks; convert the model in eval mode (the "
            "default) or use mode='bridge'.")


@register("native_dropout")
def native_dropout(input, p, train=None):  # noqa: A002
    _check_no_dropout(p, train)
    return input, jnp.ones(input.shape, bool)


@register("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")
def dropout(input, p, train=None):  # noqa: A002
    _check_no_dropout(p, train)
    return input


__all__: list[str] = []
