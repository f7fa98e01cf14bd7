"""PyTorch models in entk: `from_torch(module, example_input)` → `entk.Model`.

Two ways to see a `torch.nn.Module` from JAX:

- **export** (default): `torch.export` captures the module as a graph of core ATen ops and each op is
  translated to `jax.numpy` / `jax.lax` (`export.py`, `aten*.py`). The result is plain JAX: `jit`,
  `vmap`, `jvp`, `vjp` and all three kernel strategies (structured derivatives included) work.
- **bridge**: the module stays in PyTorch and JAX calls it back through `torch.func` (`bridge.py`):
  Jacobian contraction and NTK-vector products work, structured derivatives do not.

`mode="auto"` exports, and falls back to the bridge with one warning naming the reason (ops without
a translation, or a model `torch.export` cannot capture).

This module also provides the hooks `entk.ntk` uses for torch tensors in / torch tensors out:
`is_model`, `is_tensor`, `to_jax`, `to_native`. Conversions are cached per module, so calling
`entk.ntk(module, x1, x2)` repeatedly exports the module once.
"""

from __future__ import annotations

import collections
import sys
import warnings
from typing import Any

import jax
import numpy as np

from entk.model import ALL_STRATEGIES, Model

PyTree = Any

__all__ = ["from_torch", "is_model", "is_tensor", "to_jax", "to_native", "ExportFallbackWarning",
           "clear_cache", "linearize"]

_MODES = ("auto", "export", "bridge")


class ExportFallbackWarning(UserWarning):
    """`mode="auto"` could not export a model and used bridge mode instead."""


# ---------------------------------------------------------------- dispatcher hooks


def _torch() -> Any:
    return sys.modules.get("torch")


def is_model(obj: Any) -> bool:
    """Whether `obj` is a `torch.nn.Module` (never imports torch)."""
    torch = _torch()
    return torch is not None and isinstance(obj, torch.nn.Module)


def is_tensor(x: Any) -> bool:
    """Whether `x` is a `torch.Tensor` (never imports torch)."""
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def to_jax(x: Any) -> Any:
    """Torch tensors (or a pytree of them) → JAX arrays, zero-copy through DLPack where possible.

    Float64 stays float64 when `jax_enable_x64` is on. Non-tensor leaves are returned unchanged.
    """
    from entk.adapters.torch.export import tensor_to_jax

    return jax.tree_util.tree_map(lambda t: tensor_to_jax(t, copy=False) if is_tensor(t) else t, x)


def to_native(array: Any, like: Any = None) -> Any:
    """A JAX array → a torch tensor on `like`'s device (a tensor, a module, or None for CPU).

    A floating-point result takes `like`'s floating dtype when `like` is floating (float64 inputs
    give a float64 kernel even if JAX computed in float32); otherwise the array's dtype is kept.
    """
    import torch

    if is_model(like):
        like = next(iter(like.parameters()), None)
    if isinstance(array, (tuple, list, dict)):
        return jax.tree_util.tree_map(lambda a: to_native(a, like), array)
    try:
        out = torch.from_dlpack(array)
    except Exception:  # noqa: BLE001 - dtypes / devices DLPack cannot share: copy via NumPy
        out = torch.from_numpy(np.array(array))
    if isinstance(like, torch.Tensor):
        if out.is_floating_point() and like.is_floating_point() and out.dtype != like.dtype:
            out = out.to(like.dtype)
        if out.device != like.device:
            out = out.to(like.device)
    return out


# ---------------------------------------------------------------- conversion


def _input_signature(example_input: Any) -> tuple:
    """Structure, dtypes, devices and ranks of the example (shapes are handled by the export)."""
    import torch

    leaves, spec = torch.utils._pytree.tree_flatten(example_input)
    return (str(spec),) + tuple((str(t.dtype), str(t.device), t.ndim)
                                if isinstance(t, torch.Tensor) else (repr(t),) for t in leaves)


def _fingerprint(module: Any) -> tuple:
    """Changes when a parameter or buffer is replaced, updated in place, or (un)frozen."""
    tensors = list(module.named_parameters(remove_duplicate=False))
    tensors += list(module.named_buffers(remove_duplicate=False))
    return tuple((name, id(t), t._version, t.requires_grad) for name, t in tensors)


def _as_torch_example(example_input: Any) -> Any:
    """NumPy / JAX arrays in `example_input` become torch tensors (torch.export needs tensors)."""
    import torch

    def convert(x: Any) -> Any:
        if isinstance(x, torch.Tensor) or x is None:
            return x
        if isinstance(x, (np.ndarray, jax.Array)) or hasattr(x, "__array__"):
            return torch.from_numpy(np.array(x))
        return x

    if isinstance(example_input, dict):
        return {k: convert(v) for k, v in example_input.items()}
    if isinstance(example_input, (tuple, list)):
        return tuple(convert(v) for v in example_input)
    return convert(example_input)


