"""Network structure: `serial`, `repeat`, `parallel`, `FanOut`, `FanInSum`, `FanInProd`,
`FanInConcat`.

Branches are lists: `FanOut(n)` turns one input (array, shape or `Kernel`) into a list of `n`,
`parallel` applies one layer per list entry, and `FanInSum` / `FanInConcat` merge a list back into one.
Merging kernels assumes the branches are *independent* given the inputs, which holds whenever each
branch ends in its own `Dense` / `Conv` (or is the identity next to such branches): cross-branch
covariances then vanish, since fresh zero-mean weights are independent of everything before them.
"""

from __future__ import annotations

from typing import Any

import functools

import jax
import jax.numpy as jnp
from jax import lax, random

from entk.stax import masking
from entk.stax.kernel import Kernel, Layer, layer, transform_of

_make_layer = layer  # `repeat` takes an argument named `layer`, as in neural-tangents

Array = jax.Array


def _split_rng(kwargs: dict, n: int) -> list[dict]:
    """Per-layer kwargs: an `rng` key (for `Dropout`) is split so that layers draw independently."""
    rng = kwargs.get("rng")
    if rng is None:
        return [kwargs] * n
    keys = random.split(rng, n)
    return [{**kwargs, "rng": keys[i]} for i in range(n)]


def serial(*layers: Layer) -> Layer:
    """Composes layers left to right; params are a tuple with one entry per layer."""
    layers = tuple(layers)
    transforms = [transform_of(lyr, f"serial: layer {i}") for i, lyr in enumerate(layers)]

    def init_fn(rng, input_shape):
        params = []
        for lyr in layers:
            rng, layer_rng = random.split(rng)
            input_shape, p = lyr[0](layer_rng, input_shape)
            params.append(p)
        return input_shape, tuple(params)

    def apply_fn(params, x, **kwargs):
        if len(params) != len(layers):
            raise ValueError(f"serial of {len(layers)} layers got params for {len(params)}; pass the "
                             f"params from this network's init_fn.")
        for lyr, p, kw in zip(layers, params, _split_rng(kwargs, len(layers))):
            x = lyr[1](p, x, **kw)
        return x

    def transform(k, **kwargs):
        for t in transforms:
            k = t(k, **kwargs)
        return k

    names = ", ".join(lyr[2].name for lyr in layers)
    return layer(f"serial({names})", init_fn, apply_fn, transform, mask_fn=masking.PASS_THROUGH)


