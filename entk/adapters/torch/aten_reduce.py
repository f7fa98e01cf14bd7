"""Reduction ATen ops: sums, means, variances, extrema, softmax, sorting, cumulative ops.

Derivative conventions follow PyTorch's: `amax`/`max()` share the gradient evenly among ties (as
`jnp.max` does), while `max.dim`/`topk`/`sort` route it to the selected index (as `take_along_axis`
of an argmax does).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
import numpy as np

from entk.adapters.torch.aten import norm_dim, norm_dims, register


@register("sum.dim_IntList", "sum.default", "sum.dim_DimnameList")
def sum_(self, dim=None, keepdim=False, *, dtype=None):
    x = self if dtype is None else self.astype(dtype)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.int64)
    return jnp.sum(x, axis=norm_dims(dim, x.ndim), keepdims=keepdim)


@register("mean.dim", "mean.default")
def mean(self, dim=None, keepdim=False, *, dtype=None):
    x = self if dtype is None else self.astype(dtype)
    return jnp.mean(x, axis=norm_dims(dim, x.ndim), keepdims=keepdim)


@register("prod.dim_int", "prod.default")
def prod(self, dim=None, keepdim=False, *, dtype=None):
    x = self if dtype is None else self.astype(dtype)
    return jnp.prod(x, axis=norm_dims(dim, x.ndim), keepdims=keepdim)


def _correction(correction, unbiased):
    if correction is not None:
        return correction
    return 1 if unbiased is None or unbiased else 0


def _var_mean(x, dim, correction, keepdim):
    axes = norm_dims(dim, x.ndim)
    m = jnp.mean(x, axis=axes, keepdims=True)
    n = 1
    for a in axes:
        n *= x.shape[a]
    centered = x - m
    var = jnp.sum(centered * centered, axis=axes, keepdims=keepdim) / max(n - correction, 0)
    return var, (m if keepdim else jnp.squeeze(m, axes))


@register("var.correction", "var.dim", "var.default")
def var(self, dim=None, unbiased=None, keepdim=False, *, correction=None):
    if isinstance(dim, bool):  # var.default(self, unbiased)
        dim, unbiased = None, dim
    return _var_mean(self, dim, _correction(correction, unbiased), keepdim)[0]


@register("std.correction", "std.dim", "std.default")
def std(self, dim=None, unbiased=None, keepdim=False, *, correction=None):
    return jnp.sqrt(var(self, dim, unbiased, keepdim, correction=correction))


@register("var_mean.correction", "var_mean.dim", "var_mean.default")
def var_mean(self, dim=None, unbiased=None, keepdim=False, *, correction=None):
    if isinstance(dim, bool):
        dim, unbiased = None, dim
    return _var_mean(self, dim, _correction(correction, unbiased), keepdim)


@register("amax")
def amax(self, dim=(), keepdim=False):
    return jnp.max(self, axis=norm_dims(dim, self.ndim), keepdims=keepdim)


@register("amin")
def amin(self, dim=(), keepdim=False):
    return jnp.min(self, axis=norm_dims(dim, self.ndim), keepdims=keepdim)


@register("max.default")
def max_(self):
    return jnp.max(self)


@register("min.default")
def min_(self):
    return jnp.min(self)


def _select_along(self, index, d, keepdim):
    values = jnp.take_along_axis(self, jnp.expand_dims(index, d), axis=d)
    return (values, jnp.expand_dims(index, d)) if keepdim else (jnp.squeeze(values, d), index)


@register("max.dim")
def max_dim(self, dim, keepdim=False):
    if self.ndim == 0:
        return self, jnp.zeros((), jnp.int64)
    d = norm_dim(dim, self.ndim)
    return _select_along(self, jnp.argmax(self, axis=d), d, keepdim)


@register("min.dim")
def min_dim(self, dim, keepdim=False):
    if self.ndim == 0:
        return self, jnp.zeros((), jnp.int64)
    d = norm_dim(dim, self.ndim)
    return _select_along(self, jnp.argmin(self, axis=d), d, keepdim)


@register("argmax")
def argmax(self, dim=None, keepdim=False):
    if dim is None:
        out = jnp.argmax(jnp.reshape(self, (-1,)))
        return jnp.reshape(out, (1,) * self.ndim) if keepdim else out
    return jnp.argmax(self, axis=norm_dim(dim, self.ndim), keepdims=keepdim)


@register("argmin")
def argmin(self, dim=None, keepdim=False):
    if dim is None:
        out = jnp.argmin(jnp.reshape(self, (-1,)))
        return jnp.reshape(out, (1,) * self.ndim) if keepdim else out
    return jnp.argmin(self, axis=norm_dim(dim, self.ndim), keepdims=keepdim)


@register("any.default", "any.dim", "any.dims")
def any_(self, dim=None, keepdim=False):
    return jnp.any(self, axis=norm_dims(dim, self.ndim), keepdims=keepdim)


@register("all.default", "all.dim", "all.dims")
def all_(self, dim=None, keepdim=False):
    return jnp.all(self, axis=norm_dims(dim, self.ndim), keepdims=keepdim)


@register("count_nonzero.dim_IntList", "count_nonzero.default")
def count_nonzero(self, dim=None):
    return jnp.sum(self != 0, axis=norm_dims(dim, self.ndim))


@register("linalg_vector_norm")
def linalg_vector_norm(self, ord=2, dim=None, keepdim=False, *, dtype=None):  # noqa: A002
    x = jnp.abs(self if dtype is None else self.astype(dtype))
    axes = norm_dims(dim, x.ndim)
    if ord == float("inf"):
        return jnp.max(x, axis=axes, keepdims=keepdim)
    if ord == float("-inf"):
        return jnp.min(x, axis=axes, keepdims=keepdim)
    if ord == 0:
        return jnp.sum(x != 0, axis=axes, keepdims=keepdim).astype(x.dtype)
    if ord == 1:
        return jnp.sum(x, axis=axes, keepdims=keepdim)
    # PyTorch's norm has derivative 0 at a zero vector; a plain root has 0·∞ = NaN there, so the root
    # is taken of a sum that is never 0 (the double `where` keeps the NaN out of the other branch).
    total = jnp.sum(x * x if ord == 2 else x ** ord, axis=axes, keepdims=keepdim)
    nonzero = total > 0
    safe = jnp.where(nonzero, total, jnp.ones_like(total))
    root = jnp.sqrt(safe) if ord == 2 else safe ** (1.0 / ord)
    return jnp.where(nonzero, root, jnp.zeros_like(root))


@register("logsumexp")
def logsumexp(self, dim=(), keepdim=False):
    axes = norm_dims(dim, self.ndim)
    m = lax.stop_gradient(jnp.max(self, axis=axes, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))
    out = jnp.log(jnp.sum(jnp.exp(self - m), axis=axes, keepdims=True)) + m
    return out if keepdim else jnp.squeeze(out, axes)


def _shifted(x, d):
    # Softmax is invariant to the shift, so the max is a constant for differentiation.
    m = lax.stop_gradient(jnp.max(x, axis=d, keepdims=True))
    return x - jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))


def _softmax_input(x, third, dtype):
    # _softmax(self, dim, half_to_float: bool) or softmax.int(self, dim, dtype=None).
    if isinstance(third, np.dtype):
        dtype = third
    elif third is True:
        dtype = np.dtype("float32")
    return x if dtype is None else x.astype(dtype)


@register("_softmax", "softmax.int")
def softmax(self, dim, half_to_float=False, *, dtype=None):
    x = _softmax_input(self, half_to_float, dtype)
    if x.ndim == 0:
        return jnp.ones_like(x)
    d = norm_dim(dim, x.ndim)
    e = jnp.exp(_shifted(x, d))
    return e / jnp.sum(e, axis=d, keepdims=True)


@register("_safe_softmax")
def safe_softmax(self, dim, dtype=None):
    """Softmax that returns 0 (not NaN) on rows that are entirely -inf (fully masked attention)."""
    x = _softmax_input(self, dtype, None)
    if x.ndim == 0:
        return jnp.ones_like(x)
    d = norm_dim(dim, x.ndim)
    e = jnp.exp(_shifted(x, d))
    total = jnp.sum(e, axis=d, keepdims=True)
    return jnp.where(total > 0, e / jnp.where(total > 0, total, jnp.ones_like(total)), 0)


@register("_log_softmax", "log_softmax.int")
def log_softmax(self, dim, half_to_float=False, *, dtype=None):
    x = _softmax_input(self, half_to_float, dtype)
    if x.ndim == 0:
        return jnp.zeros_like(x)
    d = norm_dim(dim, x.ndim)
    s = _shifted(x, d)
    return s - jnp.log(jnp.sum(jnp.exp(s), axis=d, keepdims=True))


@register("cumsum")
def cumsum(self, dim, *, dtype=None):
    x = self if dtype is None else self.astype(dtype)
    return jnp.cumsum(x, axis=norm_dim(dim, x.ndim)) if x.ndim else x


@register("cumprod")
def cumprod(self, dim, *, dtype=None):
    x = self if dtype is None else self.astype(dtype)
    return jnp.cumprod(x, axis=norm_dim(dim, x.ndim)) if x.ndim else x


@register("topk")
def topk(self, k, dim=-1, largest=True, sorted=True):  # noqa: A002
    d = norm_dim(dim, self.ndim)
    moved = jnp.moveaxis(self, d, -1)
    _, idx = lax.top_k(moved if largest else -moved, k)
    values = jnp.take_along_axis(moved, idx, axis=-1)
    return jnp.moveaxis(values, -1, d), jnp.moveaxis(idx, -1, d)


@register("sort.default", "sort.stable")
def sort(self, *args, stable=None, dim=-1, descending=False):
    if args:  # sort.default(self, dim, descending) or sort.stable(self, *, stable, dim, descending)
        dim = args[0]
        descending = args[1] if len(args) > 1 else descending
    if self.ndim == 0:
        return self, jnp.zeros((), jnp.int64)
    d = norm_dim(dim, self.ndim)
    idx = jnp.argsort(self, axis=d, stable=True, descending=descending)
    return jnp.take_along_axis(self, idx, axis=d), idx


@register("argsort.default", "argsort.stable")
def argsort(self, *args, stable=None, dim=-1, descending=False):
    return sort(self, *args, stable=stable, dim=dim, descending=descending)[1]


__all__: list[str] = []
