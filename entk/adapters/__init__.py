"""Adapters: the one place that knows which framework an object comes from and how to use it.

The public contract every entry point (`entk.ntk`, `entk.compare`, `entk.linearize`, the empirical
kernel functions, `entk.compute_kernel`, `NTKMonitor`, `entk.metrics`, the CLI's SPEC) goes through:

- **identify**: `framework_of(obj)` names the framework of a model or array (`"torch"`,
  `"tensorflow"`, `"keras"`, `"tf_keras"`, or None); `adapter_for(obj)` gives its adapter module;
  `needs_example(model)` says whether a model must see an input before it can be converted;
- **convert arrays**: `array_converters(example)` gives `(to_jax, to_native)` for the kind of array
  `example` is, `call_converter(example)` what feeds a compiled function fastest; `to_numpy(x)` reads
  any framework's array into NumPy without losing precision;
- **read a live model**: `current_tensors(model, example_input)` reads its current parameters and state
  (for torch: aliasing the tensors' memory, for one computation that is waited for);
- **convert models**: `to_model(model, example_input, params=...)`: whatever the user holds as an
  `entk.Model`; `check_params(params, ...)` refuses parameters of another framework by name.

Each framework's adapter package (`entk.adapters.torch`, `entk.adapters.tf`) provides `is_model(obj)`,
`is_tensor(x)`, `to_jax(x)`, `to_native(array, like)`, `to_numpy(x)` and its `from_*` converter (and
may provide `to_call_arg(x)`, see `call_converter`). This
module only picks the adapter, by looking at the type's module names, so a framework is imported only
when an object of it shows up.
"""

from __future__ import annotations

import contextlib
import importlib
import types
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


def framework_of(obj: Any) -> str | None:
    """The framework a model or array belongs to: `"torch"`, `"tensorflow"`, `"keras"`, `"tf_keras"`,
    or None (JAX, NumPy, Flax, plain Python). Looks at type names only: imports nothing."""
    return next((top for top in _packages_of(obj) if top in _FRAMEWORKS), None)


def adapter_for(obj: Any) -> types.ModuleType | None:
    """The adapter module (`entk.adapters.torch` / `.tf`) for `obj`'s framework, or None."""
    framework = framework_of(obj)
    return None if framework is None else importlib.import_module(_FRAMEWORKS[framework][0])


def is_flax_pair(obj: Any) -> bool:
    """Whether `obj` is a `(flax_module, variables)` pair."""
    return isinstance(obj, tuple) and len(obj) == 2 and "flax" in _packages_of(obj[0])


def needs_example(model: Any) -> bool:
    """Whether `model` is a framework object (torch module, Keras model, `tf.function`) that is
    converted to an `entk.Model` only once an input is known (`to_model(model, example_input)`)."""
    return not isinstance(model, Model) and framework_of(model) is not None


