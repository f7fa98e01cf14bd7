"""Elementwise ATen ops: arithmetic, comparisons, logic, unary math, activations, casts.

Non-smooth ops are written so that JAX's derivative equals PyTorch's at the kinks (see each function),
because kernels are compared with `torch.func` to 1e-10.
"""

from __future__ import annotations

import math
import operator

import jax.numpy as jnp
from jax import lax
import numpy as np

from entk.adapters.torch.aten import register, register_python

# ---------------------------------------------------------------- arithmetic


def _scaled(other, alpha):
    return other if alpha is None or alpha == 1 else other * alpha


@register("add")
def add(self, other, *, alpha=1):
    return self + _scaled(other, alpha)


@register("sub")
def sub(self, other, *, alpha=1):
    return self - _scaled(other, alpha)


@register("rsub")
def rsub(self, other, *, alpha=1):
    return other - _scaled(self, alpha)


@register("mul")
def mul(self, other):
    return self * other


@register("div.Tensor", "div.Scalar", "true_divide")
def div(self, other):
    return jnp.true_divide(self, other)


@register("div.Tensor_mode", "div.Scalar_mode")
def div_mode(self, other, *, rounding_mode=None):
    if rounding_mode is None:
        return jnp.true_divide(self, other)
    if rounding_mode == "floor":
        return jnp.floor_divide(self, other)
    if rounding_mode == "trunc":
        if jnp.issubdtype(jnp.result_type(self, other), jnp.integer):
            q = jnp.floor_divide(self, other)
            r = self - q * other
            return jnp.where((r != 0) & ((r < 0) != (other < 0)), q + 1, q)
        return jnp.trunc(jnp.true_divide(self, other))
    raise ValueError(f"div: unknown rounding_mode {rounding_mode!r}")


@register("floor_divide")
def floor_divide(self, other):
    return jnp.floor_divide(self, other)


@register("remainder")
def remainder(self, other):
    return jnp.remainder(self, other)


@register("fmod")
def fmod(self, other):
    return jnp.fmod(self, other)


def _power(base, exponent):
    # An integral Python exponent becomes lax.integer_pow: exact, and its derivative at 0 is finite.
    if isinstance(exponent, float) and exponent.is_integer() and abs(exponent) <= 64:
        exponent = int(exponent)
    if isinstance(exponent, int) and not isinstance(exponent, bool):
        if not isinstance(base, (int, float)) and jnp.issubdtype(jnp.asarray(base).dtype,
                                                                  jnp.integer) and exponent < 0:
            raise ValueError("pow: integers to negative integer powers are not allowed")
        return lax.integer_pow(jnp.asarray(base), exponent)
    return jnp.power(base, exponent)


@register("pow")
def pow_(self, exponent):
    return _power(self, exponent)


@register("neg")
def neg(self):
    return -self


@register("reciprocal")
def reciprocal(self):
    return 1 / self


@register("addcmul")
def addcmul(self, tensor1, tensor2, *, value=1):
    return self + value * tensor1 * tensor2


@register("addcdiv")
def addcdiv(self, tensor1, tensor2, *, value=1):
    return self + value * tensor1 / tensor2


@register("lerp.Scalar", "lerp.Tensor")
def lerp(self, end, weight):
    return self + weight * (end - self)


# ---------------------------------------------------------------- unary math

_UNARY = {
    "abs": jnp.abs, "sign": jnp.sign, "sgn": jnp.sign, "exp": jnp.exp, "exp2": jnp.exp2,
    "expm1": jnp.expm1, "log": jnp.log, "log2": jnp.log2, "log10": jnp.log10, "log1p": jnp.log1p,
    "sqrt": jnp.sqrt, "rsqrt": lax.rsqrt, "sin": jnp.sin, "cos": jnp.cos, "tan": jnp.tan,
    "asin": jnp.arcsin, "acos": jnp.arccos, "atan": jnp.arctan, "sinh": jnp.sinh, "cosh": jnp.cosh,
    "tanh": jnp.tanh, "asinh": jnp.arcsinh, "acosh": jnp.arccosh, "atanh": jnp.arctanh,
    "erf": lax.erf, "erfc": lax.erfc, "erfinv": lax.erf_inv, "floor": jnp.floor, "ceil": jnp.ceil,
    "round.default": jnp.round, "trunc": jnp.trunc, "fix": jnp.trunc, "sigmoid": lax.logistic,
    "isnan": jnp.isnan, "isinf": jnp.isinf, "isfinite": jnp.isfinite, "lgamma": lax.lgamma,
    "digamma": lax.digamma, "square": lambda x: lax.integer_pow(x, 2),
}


