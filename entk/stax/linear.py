"""Affine layers with Gaussian weights: `Dense`, `Conv`, `ConvLocal` (unshared), `ConvTranspose`.

Parameterizations (neural-tangents'):

- `"ntk"` (default): weights and biases are N(0, 1) and the layer computes
  `W_std/√fan_in · W x + b_std · b`. Kernel map: `nngp' = W_std²·A(nngp) + b_std²`,
  `ntk' = nngp' + W_std²·A(ntk)`, with `A` the identity (`Dense`) or the filter-averaged window sum
  (`Conv`).
- `"standard"`: `W ~ N(0, W_std²/fan_in)`, `b ~ N(0, b_std²)`, the layer computes `W x + b`. The NNGP
  is the same; the NTK's weight-gradient term scales with the finite fan-in of the layer:
  `ntk' = fan_in·A(nngp) + W_std²·A(ntk) + [1 if there is a bias]`, with `fan_in` the input channels
  (times the filter size for `Conv`), read from the layer's finite input shape.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax, random

from entk.stax import spatial
from entk.stax import masking
from entk.stax.kernel import (Kernel, Layer, check_default_axes, check_parameterization,
                              diagonal_mask, expect_single, layer)

Array = jax.Array


def _check_s(layer_name: str, s: Sequence[int]) -> None:
    if tuple(s) != (1, 1):
        raise NotImplementedError(f"{layer_name}: width scalings s={tuple(s)} are not supported; "
                                  f"use s=(1, 1) and set the widths directly.")


def _affine(mat: Array | None, W_std: float, b_std: float | None) -> Array | None:
    if mat is None:
        return None
    mat = W_std ** 2 * mat
    return mat if b_std is None else mat + b_std ** 2


def _kernel_update(k: Kernel, window_op, fan_in: int, W_std: float, b_std: float | None,
                   parameterization: str, shape1: tuple, shape2: tuple) -> Kernel:
    """Shared kernel map of `Dense` (window_op = identity) and `Conv` (window_op = filter mean)."""
    nngp_in = window_op(k.nngp, 2)
    ntk_in = None if k.ntk is None else window_op(k.ntk, 2)
    nngp = _affine(nngp_in, W_std, b_std)
    if ntk_in is None:
        ntk = None
    elif parameterization == "ntk":
        ntk = nngp + W_std ** 2 * ntk_in
    else:
        ntk = fan_in * nngp_in + W_std ** 2 * ntk_in + (0.0 if b_std is None else 1.0)
    cov1 = _affine(window_op(k.cov1, 1), W_std, b_std)
    cov2 = None if k.cov2 is None else _affine(window_op(k.cov2, 1), W_std, b_std)
    return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=True, is_input=False,
                     shape1=shape1, shape2=shape2)


def _init_weights(rng, w_shape, out_dim, fan_in, W_std, b_std, parameterization):
    k_w, k_b = random.split(rng)
    W = random.normal(k_w, w_shape)
    b = None if b_std is None else random.normal(k_b, (out_dim,))
    if parameterization == "standard":
        W = W * (W_std / math.sqrt(fan_in))
        b = None if b is None else b * b_std
    return W, b


def _finish(out: Array, b: Array | None, fan_in: int, W_std: float, b_std: float | None,
            parameterization: str) -> Array:
    if parameterization == "ntk":
        out = out * (W_std / math.sqrt(fan_in))
        if b is not None:
            out = out + b_std * b
    elif b is not None:
        out = out + b
    return out


def Dense(out_dim: int, W_std: float = 1.0, b_std: float | None = None, batch_axis: int = 0,
          channel_axis: int = -1, parameterization: str = "ntk", s: Sequence[int] = (1, 1)) -> Layer:
    """Fully connected layer on the last (channel) axis; params `(W (in, out), b (out,) or None)`.

    `b_std=None` means no bias. On images it acts on every position independently.
    """
    name = f"Dense({out_dim})"
    check_default_axes(name, batch_axis, channel_axis)
    _check_s(name, s)
    parameterization = check_parameterization(name, parameterization)
    W_std = float(W_std)
    b_std = None if b_std is None else float(b_std)

    def init_fn(rng, input_shape):
        fan_in = input_shape[-1]
        output_shape = tuple(input_shape[:-1]) + (out_dim,)
        return output_shape, _init_weights(rng, (fan_in, out_dim), out_dim, fan_in, W_std, b_std,
                                           parameterization)

    def apply_fn(params, x, **kwargs):
        W, b = params
        return _finish(jnp.dot(x, W), b, x.shape[-1], W_std, b_std, parameterization)

    def transform(k: Kernel, **kwargs) -> Kernel:
        k = expect_single(k, name)
        return _kernel_update(k, lambda m, _: m, k.shape1[-1], W_std, b_std, parameterization,
                              k.shape1[:-1] + (out_dim,), k.shape2[:-1] + (out_dim,))

    return layer(name, init_fn, apply_fn, transform, mask_fn=masking.collapse_channels,
                 remask=True)


def _conv_dimension_numbers(d: int) -> lax.ConvDimensionNumbers:
    """Channels-last activations `(N, S_1..S_d, C)` and filters `(S_1..S_d, C_in, C_out)`."""
    spatial_axes = tuple(range(1, d + 1))
    return lax.ConvDimensionNumbers(lhs_spec=(0, d + 1) + spatial_axes,
                                    rhs_spec=(d + 1, d) + tuple(range(d)),
                                    out_spec=(0, d + 1) + spatial_axes)


def _check_channels_last(name: str, dimension_numbers: tuple | None) -> None:
    if dimension_numbers is not None:
        lhs = dimension_numbers[0]
        if not (isinstance(lhs, str) and lhs[0] == "N" and lhs[-1] == "C"):
            raise NotImplementedError(f"{name}: dimension_numbers={dimension_numbers}; only "
                                      f"channels-last inputs (e.g. 'NHWC') are supported.")


def _check_spatial_rank(name: str, d: int, shape: Sequence[int]) -> None:
    if len(shape) != d + 2:
        raise ValueError(f"{name} expects inputs with {d} spatial dimension(s), "
                         f"(N, {'S, ' * d}C), got shape {tuple(shape)}.")


def _conv_init_fn(geometry, filter_shape, out_chan, W_std, b_std, parameterization):
    """`init_fn` of a convolution with one shared filter `filter_shape + (C_in, out_chan)`; `geometry`
    maps an input shape to `(pads, output spatial sizes)`."""
    filter_size = math.prod(filter_shape)

    def init_fn(rng, input_shape):
        _, out = geometry(input_shape)
        fan_in = input_shape[-1] * filter_size
        params = _init_weights(rng, filter_shape + (input_shape[-1], out_chan), out_chan, fan_in,
                               W_std, b_std, parameterization)
        return (input_shape[0],) + out + (out_chan,), params

    return init_fn


class _ConvArgs(NamedTuple):
    """The arguments every convolution layer checks and normalises the same way."""

    name: str
    filter_shape: tuple[int, ...]
    d: int
    strides: tuple[int, ...]
    pad_mode: spatial.Padding
    W_std: float
    b_std: float | None
    parameterization: str
    dn: lax.ConvDimensionNumbers
    filter_size: int


def _conv_args(kind: str, out_chan: int, filter_shape: Sequence[int], strides, padding: str,
               W_std: float, b_std: float | None, dimension_numbers: tuple | None,
               parameterization: str, s: Sequence[int]) -> _ConvArgs:
    """Checks and normalises the shared arguments of `Conv`, `ConvLocal`, `ConvTranspose` (`kind`)."""
    filter_shape = tuple(int(f) for f in filter_shape)
    d = len(filter_shape)
    name = f"{kind}({out_chan}, {filter_shape})"
    _check_channels_last(name, dimension_numbers)
    _check_s(name, s)
    parameterization = check_parameterization(name, parameterization)
    return _ConvArgs(name, filter_shape, d, spatial.parse_window(strides, d, 1, "strides", name),
                     spatial.parse_padding(padding, name), float(W_std),
                     None if b_std is None else float(b_std), parameterization,
                     _conv_dimension_numbers(d), math.prod(filter_shape))


def _conv_geometry(a: _ConvArgs):
    """`geometry(input_shape) -> (pads, output spatial sizes)` of a `Conv` / `ConvLocal`."""
    def geometry(shape):
        _check_spatial_rank(a.name, a.d, shape)
        in_sizes = tuple(shape[1:-1])
        pads = spatial.pads_for(a.pad_mode, in_sizes, a.filter_shape, a.strides)
        return pads, spatial.output_sizes(in_sizes, a.filter_shape, a.strides, pads, a.name)

    return geometry


def Conv(out_chan: int, filter_shape: Sequence[int], strides: Sequence[int] | None = None,
         padding: str = "VALID", W_std: float = 1.0, b_std: float | None = None,
         dimension_numbers: tuple | None = None, parameterization: str = "ntk",
         s: Sequence[int] = (1, 1)) -> Layer:
    """Convolution over `len(filter_shape)` spatial dimensions of channels-last inputs
    (`(N, W, C)` for 1-D, NHWC for 2-D, ...); padding `'VALID'`, `'SAME'` or `'CIRCULAR'` (periodic).

    Params `(W (*filter_shape, C_in, out_chan), b (out_chan,) or None)`; `strides` default to 1.
    """
    args = _conv_args("Conv", out_chan, filter_shape, strides, padding, W_std, b_std,
                      dimension_numbers, parameterization, s)
    name, filter_shape, d, strides, pad_mode, W_std, b_std, parameterization, dn, filter_size = args
    geometry = _conv_geometry(args)

    init_fn = _conv_init_fn(geometry, filter_shape, out_chan, W_std, b_std, parameterization)

    def apply_fn(params, x, **kwargs):
        W, b = params
        pads, _ = geometry(x.shape)
        if pad_mode is spatial.Padding.CIRCULAR:
            x = spatial.pad_array(x, 1, pads, circular=True)
            pads = [(0, 0)] * d
        dtype = jnp.result_type(x, W)
        y = lax.conv_general_dilated(x.astype(dtype), W.astype(dtype), strides, pads,
                                     dimension_numbers=dn)
        return _finish(y, b, x.shape[-1] * filter_size, W_std, b_std, parameterization)

    def transform(k: Kernel, **kwargs) -> Kernel:
        k = expect_single(k, name)
        pads, out = geometry(k.shape1)
        circular = pad_mode is spatial.Padding.CIRCULAR

        def window_op(mat, first_axis):
            mat = spatial.pad_pairs(mat, first_axis, pads, circular)
            return spatial.diagonal_window_sum(mat, first_axis, filter_shape, strides) / filter_size

        return _kernel_update(k, window_op, k.shape1[-1] * filter_size, W_std, b_std,
                              parameterization, (k.shape1[0],) + out + (out_chan,),
                              (k.shape2[0],) + out + (out_chan,))

    def mask_fn(mask, input_shape):
        pads, out = geometry(input_shape)
        return masking.window_centres(masking.collapse_channels(mask, input_shape), filter_shape,
                                      strides, pads, out)

    return layer(name, init_fn, apply_fn, transform, mask_fn=mask_fn, remask=True)


def ConvLocal(out_chan: int, filter_shape: Sequence[int], strides: Sequence[int] | None = None,
              padding: str = "VALID", W_std: float = 1.0, b_std: float | None = None,
              dimension_numbers: tuple | None = None, parameterization: str = "ntk",
              s: Sequence[int] = (1, 1)) -> Layer:
    """Locally connected layer: a `Conv` whose filters (and biases) differ at every output position.

    Params `(W (*out_sizes, C_in·filter_size, out_chan), b (*out_sizes, out_chan) or None)`, the
    layout of `jax.lax.conv_general_dilated_local`. Kernel: weights at different output positions
    are independent, so the covariance between two different positions vanishes; on the spatial
    diagonal it equals `Conv`'s.
    """
    args = _conv_args("ConvLocal", out_chan, filter_shape, strides, padding, W_std, b_std,
                      dimension_numbers, parameterization, s)
    name, filter_shape, d, strides, pad_mode, W_std, b_std, parameterization, dn, filter_size = args
    shared = Conv(out_chan, filter_shape, strides, padding, W_std, b_std,
                  parameterization=parameterization)
    geometry = _conv_geometry(args)

    def init_fn(rng, input_shape):
        _, out = geometry(input_shape)
        fan_in = input_shape[-1] * filter_size
        k_w, k_b = random.split(rng)
        W = random.normal(k_w, out + (fan_in, out_chan))
        b = None if b_std is None else random.normal(k_b, out + (out_chan,))
        if parameterization == "standard":
            W = W * (W_std / math.sqrt(fan_in))
            b = None if b is None else b * b_std
        return (input_shape[0],) + out + (out_chan,), (W, b)

    def apply_fn(params, x, **kwargs):
        W, b = params
        pads, _ = geometry(x.shape)
        if pad_mode is spatial.Padding.CIRCULAR:
            x = spatial.pad_array(x, 1, pads, circular=True)
            pads = [(0, 0)] * d
        dtype = jnp.result_type(x, W)
        y = lax.conv_general_dilated_local(x.astype(dtype), W.astype(dtype), strides, pads,
                                           filter_shape, dimension_numbers=dn)
        return _finish(y, b, x.shape[-1] * filter_size, W_std, b_std, parameterization)

    shared_transform = shared.kernel_fn.transform

    def transform(k: Kernel, **kwargs) -> Kernel:
        k = expect_single(k, name)
        out = shared_transform(k)

        def keep_diagonal(mat, first_axis):
            return mat * diagonal_mask(mat.shape, first_axis, batch_diagonal=False)

        return out.map_matrices(keep_diagonal)

    def mask_fn(mask, input_shape):
        pads, out = geometry(input_shape)
        return masking.window_centres(masking.collapse_channels(mask, input_shape), filter_shape,
                                      strides, pads, out)

    return layer(name, init_fn, apply_fn, transform, mask_fn=mask_fn, remask=True)


def _transpose_pads(in_sizes, filter_shape, strides, padding: spatial.Padding):
    """`(low, high)` padding of the stride-dilated input for a transposed convolution, matching
    `jax.lax.conv_transpose` with string padding (the transpose of a forward VALID / SAME conv)."""
    pads = []
    for k, s in zip(filter_shape, strides):
        if padding is spatial.Padding.SAME:
            total = k + s - 2
            low = k - 1 if s > k - 1 else -(-total // 2)
        else:
            total = k + s - 2 + max(k - s, 0)
            low = k - 1
        pads.append((low, total - low))
    return pads


def ConvTranspose(out_chan: int, filter_shape: Sequence[int], strides: Sequence[int] | None = None,
                  padding: str = "VALID", W_std: float = 1.0, b_std: float | None = None,
                  dimension_numbers: tuple | None = None, parameterization: str = "ntk",
                  s: Sequence[int] = (1, 1)) -> Layer:
    """Transposed (fractionally strided) convolution, `jax.lax.conv_transpose`'s output sizes.

    The input is dilated by `strides` (zeros between positions), padded, then convolved with
    stride 1; the kernel map is the same: dilate both axes of every spatial pair, pad, and take
    `Conv`'s filter-averaged diagonal window sum. Params as `Conv`'s. `'CIRCULAR'` padding is not
    supported.
    """
    args = _conv_args("ConvTranspose", out_chan, filter_shape, strides, padding, W_std, b_std,
                      dimension_numbers, parameterization, s)
    name, filter_shape, d, strides, pad_mode, W_std, b_std, parameterization, dn, filter_size = args
    if pad_mode is spatial.Padding.CIRCULAR:
        raise NotImplementedError(f"{name}: padding='CIRCULAR' is not supported for transposed "
                                  f"convolutions; use 'VALID' or 'SAME'.")
    ones = (1,) * d

    def geometry(shape):
        _check_spatial_rank(name, d, shape)
        in_sizes = tuple(shape[1:-1])
        pads = _transpose_pads(in_sizes, filter_shape, strides, pad_mode)
        dilated = tuple((n - 1) * st + 1 for n, st in zip(in_sizes, strides))
        out = spatial.output_sizes(dilated, filter_shape, ones, pads, name)
        return pads, out

    init_fn = _conv_init_fn(geometry, filter_shape, out_chan, W_std, b_std, parameterization)

    def apply_fn(params, x, **kwargs):
        W, b = params
        pads, _ = geometry(x.shape)
        dtype = jnp.result_type(x, W)
        y = lax.conv_general_dilated(x.astype(dtype), W.astype(dtype), ones, pads,
                                     lhs_dilation=strides, dimension_numbers=dn)
        return _finish(y, b, x.shape[-1] * filter_size, W_std, b_std, parameterization)

    def dilate_pairs(mat: Array, first_axis: int) -> Array:
        """Inserts `stride − 1` zeros between positions on both axes of every spatial pair."""
        config = [(0, 0, 0)] * mat.ndim
        for i, st in enumerate(strides):
            config[first_axis + 2 * i] = config[first_axis + 2 * i + 1] = (0, 0, st - 1)
        return lax.pad(mat, jnp.zeros((), mat.dtype), config)

    def transform(k: Kernel, **kwargs) -> Kernel:
        k = expect_single(k, name)
        pads, out = geometry(k.shape1)

        def window_op(mat, first_axis):
            mat = spatial.pad_pairs(dilate_pairs(mat, first_axis), first_axis, pads, False)
            return spatial.diagonal_window_sum(mat, first_axis, filter_shape, ones) / filter_size

        return _kernel_update(k, window_op, k.shape1[-1] * filter_size, W_std, b_std,
                              parameterization, (k.shape1[0],) + out + (out_chan,),
                              (k.shape2[0],) + out + (out_chan,))

    return layer(name, init_fn, apply_fn, transform)