def __getattr__(name: str) -> Any:
    """`entk.adapters.torch` / `.tf` / `.flax` import on first access (their frameworks with them)."""
    if name in ("torch", "tf", "flax"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_FUNCTION_MODELS: "weakref.WeakKeyDictionary[Callable, Model]" = weakref.WeakKeyDictionary()

# What to call instead, per framework, for the error messages.
_CALLS = {"torch": "entk.ntk(module, x)", "tensorflow": "entk.ntk(keras_model, x)",
          "keras": "entk.ntk(keras_model, x)", "tf_keras": "entk.ntk(keras_model, x)"}


def to_model(model: Any, example_input: Any = None, *, params: PyTree = None,
             live: bool = False) -> Model:
    """Whatever the user holds, as an `entk.Model`.

    Accepts an `entk.Model`; a PyTorch module; a Keras model or `tf.function`; a Flax module paired with
    its variables, `(module, variables)`; or a plain `f(params, x)` when `params` is given.
    `example_input` (an input batch, the model's kind of array, NumPy or JAX) is needed for the
    framework objects only. `params`, when given, replaces the model's own parameters (for a
    framework model: a pytree of JAX arrays structured like `to_model(model, x).params`, or the
    framework's own tensors under the same names, e.g. `dict(module.named_parameters())`).
    `live=True` lets the model's arrays alias the framework's tensors where the adapter can (torch,
    through DLPack): for one computation that finishes before the caller returns (`entk.ntk`).

    Raises:
      TypeError: `model` is none of these, a plain function came without `params`, or `params`
        holds another framework's tensors that cannot be matched to the model's parameters; each
        message names the call to make instead.
    """
    if isinstance(model, Model):
        return model if params is None else model.replace(params=_own_params(model, params, "model"))
    adapter = adapter_for(model)
    if adapter is not None:
        if example_input is None:
            raise TypeError(f"Converting a {_type_name(model)} needs an example input batch: "
                            f"entk.adapters.to_model(model, x).")
        converted = (adapter.live_model(model, example_input) if live and hasattr(adapter, "live_model")
                     else getattr(adapter, _FRAMEWORKS[framework_of(model)][1])(model, example_input))
        return converted if params is None else converted.replace(
            params=_own_params(converted, params, f"the {_type_name(model)}"))
    if is_flax_pair(model):
        from entk.adapters.flax import from_flax
        converted = from_flax(*model)
        return converted if params is None else converted.replace(
            params=_own_params(converted, params, "the Flax module"))
    if callable(model):
        if params is None:
            raise TypeError("A plain function model f(params, x) needs its parameters: pass params=... "
                            "(e.g. entk.ntk(f, x, params=params)), or pass the model object itself "
                            "(a torch module, a Keras model, (flax_module, variables), an entk.Model).")
        check_params(params)
        # One wrapper per function, so compiled kernel functions (keyed by it) are reused across
        # calls; the returned Model always carries the params of this call.
        if model not in _FUNCTION_MODELS:
            _FUNCTION_MODELS[model] = Model.from_function(model, params)
        return _FUNCTION_MODELS[model].replace(params=params)
    raise TypeError(f"entk cannot use a {_type_name(model)} as a model; pass an entk.Model, a "
                    f"torch.nn.Module, a Keras model or tf.function, a (flax_module, variables) pair, "
                    f"or a function f(params, x) with params=...")


def _type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


def _foreign_leaf(tree: PyTree) -> tuple[str, str, Any] | None:
    """`(framework, path, leaf)` of the first leaf of `tree` that is another framework's tensor."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        framework = framework_of(leaf)
        if framework is not None:
            return framework, jax.tree_util.keystr(path), leaf
    return None


def check_params(params: PyTree, *, what: str = "params") -> None:
    """Refuses parameters holding torch / TF tensors for a JAX function, naming the right call.

    `entk` differentiates JAX functions of JAX parameters; torch or TF tensors among the parameters
    (e.g. `dict(module.named_parameters())`) mean the model itself belongs to that framework.
    """
    found = _foreign_leaf(params)
    if found is None:
        return
    framework, path, leaf = found
    raise TypeError(
        f"{what} holds {framework} tensors ({what}{path} is a {_type_name(leaf)}), but f is a plain "
        f"JAX function. Pass the {framework} model itself, {_CALLS[framework]} (or "
        f"entk.empirical_ntk_fn(model), entk.compare(model, x), ...), and entk reads its weights; "
        f"or convert them first: entk.adapters.to_model(model, x).params.")


def _own_params(model: Model, params: PyTree, what: str) -> PyTree:
    """`params` for a converted `model`: checked against the model's own parameters (structure and
    shapes), and converted to JAX if they are the framework's tensors under the same names."""
    if _foreign_leaf(params) is not None:  # copied: the framework may go on training them in place
        params = jax.tree_util.tree_map(
            lambda leaf: jnp.asarray(to_numpy(leaf)) if framework_of(leaf) else leaf, params)
    mine, theirs = jax.tree_util.tree_structure(model.params), jax.tree_util.tree_structure(params)
    if mine != theirs:
        names = list(model.params) if isinstance(model.params, dict) else mine
        given = list(params) if isinstance(params, dict) else theirs
        raise TypeError(f"params does not match the parameters of {what}: it expects {names}, got "
                        f"{given}. Omit params= to use the model's current weights, or pass "
                        f"entk.adapters.to_model(model, x).params (changed as you like).")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(model.params),
                            jax.tree_util.tree_leaves(params)):
        if tuple(np.shape(a)) != tuple(np.shape(b)):
            raise ValueError(f"params{jax.tree_util.keystr(path)} has shape {tuple(np.shape(b))}, but "
                             f"{what} has {tuple(np.shape(a))} there; omit params= to use the "
                             f"model's current weights.")
    return params


def current_tensors(model: Any, example_input: Any) -> tuple[PyTree, PyTree]:
    """The current `(params, state)` of a live framework model (or of an `entk.Model`).

    For a torch module the arrays alias its tensors' memory (no copy; wait for the computation that
    uses them before the module changes again); Keras / TF variables are read. Structured as
    `to_model(model, example_input).params` / `.state`.
    """
    converted = to_model(model, example_input, live=True)
    return converted.params, converted.state


def concrete_example(x: PyTree) -> PyTree:
    """`x` with every traced leaf (under `jax.jit`) replaced by NumPy zeros of its shape and dtype:
    an example input a framework model can be converted with (only shapes and dtypes matter)."""
    return jax.tree_util.tree_map(
        lambda leaf: np.zeros(leaf.shape, leaf.dtype) if isinstance(leaf, jax.core.Tracer) else leaf, x)


def is_traced(tree: PyTree) -> bool:
    """Whether any leaf of `tree` is a JAX tracer (we are inside `jax.jit`, `vmap`, ...)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


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
    adapter = adapter_for(model)
    if adapter is not None:
        return bool(getattr(adapter, "has_float64", lambda _: False)(model))
    if is_flax_pair(model):
        return any(_is_wide(leaf) for leaf in _leaves(model[1]))
    return False


def array_converters(example: Any) -> tuple[Callable[[Any], jax.Array], Callable[[jax.Array, Any], Any]]:
    """`(to_jax, to_native)` for the kind of array `example` is (first leaf of a pytree)."""
    leaves = jax.tree_util.tree_leaves(example)
    first = leaves[0] if leaves else example
    adapter = adapter_for(first)
    if adapter is not None:
        return adapter.to_jax, adapter.to_native
    if isinstance(first, np.ndarray):
        return jnp.asarray, lambda array, like: np.asarray(array)
    return jnp.asarray, lambda array, like: array


def call_converter(example: Any) -> Callable[[Any], Any]:
    """What turns arrays of `example`'s kind into arguments of a compiled JAX function: the
    adapter's `to_call_arg` where it has one (torch: NumPy views of CPU tensors), else `to_jax`."""
    leaves = jax.tree_util.tree_leaves(example)
    adapter = adapter_for(leaves[0] if leaves else example)
    return getattr(adapter, "to_call_arg", None) or array_converters(example)[0]


def to_numpy(x: Any) -> np.ndarray:
    """Any framework's array (torch, TF, JAX, NumPy, nested lists) as a NumPy array, at full precision
    (float64 stays float64 whatever JAX's 64-bit mode; bfloat16 torch tensors become float32)."""
    adapter = adapter_for(x)
    return np.asarray(x) if adapter is None else adapter.to_numpy(x)