def _unary(fn):
    def translate(self):
        return fn(self)
    return translate


for _name, _fn in _UNARY.items():
    register(_name)(_unary(_fn))


@register("round.decimals")
def round_decimals(self, *, decimals=0):
    return jnp.round(self, decimals)


@register("atan2")
def atan2(self, other):
    return jnp.arctan2(self, other)


@register("nan_to_num")
def nan_to_num(self, nan=0.0, posinf=None, neginf=None):
    return jnp.nan_to_num(self, nan=nan, posinf=posinf, neginf=neginf)


# ---------------------------------------------------------------- activations


@register("relu")
def relu(self):
    # where(x > 0, x, 0): derivative 0 at x == 0, as PyTorch's threshold_backward.
    return jnp.where(self > 0, self, jnp.zeros_like(self))


@register("leaky_relu")
def leaky_relu(self, negative_slope=0.01):
    return jnp.where(self > 0, self, self * negative_slope)


@register("elu")
def elu(self, alpha=1.0, scale=1.0, input_scale=1.0):
    negative = (jnp.expm1(jnp.minimum(self, 0) * input_scale)) * (alpha * scale)
    return jnp.where(self > 0, self * scale, negative)


@register("celu")
def celu(self, alpha=1.0):
    return jnp.where(self > 0, self, alpha * jnp.expm1(jnp.minimum(self, 0) / alpha))


@register("selu")
def selu(self):
    alpha, scale = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
    return elu(self, alpha, scale)


@register("hardtanh")
def hardtanh(self, min_val=-1.0, max_val=1.0):
    # PyTorch's hardtanh_backward passes the gradient only strictly inside (min, max).
    return jnp.where(self <= min_val, jnp.asarray(min_val, self.dtype),
                     jnp.where(self >= max_val, jnp.asarray(max_val, self.dtype), self))


@register("hardsigmoid")
def hardsigmoid(self):
    return hardtanh(self / 6 + 0.5, 0.0, 1.0)


@register("hardswish")
def hardswish(self):
    # PyTorch's hardswish_backward: 0 below -3, 1 above 3, x/3 + 1/2 on [-3, 3].
    return jnp.where(self < -3, jnp.zeros_like(self),
                     jnp.where(self <= 3, self * (self + 3) / 6, self))


@register("gelu")
def gelu(self, *, approximate="none"):
    if approximate == "tanh":
        inner = math.sqrt(2 / math.pi) * (self + 0.044715 * lax.integer_pow(self, 3))
        return 0.5 * self * (1 + jnp.tanh(inner))
    return 0.5 * self * (1 + lax.erf(self * (1 / math.sqrt(2))))


@register("silu")
def silu(self):
    return self * lax.logistic(self)


@register("mish")
def mish(self):
    return self * jnp.tanh(_softplus(self, 1.0, 20.0))


def _softplus(x, beta, threshold):
    bx = x * beta
    safe = jnp.where(bx > threshold, jnp.zeros_like(bx), bx)
    return jnp.where(bx > threshold, x, jnp.log1p(jnp.exp(safe)) / beta)


@register("softplus")
def softplus(self, beta=1.0, threshold=20.0):
    return _softplus(self, beta, threshold)


@register("logit")
def logit(self, eps=None):
    x = self if eps is None else jnp.clip(self, eps, 1 - eps)
    return jnp.log(x / (1 - x))


# ---------------------------------------------------------------- clamping, min/max, selection


def _clamp(x, lo, hi):
    # PyTorch's clamp_backward passes the gradient where lo <= x <= hi (bounds included).
    if lo is not None:
        x = jnp.where(x < lo, jnp.asarray(lo, x.dtype) if not hasattr(lo, "shape") else lo, x)
    if hi is not None:
        x = jnp.where(x > hi, jnp.asarray(hi, x.dtype) if not hasattr(hi, "shape") else hi, x)
    return x


@register("clamp")
def clamp(self, min=None, max=None):  # noqa: A002 - PyTorch's argument names
    return _clamp(self, min, max)


@register("clip")
def clip(self, min=None, max=None):  # noqa: A002
    return _clamp(self, min, max)


@register("clamp_min")
def clamp_min(self, min):  # noqa: A002
    return _clamp(self, min, None)