class _Converted:
    """What the cache keeps for one (module, options, input signature)."""

    def __init__(self, exported: Any, model: Model, fingerprint: tuple):
        self.exported, self.model, self.fingerprint = exported, model, fingerprint


# id(module) -> (module, {options: _Converted}), least recently used first. A converted model must
# keep its module alive (new input shapes export it again), so the cache holds modules strongly and
# is bounded instead; `clear_cache()` releases everything.
_CACHE: "collections.OrderedDict[int, tuple[Any, dict]]" = collections.OrderedDict()
CACHE_SIZE = 8


def clear_cache() -> None:
    """Forgets every cached conversion (and releases the modules it kept alive)."""
    _CACHE.clear()


def _module_cache(module: Any) -> dict:
    entry = _CACHE.get(id(module))
    if entry is None or entry[0] is not module:
        entry = (module, {})
        _CACHE[id(module)] = entry
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(id(module))
    return entry[1]


def from_torch(module: Any, example_input: Any, mode: str = "auto", *,
               include_frozen: bool = False, training: bool = False,
               batch_axis: int | None = 0) -> Model:
    """Converts a `torch.nn.Module` to an `entk.Model`.

    Args:
      module: the PyTorch module. It is exported in eval mode (dropout off, BatchNorm on running
        statistics) unless `training=True`; its own train/eval flags are left as they were.
      example_input: a tensor, a tuple of tensors (positional inputs) or a dict of tensors (keyword
        inputs), in the module's own layout (NCHW images, integer token ids, ...). `model.apply`
        takes inputs of this structure (JAX / NumPy arrays or torch tensors). Shapes may differ
        later: the batch axis is exported as dynamic, and other shapes are exported again on use.
      mode: `"export"` (translate to plain JAX: all strategies), `"bridge"` (call back into
        PyTorch via torch.func: `"jc"` and `"ntvp"` only), or `"auto"` (export, falling back to the
        bridge with an `ExportFallbackWarning` naming the reason).
      include_frozen: also differentiate parameters with `requires_grad=False` (by default they are
        constants in `state["frozen"]`).
      training: export in training mode (BatchNorm on batch statistics: examples interact, so
        `vmap_axes` is refused by the kernel functions). Dropout in training mode is not supported.
      batch_axis: the input axis marked dynamic in the export (None: export static shapes only).

    Returns:
      An `entk.Model` with `source="torch"`, `params` a dict `{named_parameters() name: array}`
      (torch's dtypes), `state = {"buffers": ..., "frozen": ..., "constants": ...}`, and `info`
      saying which mode and train/eval setting were used. Converting the same module again with
      inputs of the same structure/dtypes returns the cached model (refreshed if the module's
      tensors changed), without exporting again; the last `CACHE_SIZE` modules are cached
      (`clear_cache()` empties the cache).

    Raises:
      UnsupportedOpsError / ExportError (in `mode="export"`): the ATen ops without a translation
        (with the module path and source line of each), or why torch.export failed (e.g.
        data-dependent control flow); both point to `mode="bridge"`.
    """
    import torch

    if mode not in _MODES:
        raise ValueError(f"mode={mode!r}; use one of {', '.join(repr(m) for m in _MODES)}.")
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch(module=...) needs a torch.nn.Module, got "
                        f"{type(module).__module__}.{type(module).__name__}; wrap a plain function "
                        f"in a Module whose forward calls it.")
    example_input = _as_torch_example(example_input)
    options = (include_frozen, training, batch_axis, _input_signature(example_input))
    per_module = _module_cache(module)
    fingerprint = _fingerprint(module)
    cached = _lookup(per_module, mode, options)
    if cached is not None:
        key, entry = cached
        if entry.fingerprint == fingerprint:
            return entry.model
        model = entry.model.replace(**_tensors_of(module, entry.model, include_frozen))
        per_module[key] = _Converted(entry.exported, model, fingerprint)
        return model

    exported, model = _convert(module, example_input, mode, include_frozen, training, batch_axis)
    per_module[(mode,) + options] = _Converted(exported, model, fingerprint)
    return model


def _lookup(per_module: dict, mode: str, options: tuple) -> tuple[tuple, _Converted] | None:
    """A cached conversion serving `mode`: "auto" and "export" share a successful export."""
    candidates = {"auto": ("export", "auto"), "export": ("export", "auto"), "bridge": ("bridge",)}
    for stored_mode in candidates[mode]:
        key = (stored_mode,) + options
        entry = per_module.get(key)
        if entry is None:
            continue
        if mode == "export" and entry.model.info.get("mode") != "export":
            continue  # an auto conversion that fell back to the bridge
        return key, entry
    return None


