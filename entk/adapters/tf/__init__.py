"""TensorFlow and Keras models in, kernels back out to TensorFlow.

`from_tf(model_or_fn, example_input, mode="auto")` gives an `entk.Model` (pure JAX `apply`, `params`,
`state`) for

- a Keras 3 model on the **JAX backend**: used as is through `stateless_call` (`mode="keras_jax"`);
- a Keras 3 model on the **TensorFlow backend**, a `tf.function` or a Python function of TF ops:
  translated to JAX with tf2jax (`mode="tf2jax"`, see `entk.adapters.tf.translate`); every strategy
  (JC, NTVP, SD) then applies;
- any of the TF ones through `call_tf` with TF-side forward mode, transpose and vectorization
  (`mode="bridge"`, `entk.adapters.tf.bridge`): JC and NTVP only, but it runs whatever TF runs.

`mode="auto"` translates and falls back to the bridge, with one warning naming the layer and op that
did not translate. `to_tf(kernel_fn, params)` takes a kernel back to TensorFlow as a `tf.function`.

The hooks `is_model`, `is_tensor`, `to_jax`, `to_native` let `entk.ntk(keras_model, x1, x2)` take TF
tensors or NumPy arrays and answer with the same kind.

TensorFlow is imported only when one of these functions needs it, and is then configured to share the
process with JAX: TF allocates GPU memory on demand (memory growth) instead of grabbing it all, and
JAX is asked not to preallocate (`XLA_PYTHON_CLIENT_PREALLOCATE=false`, effective only if JAX has not
started its GPU backend yet).
"""

from __future__ import annotations

import dataclasses
import sys
import types
import warnings
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from entk.adapters.tf._tensorflow import import_tensorflow  # TensorFlow, configured for JAX
from entk.adapters.tf.export import to_tf
from entk.adapters.tf.translate import keras_backend_of
from entk.model import ALL_STRATEGIES, Model

__all__ = ["from_tf", "to_tf", "is_model", "is_tensor", "to_jax", "to_native", "to_numpy",
           "import_tensorflow", "has_float64"]

PyTree = Any

MODES = ("auto", "tf2jax", "bridge", "keras_jax")
_MODE_ALIASES = {"translate": "tf2jax", "call_tf": "bridge", "jax": "keras_jax"}


# ----------------------------------------------------------------------------------------------
# Hooks for entk.ntk's dispatch (entk.adapters)


def is_model(obj: Any) -> bool:
    """True for a Keras layer/model, a `tf.function` or a `tf.Module` (without importing TF)."""
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(obj, keras.layers.Layer):
        return True
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return False
    return isinstance(obj, tf.Module) or _is_tf_function(obj)


def is_tensor(x: Any) -> bool:
    """True for a `tf.Tensor` or `tf.Variable` (without importing TF)."""
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(x, (tf.Tensor, tf.Variable))


def to_jax(x: Any) -> jax.Array:
    """A TF tensor (or NumPy / JAX array) as a `jax.Array` with the same dtype and values."""
    if is_tensor(x):
        x = x.numpy()
    return jnp.asarray(x)


def to_native(array: Any, like: Any) -> Any:
    """`array` as the kind of array `like` is: a TF tensor for a TF tensor, NumPy for NumPy."""
    if is_tensor(like):
        return import_tensorflow().convert_to_tensor(np.asarray(array))
    if isinstance(like, np.ndarray):
        return np.asarray(array)
    return array


def to_numpy(x: Any) -> np.ndarray:
    """A TF tensor or a TF / Keras variable as a NumPy array at its own precision."""
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def has_float64(model_or_fn: Any) -> bool:
    """Whether a Keras model / `tf.Module` holds float64 or complex128 variables (then `entk.ntk`
    computes in 64 bits). A `tf.function`'s variables are unknown until traced: its inputs decide."""
    variables = getattr(model_or_fn, "variables", None)
    if not isinstance(variables, (list, tuple)):
        return False
    return any(np.dtype(getattr(v.dtype, "as_numpy_dtype", v.dtype)) in (np.float64, np.complex128)
               for v in variables)


# ----------------------------------------------------------------------------------------------
# from_tf


