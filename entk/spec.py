"""Loading a model named on the command line: `package.module:callable` or `path/to/file.py:callable`.

The callable (called with `outputs=N` when the command line gives `--outputs`) returns any of:
an `entk.Model`; `(f, params)`; a stax triple `(init_fn, apply_fn, kernel_fn)` (initialised here with
`PRNGKey(0)`); `(flax_module, variables)`; a PyTorch module; a Keras model or `tf.function`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pathlib
import sys
from typing import Any

import jax
import numpy as np

from entk.model import Model


def load_object(spec: str, **kwargs: Any) -> Any:
    """Imports `module:callable` (or `file.py:callable`) and calls it with the kwargs it accepts."""
    if ":" not in spec:
        raise ValueError(f"SPEC {spec!r} must look like package.module:callable or file.py:callable.")
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        path = pathlib.Path(target).resolve()
        if not path.exists():
            raise FileNotFoundError(f"SPEC file {target!r} does not exist.")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and "." not in sys.path:
            sys.path.insert(0, "")  # so that SPECs in the working directory import like in Python
        module = importlib.import_module(target)
    try:
        factory = getattr(module, name)
    except AttributeError:
        raise ValueError(f"SPEC {spec!r}: module {target!r} has no attribute {name!r}.") from None
    if not callable(factory):
        return factory
    accepted = inspect.signature(factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    return factory(**{k: v for k, v in kwargs.items()
                      if v is not None and (takes_any or k in accepted)})


def to_native_input(model: Any, x: np.ndarray) -> Any:
    """`x` as the array type `model`'s framework expects (NumPy stays NumPy for JAX models)."""
    from entk.adapters import _framework_of

    framework = _framework_of(model)
    if framework == "torch":
        import torch

        return torch.from_numpy(x)
    if framework in ("tensorflow", "keras", "tf_keras"):
        import tensorflow as tf

        return tf.constant(x)
    return x


def load_model(spec: str, example_input: np.ndarray, *, outputs: int | None = None) -> Model:
    """The `entk.Model` a SPEC names, converted with `example_input` (a NumPy batch) where needed."""
    from entk import adapters

    obj = load_object(spec, outputs=outputs)
    if isinstance(obj, tuple) and len(obj) == 3 and all(callable(o) for o in obj):
        init_fn, apply_fn, _ = obj
        _, params = init_fn(jax.random.PRNGKey(0), example_input.shape)
        return Model.from_function(apply_fn, params, source="stax")
    is_pair = isinstance(obj, tuple) and len(obj) == 2
    if is_pair and callable(obj[0]) and "flax" not in adapters._packages_of(obj[0]):
        return Model.from_function(obj[0], obj[1])
    return adapters.to_model(obj, to_native_input(obj, example_input))
