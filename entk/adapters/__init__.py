"""Adapters: models from other frameworks in, as `entk.Model`; their arrays in and out of JAX.

Each framework's adapter package (`entk.adapters.torch`, `entk.adapters.tf`) provides
`is_model(obj)`, `is_tensor(x)`, `to_jax(x)`, `to_native(array, like)` and its `from_*` converter.
This module only picks the adapter, by looking at the type's module names, so a framework is imported
only when an object of it shows up.
"""

from __future__ import annotations

import contextlib
import importlib
import weakref
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from entk.model import Model

PyTree = Any

# Top-level package of an object's type (or of one of its base classes) -> adapter module, converter.
_FRAMEWORKS = {
    "torch": ("entk.adapters.torch", "from_torch"),
    "tensorflow": ("entk.adapters.tf", "from_tf"),
    "keras": ("entk.adapters.tf", "from_tf"),
    "tf_keras": ("entk.adapters.tf", "from_tf"),
}


def _packages_of(obj: Any) -> list[str]:
    """Top-level packages that define the type of `obj` or any of its base classes."""
    return [(cls.__module__ or "").split(".")[0] for cls in type(obj).__mro__]


def _framework_of(obj: Any) -> str | None:
    return next((top for top in _packages_of(obj) if top in _FRAMEWORKS), None)


def __getattr__(name: str) -> Any:
    """`entk.adapters.torch` / `.tf` / `.flax` import on first access (their frameworks with them)."""
    if name in ("torch", "tf", "flax"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_FUNCTION_MODELS: "weakref.WeakKeyDictionary[Callable, Model]" = weakref.WeakKeyDictionary()


def to_model(model: Any, example_input: Any, *, params: PyTree = None, live: bool = False) -> Model:
    """Whatever the user holds, as an `entk.Model`.

    Accepts an `entk.Model`; a PyTorch module; a Keras model or `tf.function`; a Flax module paired with
    its variables, `(module, variables)`; or a plain `f(params, x)` when `params` is given.
    `live=True` lets the model's arrays alias the framework's tensors where the adapter can (torch,
    through DLPack): for one computation that finishes before the caller returns (`entk.ntk`).
    """
    if isinstance(model, Model):
        return model
    framework = _framework_of(model)
    if framework is not None:
        module_name, converter = _FRAMEWORKS[framework]
        adapter = importlib.import_module(module_name)
        if live and hasattr(adapter, "live_model"):
            return adapter.live_model(model, example_input)
        return getattr(adapter, converter)(model, example_input)
    if isinstance(model, tuple) and len(model) == 2 and "flax" in _packages_of(model[0]):
        from entk.adapters.flax import from_flax
        return from_flax(*model)
    if callable(model):
        if params is None:
            raise TypeError("A plain function model needs its parameters: entk.ntk(f, x1, params=...).")
        # One wrapper per function, so compiled kernel functions (keyed by it) are reused across
        # calls; the returned Model always carries the params of this call.
        if model not in _FUNCTION_MODELS:
            _FUNCTION_MODELS[model] = Model.from_function(model, params)
        return _FUNCTION_MODELS[model].replace(params=params)
    raise TypeError(f"entk cannot use a {type(model).__module__}.{type(model).__name__} as a model; "
                    f"pass an entk.Model, a torch.nn.Module, a Keras model, a (flax_module, variables) "
                    f"pair, or a function f(params, x) with params=...")


def precision_scope(model: Any, *arrays: Any) -> contextlib.AbstractContextManager:
    """A context computing in 64 bits when `model` or `arrays` hold float64 and JAX runs 32-bit.

    "Float64 in means float64 computed": a float64 torch module or Keras model, or float64 NumPy /
    torch / TF inputs, turn on JAX's 64-bit mode for entk's own computation only
    (`jax.enable_x64(True)`, thread-local; jit caches keep the two precisions apart). Otherwise, and
    when 64-bit mode is on already, nothing changes (plain JAX float32 arrays stay float32).

    Raises:
      RuntimeError: 64-bit computation is needed but this JAX has no `jax.enable_x64` context; the
        message says to turn 64-bit mode on globally.
    """
    if jax.config.x64_enabled or not (_model_has_float64(model)
                                      or any(_is_wide(leaf) for leaf in _leaves(arrays))):
        return contextlib.nullcontext()
    enable = getattr(jax, "enable_x64", None)
    if enable is None:
        raise RuntimeError(
            "The model or its inputs are float64, but JAX runs in 32-bit mode and this JAX version "
            "has no jax.enable_x64 context to compute in float64 for this call only. Call "
            "jax.config.update('jax_enable_x64', True) at the start of the program (or cast model "
            "and inputs to float32).")
    return enable(True)


def _leaves(tree: Any) -> list:
    return jax.tree_util.tree_leaves(tree)


def _is_wide(leaf: Any) -> bool:
    """Whether an array of any framework (NumPy, torch, TF) is float64 or complex128."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return False
    name = str(getattr(dtype, "name", None) or dtype).removeprefix("torch.")
    return name in ("float64", "complex128", "double", "cdouble")


def _model_has_float64(model: Any) -> bool:
    if isinstance(model, Model):
        return any(_is_wide(leaf) for leaf in _leaves((model.params, model.state)))
    framework = _framework_of(model)
    if framework is not None:
        adapter = importlib.import_module(_FRAMEWORKS[framework][0])
        return bool(getattr(adapter, "has_float64", lambda _: False)(model))
    if isinstance(model, tuple) and len(model) == 2 and "flax" in _packages_of(model[0]):
        return any(_is_wide(leaf) for leaf in _leaves(model[1]))
    return False


def array_converters(example: Any) -> tuple[Callable[[Any], jax.Array], Callable[[jax.Array, Any], Any]]:
    """`(to_jax, to_native)` for the kind of array `example` is (first leaf of a pytree)."""
    leaves = jax.tree_util.tree_leaves(example)
    first = leaves[0] if leaves else example
    framework = _framework_of(first)
    if framework is not None:
        adapter = importlib.import_module(_FRAMEWORKS[framework][0])
        return adapter.to_jax, adapter.to_native
    if isinstance(first, np.ndarray):
        return jnp.asarray, lambda array, like: np.asarray(array)
    return jnp.asarray, lambda array, like: array