def from_tf(model_or_fn: Any, example_input: PyTree, mode: str = "auto", *,
            check: bool = True) -> Model:
    """A Keras model, `tf.function` or TF-ops function as an `entk.Model`.

    Args:
      model_or_fn: a built Keras 3 model or layer (TensorFlow or JAX backend), a `tf.function`, or a
        Python function `fn(x)` of TF ops (its `tf.Variable`s are the parameters).
      example_input: an input the model accepts (array, TF tensor, or a list/dict of them for
        multi-input models), e.g. one batch. Translations are per input shape; others are
        translated on first use.
      mode: `"auto"` (translate; fall back to the bridge with a warning), `"tf2jax"` (translate or
        raise), `"bridge"` (`call_tf`; JC and NTVP only), `"keras_jax"` (a JAX-backend Keras model).
      check: compare the translated model's output on `example_input` with TensorFlow's.

    Returns:
      An `entk.Model`: `params` are the trainable variables (a dict keyed by Keras path such as
      `"dense/kernel"`, or by `tf.Variable` name), `state` the non-trainable ones (BatchNorm
      statistics); the model runs in inference mode (`training=False`). Converting the same model
      again reuses its translations and, if its variables did not change, returns the same object;
      changed variables are read into it. If a plain attribute of a Keras layer changed (a number,
      string or flag its `call` may read, which tracing baked in), the model is converted again.

    Raises:
      ValueError: the Keras model is not built yet, a trainable variable is not floating-point, or
        `mode` is unknown.
      TranslationError: (`mode="tf2jax"`) a layer / op tf2jax cannot translate, named.
    """
    mode = _MODE_ALIASES.get(str(mode).lower(), str(mode).lower())
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}.")
    _check_built(model_or_fn)
    backend = keras_backend_of(model_or_fn)
    if backend not in (None, "tensorflow", "jax"):
        raise ValueError(f"This Keras model runs on the {backend!r} backend; entk.from_tf handles the "
                         f"TensorFlow and JAX backends (use KERAS_BACKEND=jax or tensorflow"
                         + (", or entk.from_torch(model, x) for a torch-backend model" if backend == "torch"
                            else "") + ").")
    if backend == "jax":
        if mode in ("tf2jax", "bridge"):
            raise ValueError(f"This Keras model runs on the JAX backend: it is JAX already, so "
                             f"mode={mode!r} (for TensorFlow graphs) does not apply; use mode='auto'.")
        mode = "keras_jax"
    elif mode == "keras_jax":
        raise ValueError("mode='keras_jax' needs a Keras model on the JAX backend (KERAS_BACKEND=jax "
                         "set before keras is imported); this one runs TensorFlow.")

    cache = _cache_for(model_or_fn)
    if cache is None:
        return _convert(model_or_fn, example_input, mode, check).current()
    # One conversion serves every input shape (translations are made per shape on first use, the
    # bridge takes any shape); the input's structure is part of the key, and so is JAX's 64-bit
    # mode (arrays and translations made in one precision are not reused in the other).
    precision = bool(jax.config.x64_enabled)
    key = (mode, precision, jax.tree_util.tree_structure(example_input, is_leaf=is_tensor))
    if cache.get("guard", None) != _keras_guard(model_or_fn):
        cache.clear()  # a plain attribute the traced Python read has changed: convert again
    entry = cache.get(key)
    if entry is None:
        first = cache.get((mode, precision))  # the first conversion of this model in this mode
        if first is not None and first.read is not None:
            entry = first  # a translation handles any input structure too
        elif first is not None:
            entry = _bridge_entry(model_or_fn, example_input)  # auto: translation failed, no retry
        else:
            entry = _convert(model_or_fn, example_input, mode, check)
        cache[key] = entry
        cache.setdefault((mode, precision), entry)
        cache["guard"] = _keras_guard(model_or_fn)  # taken after converting (which calls it)
    return entry.current()


_GUARDED_ATOMS = frozenset({type(None), bool, int, float, complex, str})


def _keras_guard(model_or_fn: Any) -> tuple | None:
    """The plain attributes (numbers, strings, flags, tuples of them) of every layer of a Keras model.

    tf2jax translates, and the bridge's `tf.function` traces, the model's Python once, so a layer's
    `self.scale = 3.0` read in `call` is baked into the conversion like a constant; variables are
    read at every call instead (`_Entry.current`). A change here converts the model again. Keras's
    own trackable bookkeeping (`_self_*`) is left out. None for a `tf.function` / plain function,
    whose Python state (closures, globals) entk cannot see.
    """
    if keras_backend_of(model_or_fn) != "tensorflow":
        return None
    out: list = []
    for layer in model_or_fn._flatten_layers(include_self=True, recursive=True):
        out.append((type(layer), id(layer)))
        for key, value in vars(layer).items():
            if key.startswith("_self_"):
                continue
            kind = type(value)
            if kind in _GUARDED_ATOMS:
                out.append((key, value))
            elif kind in (tuple, list) and all(type(v) in _GUARDED_ATOMS for v in value):
                out.append((key, kind, tuple(value)))
    return tuple(out)


