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


def load_model(spec: str, example_input: np.ndarray, *, outputs: int | None = None) -> Model:
    """The `entk.Model` a SPEC names, converted with `example_input` (a NumPy batch) where needed.

    The model kinds `entk.adapters.to_model` takes go through it (the adapters take NumPy example
    inputs); a stax triple and an `(f, params)` pair are the two forms only a SPEC has.
    """
    from entk import adapters

    obj = load_object(spec, outputs=outputs)
    if isinstance(obj, tuple) and len(obj) == 3 and all(callable(o) for o in obj):
        init_fn, apply_fn, _ = obj
        _, params = init_fn(jax.random.PRNGKey(0), example_input.shape)
        return Model.from_function(apply_fn, params, source="stax")
    if isinstance(obj, tuple) and len(obj) == 2 and callable(obj[0]) and not adapters.is_flax_pair(obj):
        return adapters.to_model(obj[0], params=obj[1])
    return adapters.to_model(obj, example_input)