def _trainable(module: Any, include_frozen: bool) -> set[str]:
    return {name for name, p in module.named_parameters()
            if p.is_floating_point() and (p.requires_grad or include_frozen)}


def _tensors_of(module: Any, model: Model, include_frozen: bool) -> dict:
    """Fresh `params` and `state` read from the module (same names as the model's)."""
    from entk.adapters.torch.export import tensor_to_jax

    if model.info.get("mode") != "export":
        from entk.adapters.torch.bridge import bridge_model

        fresh = bridge_model(module, model.info["example_input"], include_frozen=include_frozen)
        return {"params": fresh.params, "state": fresh.state}
    trainable = _trainable(module, include_frozen)
    params, frozen = {}, {}
    for name, p in module.named_parameters():
        (params if name in trainable else frozen)[name] = tensor_to_jax(p, copy=True)
    buffers = {name: tensor_to_jax(b, copy=True)
               for name, b in module.named_buffers(remove_duplicate=False)}
    constants = model.state.get("constants", {}) if isinstance(model.state, dict) else {}
    return {"params": params,
            "state": {"buffers": buffers, "frozen": frozen, "constants": constants}}


def _convert(module: Any, example_input: Any, mode: str, include_frozen: bool, training: bool,
             batch_axis: int | None) -> tuple[Any, Model]:
    from entk.adapters.torch import export

    if mode in ("auto", "export"):
        try:
            return _export_model(module, example_input, include_frozen, training, batch_axis)
        except (export.UnsupportedOpsError, export.ExportError, export.TranslationError) as e:
            if mode == "export" or isinstance(e, export.InputDtypeError):
                raise
            reason = str(e).split("\nTo use this model")[0]
            warnings.warn(f"entk.from_torch: export mode failed, using bridge mode (torch.func "
                          f"callbacks; strategies 'jc' and 'ntvp' only). Reason: {reason}",
                          ExportFallbackWarning, stacklevel=3)
    return None, _bridge_model(module, example_input, include_frozen, training)


def _bridge_model(module: Any, example_input: Any, include_frozen: bool, training: bool) -> Model:
    try:
        from entk.adapters.torch.bridge import bridge_model
    except ImportError as e:
        raise NotImplementedError(
            f"mode='bridge' needs entk.adapters.torch.bridge.bridge_model, which is not available "
            f"in this build ({e}); use mode='export'.") from e
    if training:
        raise ValueError("training=True is only supported in export mode; bridge mode runs the "
                         "module in eval mode.")
    if isinstance(example_input, dict):
        raise TypeError("bridge mode takes a tensor or a tuple of tensors (positional inputs) as "
                        "example_input, not a dict; use mode='export' for keyword inputs.")
    model = bridge_model(module, example_input, include_frozen=include_frozen)
    return model.replace(info={**model.info, "example_input": example_input, "training": False})


def _export_model(module: Any, example_input: Any, include_frozen: bool, training: bool,
                  batch_axis: int | None) -> tuple[Any, Model]:
    from entk.adapters.torch import export

    trainable = _trainable(module, include_frozen)
    exported = export.ExportedModule(module, example_input, training=training,
                                     batch_axis=batch_axis, trainable=trainable)
    stub = Model(exported.apply_with_state, {}, {"constants": exported.constants()},
                 info={"mode": "export"})
    tensors = _tensors_of(module, stub, include_frozen)
    has_batch_norm = any(isinstance(m, torch_batch_norm_types()) for m in module.modules())
    info = {
        "mode": "export",
        "framework": "torch",
        "module": type(module).__name__,
        "training": training,
        "train_mode_batch_norm": bool(training and has_batch_norm),
        "param_names": tuple(tensors["params"]),
        "frozen_param_names": tuple(tensors["state"]["frozen"]),
        "buffer_names": tuple(tensors["state"]["buffers"]),
        "input_layout": "as the PyTorch module (NCHW for images)",
        "dynamic_batch": exported.dynamic,
        "exported_program": exported.program,
        "ops": sorted({str(n.target) for n in exported.program.graph.nodes
                       if n.op == "call_function"}),
    }
    model = Model(exported.apply_with_state, tensors["params"], tensors["state"], source="torch",
                  capabilities=ALL_STRATEGIES, info=info)
    _trial_run(model, example_input)
    return exported, model


def torch_batch_norm_types() -> tuple:
    import torch

    return (torch.nn.modules.batchnorm._BatchNorm,)


def _trial_run(model: Model, example_input: Any) -> None:
    """Traces the translation once (no compilation, no FLOPs) so failures surface at conversion."""
    jax.eval_shape(lambda p, s, x: model.apply_with_state(p, s, x), model.params, model.state,
                   to_jax(example_input))


from entk.adapters.torch.linearized_module import LinearizedModule, linearize  # noqa: E402
