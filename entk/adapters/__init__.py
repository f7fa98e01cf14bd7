"""Adapters: models from other frameworks in, as `entk.Model`; their arrays in and out of JAX.

Each framework's adapter package (`entk.adapters.torch`, `entk.adapters.tf`) provides
`is_model(obj)`, `is_tensor(x)`, `to_jax(x)`, `to_native(array, like)` and its `from_*` converter.
This module only picks the adapter, by looking at the type's module names, so a framework is imported
only when an object of it shows up.
"""

from __future__ import annotations

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


def to_model(model: Any, example_input: Any, *, params: PyTree = None) -> Model:
    """Whatever the user holds, as an `entk.Model`.

    Accepts an `entk.Model`; a PyTorch module; a Keras model or `tf.function`; a Flax module paired with
    its variables, `(module, variables)`; or a plain `f(params, x)` when `params` is given.
    """
    if isinstance(model, Model):
        return model
    framework = _framework_of(model)
    if framework is not None:
        module_name, converter = _FRAMEWORKS[framework]
        return getattr(importlib.import_module(module_name), converter)(model, example_input)
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