@register("clamp_max")
def clamp_max(self, max):  # noqa: A002
    return _clamp(self, None, max)


@register("maximum", "max.other")
def maximum(self, other):
    return jnp.maximum(self, other)


@register("minimum", "min.other")
def minimum(self, other):
    return jnp.minimum(self, other)


@register("fmax")
def fmax(self, other):
    return jnp.fmax(self, other)


@register("fmin")
def fmin(self, other):
    return jnp.fmin(self, other)


@register("where.self", "where.ScalarSelf", "where.ScalarOther", "where.Scalar")
def where(condition, self, other):
    return jnp.where(condition, self, other)


@register("masked_fill")
def masked_fill(self, mask, value):
    return jnp.where(mask, jnp.asarray(value, dtype=self.dtype), self)


# ---------------------------------------------------------------- comparisons and logic

_BINARY = {
    "eq": jnp.equal, "ne": jnp.not_equal, "lt": jnp.less, "le": jnp.less_equal,
    "gt": jnp.greater, "ge": jnp.greater_equal, "logical_and": jnp.logical_and,
    "logical_or": jnp.logical_or, "logical_xor": jnp.logical_xor, "bitwise_and": jnp.bitwise_and,
    "bitwise_or": jnp.bitwise_or, "bitwise_xor": jnp.bitwise_xor,
    "bitwise_left_shift": jnp.left_shift, "bitwise_right_shift": jnp.right_shift,
}


def _binary(fn):
    def translate(self, other):
        return fn(self, other)
    return translate


for _name, _fn in _BINARY.items():
    register(_name)(_binary(_fn))


@register("logical_not")
def logical_not(self):
    return jnp.logical_not(self)


@register("bitwise_not")
def bitwise_not(self):
    return jnp.logical_not(self) if self.dtype == jnp.bool_ else jnp.bitwise_not(self)


# ---------------------------------------------------------------- copies and casts


@register("clone", "alias", "alias_copy", "lift_fresh_copy", "lift_fresh", "contiguous", "positive",
          "_conj", "resolve_conj", "resolve_neg")
def identity(self, *args, **kwargs):
    return self


@register("detach", "detach_copy")
def detach(self):
    """`tensor.detach()`, and the outputs of `torch.no_grad()` blocks (see autograd_semantics.py):
    PyTorch does not differentiate through them, so neither may JAX."""
    return lax.stop_gradient(self)


@register("_to_copy", "to.dtype", "to.dtype_layout", "to.device", "_to_dim_order_copy")
def to_copy(self, *args, dtype=None, **kwargs):
    for a in args:  # to.dtype(self, dtype, ...) / to.device(self, device, dtype, ...)
        if isinstance(a, np.dtype):
            dtype = a
    return self if dtype is None else self.astype(dtype)


@register("type_as")
def type_as(self, other):
    return self.astype(other.dtype)


@register("copy")
def copy(self, src, non_blocking=False):
    return jnp.broadcast_to(jnp.asarray(src).astype(self.dtype), self.shape)


@register("fill.Scalar", "fill.Tensor")
def fill(self, value):
    return jnp.full(self.shape, value, dtype=self.dtype)


# ---------------------------------------------------------------- Python ops on symbolic sizes

_PY_OPS = {
    operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
    operator.floordiv: operator.floordiv, operator.truediv: operator.truediv,
    operator.mod: operator.mod, operator.pow: operator.pow, operator.neg: operator.neg,
    operator.eq: operator.eq, operator.ne: operator.ne, operator.lt: operator.lt,
    operator.le: operator.le, operator.gt: operator.gt, operator.ge: operator.ge,
    operator.and_: operator.and_, operator.or_: operator.or_, operator.not_: operator.not_,
    operator.getitem: operator.getitem, math.ceil: math.ceil, math.floor: math.floor,
    math.sqrt: math.sqrt, abs: abs, max: max, min: min, int: int, float: float,
}
for _target, _fn in _PY_OPS.items():
    register_python(_target)(_fn)


def _register_torch_sym_ops() -> None:
    import torch

    for name, fn in {"sym_float": float, "sym_int": int, "sym_max": max, "sym_min": min,
                     "sym_not": operator.not_, "sym_sqrt": math.sqrt,
                     "sym_ite": lambda c, a, b: a if c else b}.items():
        target = getattr(torch, name, None)
        if target is not None:
            register_python(target)(fn)


_register_torch_sym_ops()

__all__: list[str] = []