@dataclasses.dataclass
class _Entry:
    """A converted model and how to read its variables' current values."""

    model: Model
    read: Any  # () -> (params, state) for translations; None for the bridge
    snapshot: Any = None  # bridge: () -> current variable values
    rebuild: Any = None  # bridge: () -> a new bridged Model
    last: Any = None  # bridge: the snapshot `model` was built from

    def current(self) -> Model:
        """The model with its variables' current values (the same object if none changed)."""
        if self.read is not None:
            params, state = self.read()
            if not (_tree_equal(params, self.model.params) and _tree_equal(state, self.model.state)):
                self.model = self.model.replace(params=_as_jax(params), state=_as_jax(state))
            return self.model
        snapshot = self.snapshot()
        if not _tree_equal(snapshot, self.last):
            self.model, self.last = self.rebuild(), snapshot
        return self.model


def _convert(model_or_fn: Any, example_input: PyTree, mode: str, check: bool) -> _Entry:
    if mode == "keras_jax":
        from entk.adapters.tf.keras_jax import from_keras_jax

        _check_dtypes(model_or_fn.trainable_variables, [v.path for v in model_or_fn.trainable_variables])
        model = from_keras_jax(model_or_fn, example_input)
        return _Entry(model, model.apply_with_state.values)
    if mode == "bridge":
        return _bridge_entry(model_or_fn, example_input)
    from entk.adapters.tf.translate import TranslationError

    try:
        return _translate(model_or_fn, example_input, check)
    except TranslationError as e:
        if mode == "tf2jax":
            raise
        warnings.warn(f"entk.from_tf: tf2jax could not translate {e.culprit}; using the call_tf "
                      f"bridge instead (JC and NTVP only, runs in TensorFlow). Details: {e}",
                      stacklevel=3)
        return _bridge_entry(model_or_fn, example_input)


def _translate(model_or_fn: Any, example_input: PyTree, check: bool) -> _Entry:
    from entk.adapters.tf import translate

    tf = import_tensorflow()
    x = _to_numpy_tree(example_input)
    jx = jax.tree_util.tree_map(jnp.asarray, x)
    if keras_backend_of(model_or_fn) == "tensorflow":
        translation = translate.KerasTranslation(model_or_fn, tf)
        source = "keras"
    else:
        translation = translate.FunctionTranslation(model_or_fn, tf, translate.Signature.of(jx, {}))
        source = "tf"
    params, state = translation.values()
    _check_dtypes(list(params.values()), list(params))
    _check_x64({**params, **state})
    model = Model(translation, _as_jax(params), _as_jax(state), source=source,
                  capabilities=ALL_STRATEGIES,
                  info={"mode": "tf2jax", "param_names": translation.param_keys,
                        "state_names": translation.state_keys,
                        "param_count": int(sum(np.size(p) for p in params.values()))})
    outputs = model(jx)  # translates the example's signature; locates ops that fail in JAX
    translation.check_reverse_mode()
    if check:
        _check_outputs(model_or_fn, x, outputs, tf)
    return _Entry(model, translation.values)


def _bridge_entry(model_or_fn: Any, example_input: PyTree) -> _Entry:
    try:
        from entk.adapters.tf.bridge import bridge_model
    except ImportError as e:
        raise NotImplementedError(
            "entk.from_tf(..., mode='bridge') needs entk.adapters.tf.bridge, which is not available in "
            f"this build ({e}); translate the model with mode='tf2jax' instead.") from e
    tf = import_tensorflow()
    variables = _tf_variables(model_or_fn, example_input, tf)
    snapshot = lambda: [np.asarray(v.numpy()) for v in variables]  # noqa: E731
    return _Entry(bridge_model(model_or_fn, example_input), None, snapshot=snapshot,
                  rebuild=lambda: bridge_model(model_or_fn, example_input), last=snapshot())


# ----------------------------------------------------------------------------------------------
# Checks and helpers


