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
`is_model`, `is_tensor`, `to_jax`, `to_native`, `live_model`, `has_float64`. A converted module is
never stale: conversions are cached per module, but the parameter, buffer and constant values are
read at every call (`entk.ntk` aliases them, without copying), and everything a translation
baked in (dtypes, shapes, submodules, plain attributes `forward` reads, ...) is guarded
(`guards.py`): when it changes, the module is converted again. So `entk.ntk(module, x1, x2)` called
repeatedly exports the module once, and again only after such a change.
"""

from __future__ import annotations

import collections
import sys
import warnings
from typing import Any

import jax
import numpy as np

from entk.adapters._llvm_guard import prepare_torch
from entk.model import ALL_STRATEGIES, Model

prepare_torch()  # Triton loaded now or never, before torch.export / torch.func can load it after TF

PyTree = Any

__all__ = ["from_torch", "is_model", "is_tensor", "to_jax", "to_native", "to_numpy",
           "ExportFallbackWarning", "clear_cache", "linearize", "live_model", "has_float64"]

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


def to_call_arg(x: Any) -> Any:
    """Torch tensors (or a pytree of them) as a compiled JAX function takes them fastest: a CPU
    tensor NumPy can hold as a NumPy view of its memory (no copy; the call reads it before it
    returns), anything else as `to_jax` makes it. A fresh `jax.Array` made per call costs a kernel
    call ~0.1 ms more than a NumPy argument (the one-liner on a 1.3 ms MLP kernel: 1.2-1.33x -> 1.13x
    the time of the jitted kernel function, `benchmarks/bench_first_kernel.py`)."""
    def one(t: Any) -> Any:
        if is_tensor(t) and t.device.type == "cpu":
            try:
                return t.detach().resolve_conj().resolve_neg().numpy()
            except (TypeError, RuntimeError):  # bfloat16 and other dtypes NumPy cannot hold
                pass
        return to_jax(t) if is_tensor(t) else t

    return jax.tree_util.tree_map(one, x)


def to_native(array: Any, like: Any = None) -> Any:
    """A JAX array → a torch tensor on `like`'s device (a tensor, a module, or None for CPU).

    A floating-point result takes `like`'s floating dtype when `like` is floating; otherwise the
    array's dtype is kept. (`entk.ntk` computes float64 inputs in float64, see
    `entk.adapters.precision_scope`, so there this cast never dresses float32 work up as float64.)
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


def to_numpy(x: Any) -> np.ndarray:
    """A torch tensor as a NumPy array on the host at its own precision (bfloat16, which NumPy
    lacks, as float32); gradients, conjugation and negation bits are resolved first."""
    x = x.detach().resolve_conj().resolve_neg()
    if str(x.dtype) == "torch.bfloat16":
        x = x.float()
    return x.cpu().numpy()


# ---------------------------------------------------------------- conversion


def _input_signature(example_input: Any) -> tuple:
    """Structure, dtypes, devices and ranks of the example (shapes are handled by the export)."""
    import torch

    leaves, spec = torch.utils._pytree.tree_flatten(example_input)
    return (str(spec),) + tuple((str(t.dtype), str(t.device), t.ndim)
                                if isinstance(t, torch.Tensor) else (repr(t),) for t in leaves)


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
    """One cached conversion of a module: what was exported (None in bridge mode), the model built
    then, the guard taken after converting (`guards.snapshot` and the objects it keeps alive), and
    the tensors read at every call.

    `tensors` lists `(group, name, tensor)`: group `"params"` or a `state` key (`"frozen"`,
    `"buffers"`, `"constants"`). The tensor objects stay valid while the guard holds (it records
    their identities; `.data` assignments keep the object and are read through it).
    """

    def __init__(self, exported: Any, model: Model, guard: tuple[tuple, list], tensors: list):
        # Only the model's function and info are kept: its values are read from `tensors` at every
        # `current()`, and holding the conversion's copies would double a large model's memory.
        self.model = model.replace(params={}, state={})
        self.exported, self.guard, self.tensors = exported, guard, tensors
        self.groups = ("buffers", "frozen") + (() if exported is None else ("constants",))

    def current(self, copy: bool) -> Model:
        """The model with the module's current parameter, buffer and constant values.

        `copy=False` aliases the tensors' memory (for one kernel computation that is waited for,
        `entk.ntk`): CPU tensors as NumPy views, which a jitted function takes as arguments at a
        fraction of the cost of one DLPack import per tensor (ResNet-18's 122 tensors: ~0.3 ms
        against ~7-11 ms, `benchmarks/bench_torch_guards.py`), others through DLPack. `copy=True`
        gives JAX arrays of their own (a model handed to the user, who may go on training the
        module in place).
        """
        from entk.adapters.torch.graph_translation import tensor_to_jax

        read = (lambda t: tensor_to_jax(t, copy=True)) if copy else _alias
        params: dict = {}
        state: dict = {group: {} for group in self.groups}
        for group, name, tensor in self.tensors:
            (params if group == "params" else state[group])[name] = read(tensor)
        return self.model.replace(params=params, state=state)


