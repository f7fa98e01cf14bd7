"""The ATen → JAX op registry used by export mode.

`torch.export` + `run_decompositions()` reduce a PyTorch model to a graph of *core ATen* ops
(`aten.convolution.default`, `aten.addmm.default`, ...). Each op is translated by one small function
registered here, written with `jax.numpy` / `jax.lax` primitives only, so the translated model is plain
JAX (jit, vmap, jvp, vjp and the structured-derivatives strategy all see ordinary primitives).

Translation functions receive the node's arguments with graph values replaced by JAX arrays (or Python
ints for symbolic sizes) and `torch.dtype`s replaced by NumPy dtypes; they return a JAX array, a tuple
of them, or Python scalars for symbolic-size ops. The exporter casts every result to the dtype PyTorch
recorded for the node, so functions need not reproduce PyTorch's type-promotion rules.

Where PyTorch defines a derivative at a non-differentiable point (ReLU at 0, clamp at its bounds), the
translation picks the formulation whose JAX derivative agrees, so kernels match `torch.func` exactly.

The ops themselves live in family modules (`aten_elementwise`, `aten_shape`, `aten_strided`,
`aten_reduce`, `aten_nn`), imported by `lookup` on first use. A translation with the attribute
`wants_node = True` also receives its FX node as `node=` (to read the recorded strides of its inputs).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import numpy as np

TranslationFn = Callable[..., Any]

# "name.overload" (one overload) or "name" (every overload of an aten op) -> translation.
_ATEN: dict[str, TranslationFn] = {}
# Python callables that appear in exported graphs (operator.getitem, operator.mul on symbolic sizes).
_PYTHON: dict[Any, TranslationFn] = {}

_FAMILIES = ("aten_elementwise", "aten_shape", "aten_strided", "aten_reduce", "aten_nn",
             "autograd_function")
_loaded = False


def register(*names: str) -> Callable[[TranslationFn], TranslationFn]:
    """Registers a translation for aten ops named `"name"` (every overload) or `"name.overload"`
    (ops of another namespace: `"namespace::name"`, as `entk_autograd::apply`)."""

    def wrap(fn: TranslationFn) -> TranslationFn:
        for name in names:
            _ATEN[name] = fn
        return fn

    return wrap


def register_python(*targets: Any) -> Callable[[TranslationFn], TranslationFn]:
    """Registers a translation for plain Python callables used as graph targets."""

    def wrap(fn: TranslationFn) -> TranslationFn:
        for target in targets:
            _PYTHON[target] = fn
        return fn

    return wrap


def _load_families() -> None:
    global _loaded
    if not _loaded:
        for family in _FAMILIES:
            importlib.import_module(f"entk.adapters.torch.{family}")
        _loaded = True


def op_name(target: Any) -> str:
    """A readable name for a graph target: `"aten.convolution.default"`, `"operator.getitem"`."""
    if hasattr(target, "_opname") and hasattr(target, "namespace"):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    module = {"_operator": "operator"}.get(module, module)
    return f"{module}.{name}" if module else name


def lookup(target: Any) -> TranslationFn | None:
    """The translation for a graph target (an `OpOverload` or Python callable), or None if unsupported."""
    _load_families()
    if hasattr(target, "_opname") and hasattr(target, "namespace"):
        if target.namespace != "aten":  # registered as "namespace::name" (entk's own ops)
            return (_ATEN.get(f"{target.namespace}::{target._opname}.{target._overloadname}")
                    or _ATEN.get(f"{target.namespace}::{target._opname}"))
        return (_ATEN.get(f"{target._opname}.{target._overloadname}")
                or _ATEN.get(target._opname))
    try:
        return _PYTHON.get(target)
    except TypeError:  # unhashable target
        return None


def supported_ops() -> list[str]:
    """Every registered aten op name (for documentation and error messages)."""
    _load_families()
    return sorted(_ATEN)


# ---------------------------------------------------------------- helpers shared by the families


def norm_dim(dim: int, ndim: int) -> int:
    """A non-negative axis; PyTorch allows dim 0 / -1 on 0-d tensors, so `ndim` is at least 1."""
    n = max(ndim, 1)
    if not -n <= dim < n:
        raise IndexError(f"dimension {dim} is out of range for a tensor with {ndim} dimension(s)")
    return dim % n


def norm_dims(dims: Any, ndim: int) -> tuple[int, ...]:
    """Axes as a sorted tuple; `None` or `[]` means every axis (PyTorch's reduction convention)."""
    if dims is None:
        return tuple(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    if len(dims) == 0:
        return tuple(range(ndim))
    if ndim == 0:
        return ()
    return tuple(sorted({norm_dim(d, ndim) for d in dims}))


def as_int_list(values: Any) -> list[int]:
    """A size / stride argument as a list of Python ints (accepts an int for 1-element lists)."""
    if isinstance(values, (int, np.integer)):
        return [int(values)]
    return [int(v) for v in values]


def expand_param(value: Any, n: int) -> list[int]:
    """Kernel size / stride / padding as a list of length `n` (PyTorch repeats a single value)."""
    values = as_int_list(value)
    if len(values) == 1 and n > 1:
        values = values * n
    if len(values) != n:
        raise ValueError(f"expected {n} values, got {values}")
    return values


class ShapeAssertionError(ValueError):
    """A runtime assertion of the exported graph (on symbolic sizes) fails for the given shapes."""


class Unavailable:
    """A node output that the translation does not compute (e.g. max-pool indices).

    Using it as an input to another op raises a clear error instead of silently computing garbage.
    """

    def __init__(self, what: str):
        self.what = what

    def __repr__(self) -> str:
        return f"<unavailable: {self.what}>"


__all__ = ["register", "register_python", "lookup", "op_name", "supported_ops", "norm_dim",
           "norm_dims", "as_int_list", "expand_param", "Unavailable", "ShapeAssertionError"]