def repeat(layer: Layer, n: int) -> Layer:
    """`layer` applied `n` times in a compiled loop (`lax.scan`): `serial(*[layer] * n)` with
    independent parameters per repetition, but one trace of `layer` however large `n` is.

    `layer` must keep the activation shape (its params are stacked along a new leading axis of
    size `n`), and its kernel map must keep the `Kernel`'s static fields (shapes, `is_gaussian`)
    after its first application, which runs outside the loop.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"repeat: n={n}; use a non-negative number of repetitions.")
    init_one, apply_one = layer[0], layer[1]
    step = transform_of(layer, "repeat: layer")
    name = f"repeat({layer[2].name}, {n})"

    def init_fn(rng, input_shape):
        out_shape, _ = init_one(rng, input_shape)
        if tuple(out_shape) != tuple(input_shape):
            raise ValueError(f"{name}: the layer maps shape {tuple(input_shape)} to "
                             f"{tuple(out_shape)}; repeat needs a shape-preserving layer, use "
                             f"serial(*[layer] * n) instead.")
        keys = random.split(rng, n)
        params = jax.vmap(lambda key: init_one(key, input_shape)[1])(keys)
        return input_shape, params

    def apply_fn(params, x, mask_constant=None, **kwargs):
        if mask_constant is not None and not isinstance(x, masking.MaskedArray):
            # Same carry structure (a MaskedArray) on every step of the loop.
            x = masking.MaskedArray(*masking.split(x, mask_constant))

        def body(h, p):
            return apply_one(p, h, **kwargs), None

        return lax.scan(body, x, params, length=n)[0]

    def transform(k, **kwargs):
        if n == 0:
            return k
        k = step(k, **kwargs)

        def body(kernel, _):
            return step(kernel, **kwargs), None

        return lax.scan(body, k, None, length=n - 1)[0]

    return _make_layer(name, init_fn, apply_fn, transform, mask_fn=masking.PASS_THROUGH)


def _expect_branches(value: Any, n: int, name: str, what: str) -> list:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        got = f"a list of {len(value)}" if isinstance(value, (list, tuple)) else "a single input"
        raise ValueError(f"{name} has {n} branches and needs a list of {n} {what}, got {got}; put "
                         f"FanOut({n}) before it.")
    return list(value)


def parallel(*layers: Layer) -> Layer:
    """Applies `layers[i]` to the `i`-th entry of a list of inputs; params are a tuple per branch."""
    layers = tuple(layers)
    n = len(layers)
    transforms = [transform_of(lyr, f"parallel: branch {i}") for i, lyr in enumerate(layers)]
    name = f"parallel({', '.join(lyr[2].name for lyr in layers)})"

    def init_fn(rng, input_shape):
        shapes = _expect_branches(input_shape, n, name, "input shapes")
        outs, params = [], []
        for lyr, shape, key in zip(layers, shapes, random.split(rng, n)):
            out, p = lyr[0](key, shape)
            outs.append(out)
            params.append(p)
        return outs, tuple(params)

    def apply_fn(params, x, **kwargs):
        xs = _expect_branches(x, n, name, "inputs")
        return [lyr[1](p, xi, **kw)
                for lyr, p, xi, kw in zip(layers, params, xs, _split_rng(kwargs, n))]

    def transform(k, **kwargs):
        ks = _expect_branches(k, n, name, "kernels")
        return [t(ki, **kwargs) for t, ki in zip(transforms, ks)]

    return layer(name, init_fn, apply_fn, transform, mask_fn=masking.PASS_THROUGH)


def FanOut(num: int) -> Layer:
    """Copies one input into a list of `num` identical branches."""
    name = f"FanOut({num})"

    def init_fn(rng, input_shape):
        del rng
        return [input_shape] * num, ()

    def apply_fn(params, x, **kwargs):
        del params, kwargs
        return [x] * num

    def transform(k, **kwargs):
        if isinstance(k, list):
            raise ValueError(f"{name} takes one input but got a list of {len(k)}.")
        return [k] * num

    return layer(name, init_fn, apply_fn, transform, mask_fn=masking.PASS_THROUGH)


def _same_shape_merge_init(name: str):
    """`init_fn` of a layer merging branches of one shape into that shape, without parameters."""
    def init_fn(rng, input_shape):
        del rng
        _check_same_shapes(list(input_shape), name)
        return input_shape[0], ()

    return init_fn


def _check_same_shapes(shapes: list, name: str, skip_axis: int | None = None) -> None:
    def strip(s):
        s = list(s)
        if skip_axis is not None:
            del s[skip_axis]
        return s

    if any(strip(s) != strip(shapes[0]) for s in shapes):
        raise ValueError(f"{name}: branch shapes {[tuple(s) for s in shapes]} do not match"
                         f"{'' if skip_axis is None else ' outside the concatenation axis'}.")


def _merge_matrices(ks: list[Kernel], weights: list[float]) -> dict:
    """Weighted sums of the branches' kernels; `ntk` is `None` if any branch lacks it."""
    def combine(mats):
        if any(m is None for m in mats):
            return None
        return sum(w * m for w, m in zip(weights, mats))

    return dict(nngp=combine([k.nngp for k in ks]), ntk=combine([k.ntk for k in ks]),
                cov1=combine([k.cov1 for k in ks]), cov2=combine([k.cov2 for k in ks]))