def _alias(t: Any) -> Any:
    """A torch tensor's memory without a copy: a NumPy view on CPU (dtypes NumPy has), else DLPack."""
    from entk.adapters.torch.graph_translation import tensor_to_jax

    if t.device.type == "cpu":
        try:
            return t.detach().resolve_conj().resolve_neg().numpy()
        except (TypeError, RuntimeError):  # bfloat16 and other dtypes NumPy lacks
            pass
    return tensor_to_jax(t, copy=False)


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
      (torch's dtypes; copies of the module's values now), `state = {"buffers": ..., "frozen": ...,
      "constants": ...}`, and `info` saying which mode and train/eval setting were used.

      Conversions are cached (the last `CACHE_SIZE` modules; `clear_cache()` empties the cache):
      converting the same module again with inputs of the same structure/dtypes reads its current
      values into the cached translation without exporting again, unless something the translation
      baked in changed (dtypes, shapes, devices, `requires_grad`, submodules, hooks, plain attributes
      forward reads, tensors held outside the registered ones: see `guards.py`); then it converts
      the module again. A model returned earlier keeps the values it was returned with.

      Exported programs are also kept on disk (`$ENTK_CACHE_DIR/torch-programs`, `program_cache.py`):
      a new process converting the same module reads its program instead of running torch.export,
      once PyTorch has checked that it reproduces the module's output and parameter gradients on
      `example_input`; `model.info["program_cache"]` says what happened ("hit", "stored", "not
      stored" or "off"; `ENTK_PROGRAM_CACHE=0` turns it off).

    Raises:
      UnsupportedOpsError / ExportError (in `mode="export"`): the ATen ops without a translation
        (with the module path and source line of each), or why torch.export failed (e.g.
        data-dependent control flow); both point to `mode="bridge"`.
      ValueError: the module or input is float64 while JAX runs in 32-bit mode (it would compute in
        float32); `entk.ntk` turns 64-bit mode on by itself, other uses need
        `jax.config.update("jax_enable_x64", True)` (or `with jax.enable_x64(True):`).
    """
    return _conversion(module, example_input, mode, include_frozen, training,
                       batch_axis).current(copy=True)


def live_model(module: Any, example_input: Any, mode: str = "auto") -> Model:
    """`from_torch(module, example_input, mode)` whose arrays alias the module's tensors' memory.

    For one kernel computation that completes before the module can change again (`entk.ntk`):
    no copy of the weights is made, and whatever the module holds now (in-place or `.data` edits
    included) is what is computed with.
    """
    return _conversion(module, example_input, mode, False, False, 0).current(copy=False)


def has_float64(module: Any) -> bool:
    """Whether a parameter or buffer of `module` is float64 / complex128 (the model computes in 64 bits)."""
    import torch

    wide = (torch.float64, torch.complex128)
    return any(t is not None and t.dtype in wide for m in module.modules()
               for tensors in (m._parameters, m._buffers) for t in tensors.values())


def _conversion(module: Any, example_input: Any, mode: str, include_frozen: bool, training: bool,
                batch_axis: int | None) -> _Converted:
    """The cached conversion for these options if its guard still holds, else a new one."""
    import torch

    from entk.adapters.torch import guards

    if mode not in _MODES:
        raise ValueError(f"mode={mode!r}; use one of {', '.join(repr(m) for m in _MODES)}.")
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch(module=...) needs a torch.nn.Module, got "
                        f"{type(module).__module__}.{type(module).__name__}; wrap a plain function "
                        f"in a Module whose forward calls it.")
    example_input = _as_torch_example(example_input)
    options = (include_frozen, training, batch_axis, _input_signature(example_input),
               bool(jax.config.x64_enabled))
    per_module = _module_cache(module)
    guard = guards.snapshot(module)
    cached = _lookup(per_module, mode, options)
    if cached is not None:
        key, entry = cached
        if entry.guard[0] == guard:
            return entry
        del per_module[key]  # something baked into it changed: convert again
    _check_precision(module, example_input)
    exported, model = _convert(module, example_input, mode, include_frozen, training, batch_axis)
    keep: list = []  # the objects the guard records by identity, kept alive with it
    entry = _Converted(exported, model, (guards.snapshot(module, keep), keep),
                       _tensor_slots(module, exported, model, include_frozen))
    per_module[(mode,) + options] = entry
    return entry


def _check_precision(module: Any, example_input: Any) -> None:
    """Refuses float64 models / inputs while JAX runs 32-bit (they would be computed in float32)."""
    import torch

    if jax.config.x64_enabled:
        return
    wide = (torch.float64, torch.complex128)
    named = list(module.named_parameters()) + list(module.named_buffers())
    leaves = torch.utils._pytree.tree_leaves(example_input)
    culprit = next((f"parameter/buffer {name!r}" for name, t in named if t.dtype in wide), None)
    culprit = culprit or next((f"the example input ({t.dtype})" for t in leaves
                               if isinstance(t, torch.Tensor) and t.dtype in wide), None)
    if culprit is not None:
        raise ValueError(
            f"entk.from_torch: {culprit} is float64, but JAX runs in 32-bit mode, so the model would "
            f"silently be computed in float32. Enable 64-bit mode first, "
            f"jax.config.update('jax_enable_x64', True) (or run the entk calls inside "
            f"`with jax.enable_x64(True):`; entk.ntk does this by itself), or convert the module "
            f"and inputs to float32 (module.float()).")


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


def _tensor_slots(module: Any, exported: Any, model: Model, include_frozen: bool) -> list:
    """`(group, name, tensor)` for every value the model reads: see `_Converted`.

    Lifted constants (tensors held outside the registered ones, e.g. a plain tensor attribute or
    the weights of submodules in a Python list) are the exported program's own tensors, which alias
    the module's storage: reading them at every call sees in-place edits, and the guard sees them
    being replaced.
    """
    if exported is None:  # bridge mode: the names bridge_model chose
        info = model.info
        return ([("params", n, module.get_parameter(n)) for n in info["param_names"]]
                + [("frozen", n, module.get_parameter(n)) for n in info["frozen_param_names"]]
                + [("buffers", n, module.get_buffer(n)) for n in info["buffer_names"]])
    trainable = _trainable(module, include_frozen)
    slots = [("params" if name in trainable else "frozen", name, p)
             for name, p in module.named_parameters()]
    slots += [("buffers", name, b) for name, b in module.named_buffers(remove_duplicate=False)]
    constants = exported.program.constants.items()
    slots += [("constants", name, c) for name, c in constants if is_tensor(c)]
    return slots


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
            try:
                bridged = _bridge_model(module, example_input, include_frozen, training)
            except export.OldStyleAutogradFunctionError as refused:  # neither mode can run it
                raise export.OldStyleAutogradFunctionError(
                    f"export mode failed ({_fallback_headline(e)}), and bridge mode cannot run this "
                    f"model either: {refused}\nExport failure: {reason}") from e
            warnings.warn(f"entk.from_torch: {_fallback_headline(e)}; using bridge mode "
                          f"(torch.func callbacks; strategies 'jc' and 'ntvp' only).\n"
                          f"Details: {reason}",
                          ExportFallbackWarning, stacklevel=3)
            return None, bridged
    return None, _bridge_model(module, example_input, include_frozen, training)


def _fallback_headline(error: Exception) -> str:
    """The first line of the fall-back warning: the untranslated ops and where they are, else the
    first line of the error (users often read only that line)."""
    where = getattr(error, "where", None)
    if where:
        ops = []
        for op, places in where.items():
            more = f" and {len(places) - 1} more" if len(places) > 1 else ""
            ops.append(f"{op} (at {places[0]}{more})")
        return "no JAX translation for " + "; ".join(ops)
    first = str(error).strip().split("\n", 1)[0]
    return f"export mode failed: {first}"


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
    from entk.adapters.torch.autograd_semantics import refuse_old_style_functions

    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    refuse_old_style_functions(module, args)
    model = bridge_model(module, example_input, include_frozen=include_frozen)
    return model.replace(info={**model.info, "example_input": example_input, "training": False})


def _export_model(module: Any, example_input: Any, include_frozen: bool, training: bool,
                  batch_axis: int | None) -> tuple[Any, Model]:
    from entk.adapters.torch import export

    trainable = _trainable(module, include_frozen)
    exported = export.ExportedModule(module, example_input, training=training,
                                     batch_axis=batch_axis, trainable=trainable)
    stub = Model(exported.apply_with_state, {}, None, info={"mode": "export"})
    values = _Converted(exported, stub, ((), []), _tensor_slots(module, exported, stub, include_frozen))
    tensors = values.current(copy=False)  # the cached template drops them; from_torch copies
    has_batch_norm = any(isinstance(m, torch_batch_norm_types()) for m in module.modules())
    info = {
        "mode": "export",
        "framework": "torch",
        "module": type(module).__name__,
        "training": training,
        "train_mode_batch_norm": bool(training and has_batch_norm),
        "param_names": tuple(tensors.params),
        "frozen_param_names": tuple(tensors.state["frozen"]),
        "buffer_names": tuple(tensors.state["buffers"]),
        "input_layout": "as the PyTorch module (NCHW for images)",
        "dynamic_batch": exported.dynamic,
        "program_cache": exported.program_cache,
        "exported_program": exported.program,
        "ops": sorted({str(n.target) for n in exported.program.graph.nodes
                       if n.op == "call_function"}),
    }
    model = Model(exported.apply_with_state, tensors.params, tensors.state, source="torch",
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