def _check_built(model: Any) -> None:
    keras = sys.modules.get("keras")
    if keras is None or not isinstance(model, keras.layers.Layer):
        return
    if not getattr(model, "built", True):
        raise ValueError(
            f"The Keras model {model.name!r} has not been built, so it has no weights yet. Call it "
            f"once on an example (model(x)), build it (model.build(input_shape)), or give it an input "
            f"shape (keras.Input(shape=...) / input_shape=...) before entk.from_tf.")


def _check_dtypes(values: list, names: list) -> None:
    """Refuses non-floating-point trainable variables (only those can be differentiated)."""
    for name, value in zip(names, values):
        dtype = np.dtype(getattr(value.dtype, "as_numpy_dtype", value.dtype))
        if not np.issubdtype(dtype, np.inexact):
            raise ValueError(
                f"Trainable variable {name!r} has dtype {dtype}; only floating-point variables can be "
                f"differentiated. Mark it non-trainable (trainable=False) so it goes to the state.")


def _check_x64(values: dict) -> None:
    """Refuses 64-bit variables when JAX runs in 32-bit mode (they would silently lose precision)."""
    if jax.config.jax_enable_x64:
        return
    wide = [k for k, v in values.items() if np.dtype(v.dtype) in (np.float64, np.complex128)]
    if wide:
        raise ValueError(f"The model has float64 variables ({wide[:3]}) but JAX runs in 32-bit mode: "
                         f"call jax.config.update('jax_enable_x64', True) first, or build the model in "
                         f"float32 (keras.config.set_floatx('float32')).")


def _check_outputs(model_or_fn: Any, x: PyTree, outputs: PyTree, tf: types.ModuleType) -> None:
    """Raises TranslationError if the translated outputs differ from TensorFlow's on `x`."""
    from entk.adapters.tf.translate import TranslationError

    tx = jax.tree_util.tree_map(tf.convert_to_tensor, x)
    if keras_backend_of(model_or_fn) is not None:
        reference = model_or_fn(tx, training=False)
    else:
        reference = model_or_fn(tx)
    ref_leaves = [np.asarray(r) for r in tf.nest.flatten(reference)]
    out_leaves = [np.asarray(o) for o in jax.tree_util.tree_leaves(outputs)]
    if len(ref_leaves) != len(out_leaves):
        raise TranslationError(f"The translation returns {len(out_leaves)} outputs, TensorFlow "
                               f"{len(ref_leaves)}.")
    for i, (r, o) in enumerate(zip(ref_leaves, out_leaves)):
        tol = 1e-8 if r.dtype == np.float64 else 1e-3
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        if r.shape != o.shape or (r.size and float(np.max(np.abs(r - o))) > tol * (scale + tol)):
            detail = (f"shape {o.shape} vs {r.shape}" if r.shape != o.shape
                      else f"max difference {float(np.max(np.abs(r - o))):.3g} at scale {scale:.3g}")
            raise TranslationError(f"tf2jax's translation disagrees with TensorFlow on the example "
                                   f"input (output {i}: {detail}).")


def _is_tf_function(obj: Any) -> bool:
    return hasattr(obj, "get_concrete_function") and hasattr(obj, "python_function")


def _tf_variables(model_or_fn: Any, example_input: PyTree, tf: types.ModuleType) -> list:
    """The TF variables a model reads (to notice when they change)."""
    if keras_backend_of(model_or_fn) is not None:
        return list(model_or_fn.variables)
    if isinstance(model_or_fn, tf.Module):
        return list(model_or_fn.variables)
    if _is_tf_function(model_or_fn):
        x = jax.tree_util.tree_map(tf.convert_to_tensor, _to_numpy_tree(example_input))
        return list(model_or_fn.get_concrete_function(x).variables)
    return []


def _to_numpy_tree(x: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf.numpy() if is_tensor(leaf) else leaf),
                                  x, is_leaf=is_tensor)


def _as_jax(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.asarray, tree)


def _tree_equal(a: PyTree, b: PyTree) -> bool:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(np.shape(x) == np.shape(y) and np.array_equal(np.asarray(x), np.asarray(y))
                            for x, y in zip(la, lb))


_CACHES: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _cache_for(model_or_fn: Any) -> dict | None:
    """Per-model cache of conversions (`None` for objects that cannot be weakly referenced)."""
    try:
        return _CACHES.setdefault(model_or_fn, {})
    except TypeError:
        return None