def FanInSum() -> Layer:
    """Sums a list of branches (kernels add: branches are independent, see the module docstring).

    The sum is Gaussian only if every branch is.
    """
    name = "FanInSum"

    init_fn = _same_shape_merge_init(name)

    def apply_fn(params, x, **kwargs):
        del params, kwargs
        return sum(x[1:], x[0])

    def transform(ks, **kwargs):
        if not isinstance(ks, list):
            raise ValueError(f"{name} needs a list of branches; put FanOut and parallel before it.")
        _check_same_shapes([k.shape1 for k in ks], name)
        return ks[0].replace(**_merge_matrices(ks, [1.0] * len(ks)),
                             is_gaussian=all(k.is_gaussian for k in ks),
                             is_input=all(k.is_input for k in ks))

    return layer(name, init_fn, apply_fn, transform, mask_fn=masking.and_masks)


def FanInProd() -> Layer:
    """Multiplies a list of branches elementwise.

    For independent centred branches the expectation of a product factorises, so
    `nngp = Π_i nngp_i` and, by the product rule, `ntk = Σ_i ntk_i · Π_{j≠i} nngp_j` (same for
    `cov1`/`cov2` as for `nngp`). A product of several branches is not Gaussian.
    """
    name = "FanInProd"

    init_fn = _same_shape_merge_init(name)

    def apply_fn(params, x, **kwargs):
        del params, kwargs
        return functools.reduce(jnp.multiply, x)

    def product(mats):
        return None if any(m is None for m in mats) else functools.reduce(jnp.multiply, mats)

    def transform(ks, **kwargs):
        if not isinstance(ks, list):
            raise ValueError(f"{name} needs a list of branches; put FanOut and parallel before it.")
        _check_same_shapes([k.shape1 for k in ks], name)
        nngps = [k.nngp for k in ks]
        ntk = None
        if all(k.ntk is not None for k in ks):
            ntk = sum(k.ntk * product(nngps[:i] + nngps[i + 1:]) if len(ks) > 1 else k.ntk
                      for i, k in enumerate(ks))
        return ks[0].replace(nngp=product(nngps), ntk=ntk, cov1=product([k.cov1 for k in ks]),
                             cov2=product([k.cov2 for k in ks]),
                             is_gaussian=len(ks) == 1 and ks[0].is_gaussian,
                             is_input=all(k.is_input for k in ks))

    return layer(name, init_fn, apply_fn, transform, mask_fn=masking.and_masks)


def FanInConcat(axis: int = -1) -> Layer:
    """Concatenates a list of branches along the channel axis (the only axis supported).

    The next layer averages over all channels, so the kernel is the channel-count-weighted mean of
    the branches' kernels.
    """
    name = f"FanInConcat(axis={axis})"

    def check_axis(ndim: int) -> None:
        if axis % ndim != ndim - 1:
            raise NotImplementedError(f"{name}: only concatenation along the channel (last) axis "
                                      f"is supported for inputs with {ndim} dimensions.")

    def init_fn(rng, input_shape):
        del rng
        shapes = list(input_shape)
        check_axis(len(shapes[0]))
        _check_same_shapes(shapes, name, skip_axis=-1)
        return tuple(shapes[0][:-1]) + (sum(s[-1] for s in shapes),), ()

    def apply_fn(params, x, **kwargs):
        del params, kwargs
        return jnp.concatenate(list(x), axis=axis)

    def transform(ks, **kwargs):
        if not isinstance(ks, list):
            raise ValueError(f"{name} needs a list of branches; put FanOut and parallel before it.")
        check_axis(len(ks[0].shape1))
        _check_same_shapes([k.shape1 for k in ks], name, skip_axis=-1)
        channels = [k.shape1[-1] for k in ks]
        total = sum(channels)
        merged = _merge_matrices(ks, [c / total for c in channels])
        return ks[0].replace(**merged, is_gaussian=all(k.is_gaussian for k in ks),
                             is_input=all(k.is_input for k in ks),
                             shape1=ks[0].shape1[:-1] + (total,),
                             shape2=ks[0].shape2[:-1] + (sum(k.shape2[-1] for k in ks),))

    return layer(name, init_fn, apply_fn, transform, mask_fn=masking.concat_masks)
