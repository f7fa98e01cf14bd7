"""Export mode: a PyTorch module → `torch.export` graph of core ATen ops → a plain JAX function.

    module ──torch.export.export──► ExportedProgram ──run_decompositions()──► core-ATen FX graph
           ──GraphTranslation (one registered JAX function per op, see `graph_translation.py`
             and `aten.py`)──► JAX

The graph's placeholders are mapped to the `entk.Model` pieces:

- parameters → `params`, a flat dict keyed by `module.named_parameters()` names (tied weights map to
  the one name `named_parameters()` reports); parameters with `requires_grad=False` go to
  `state["frozen"]` unless `include_frozen=True`;
- buffers (BatchNorm running statistics, ...) → `state["buffers"]`, lifted tensor constants →
  `state["constants"]`;
- user inputs → `x`: a single tensor, a tuple of positional inputs, or a dict of keyword inputs,
  exactly as given in `example_input`, in PyTorch's layout (NCHW).

PyTorch's autograd semantics are kept (`autograd_semantics.py`): `detach()` and the outputs of
`torch.no_grad()` / `torch.inference_mode()` blocks become `jax.lax.stop_gradient`, and a custom
`torch.autograd.Function` becomes a `jax.custom_jvp` built from its own forward and backward
(`autograd_function.py`; the few forms it cannot keep raise `AutogradFunctionError`).

The module is exported in eval mode unless asked otherwise, with the batch axis marked dynamic so
that one export serves every batch size ≥ 1 (or ≥ 2 where the model's code treats size 1
differently, `torch.export.Dim.AUTO`); inputs whose shapes the export does not cover (another
sequence length, batch 1 then) are exported again on first use, once per shape, at JAX trace time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import re
import warnings
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import torch
from torch.utils import _pytree as torch_pytree

from entk.adapters.torch import (aten, autograd_function, autograd_semantics, dispatch_capture,
                                 program_cache, program_check)
from entk.adapters.torch.graph_translation import (  # noqa: F401 - the errors are re-exported here
    BRIDGE_HINT, GraphTranslation, TranslationError, UnsupportedOpsError, input_dims, numpy_dtype,
    tensor_to_jax)

PyTree = Any


# ---------------------------------------------------------------- errors


class ExportError(RuntimeError):
    """`torch.export` could not capture the module (data-dependent control flow, untraceable code)."""


class InputDtypeError(ExportError, TypeError):
    """The example input has the wrong dtype family (integers where the model needs floats)."""


class AutogradFunctionError(ExportError, autograd_semantics.AutogradFunctionError):
    """The model applies a custom `torch.autograd.Function` in a form export mode cannot keep (or a
    grad-mode construct it cannot express); bridge mode runs it in PyTorch."""


OldStyleAutogradFunctionError = autograd_semantics.OldStyleAutogradFunctionError


# ---------------------------------------------------------------- exporting


@contextlib.contextmanager
def module_mode(module: torch.nn.Module, training: bool) -> Iterator[None]:
    """Puts every submodule in train or eval mode, restoring each one's flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def split_example(example_input: Any) -> tuple[tuple, dict, str]:
    """`example_input` → (positional args, keyword args, kind) where kind is "single", "args" or
    "kwargs" (a tensor, a tuple/list of positional inputs, a dict of keyword inputs)."""
    if isinstance(example_input, dict):
        return (), dict(example_input), "kwargs"
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}, "args"
    return (example_input,), {}, "single"


def _dynamic_shapes(module: torch.nn.Module, args: tuple, kwargs: dict, batch_axis: int | None,
                    from_one: bool = False):
    """`dynamic_shapes` marking every input's batch axis: one `Dim` of sizes ≥ 1 shared by all
    inputs (`from_one`), else `Dim.AUTO` (export decides; it specializes size 1 away)."""
    if batch_axis is None:
        return None
    auto = torch.export.Dim("batch", min=1) if from_one else torch.export.Dim.AUTO

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.ndim > batch_axis >= -x.ndim:
            return {batch_axis % x.ndim: auto}
        return None

    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    shapes = {}
    for name, value in bound.arguments.items():
        kind = inspect.signature(module.forward).parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(spec(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: spec(v) for k, v in value.items()}
        else:
            shapes[name] = spec(value)
    return shapes


def _describe_export_failure(module: torch.nn.Module, args: tuple, kwargs: dict,
                             error: Exception) -> str:
    text = f"{type(error).__name__}: {error}"
    first = text.strip().splitlines()[0][:500]
    name = type(module).__name__
    data_dependent = re.search(r"data.dependent|GuardOnDataDependent|DataDependent|"
                               r"Could not guard on|_local_scalar_dense|\.item\(\)|nonzero", text)
    if data_dependent:
        msg = (f"torch.export could not capture {name}: its control flow depends on tensor values "
               f"(data-dependent control flow such as `if x.sum() > 0` or `.item()`), which a graph "
               f"of ATen ops cannot express. {first}\nTo use this model, {BRIDGE_HINT}.")
    else:
        msg = f"torch.export could not capture {name}: {first}\nTo use this model, {BRIDGE_HINT}."
    if re.search(r"Cache|past_key_values", text):
        msg += ("\nNote: the model returns a key/value cache object; for a Hugging Face model build "
                "it with config.use_cache=False (or pass use_cache=False) so it returns tensors only.")
    leaves = torch_pytree.tree_leaves((args, kwargs))
    ints = [x for x in leaves if isinstance(x, torch.Tensor) and not x.is_floating_point()]
    has_float_params = any(p.is_floating_point() for p in module.parameters())
    if ints and has_float_params and re.search(r"type|long|int", text, re.IGNORECASE):
        msg = (f"example_input holds {ints[0].dtype} tensors, but {name} appears to need "
               f"floating-point inputs here: pass e.g. x.float() (or x.double()).\n" + msg)
    return msg


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Silences torch.export's log output (graph dumps on failure); failures are raised instead."""

    loggers = [logging.getLogger(name) for name in
               ("torch.fx.experimental.symbolic_shapes", "torch.export", "torch._export", "torch._subclasses",
                "torch._dynamo", "torch._functorch", "torch.fx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _decomposition_table() -> dict:
    """The default core-ATen decompositions, except for ops translated whole (see `_KEEP`) and
    `aten.detach` (a stop-gradient, see `autograd_semantics.py`)."""
    return autograd_semantics.decomposition_table(_KEEP)


# Ops kept whole: scaled_dot_product_attention's decomposition is slower and fails for some
# layouts (e.g. Hugging Face GPT-2) in run_decompositions; linalg_vector_norm's is `pow(sum(x²), 0.5)`,
# whose derivative at a zero vector is 0·∞ = NaN where PyTorch's own norm gives 0 (F.normalize of an
# all-zero row, e.g. SwinV2's zero-padded attention windows; see `aten_reduce.linalg_vector_norm`).
_KEEP = (torch.ops.aten.scaled_dot_product_attention.default,
         torch.ops.aten.linalg_vector_norm.default)


@contextlib.contextmanager
def _only_entk_warnings() -> Iterator[None]:
    """Hides torch.export's advisory warnings (not the user's concern) and shows, once each, those
    entk's export context raises about the model (`autograd_semantics.ExportSemanticsWarning`)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    shown = set()
    for w in caught:
        if issubclass(w.category, autograd_semantics.ExportSemanticsWarning) and str(w.message) not in shown:
            shown.add(str(w.message))
            warnings.warn(w.message, stacklevel=4)


def export_module(module: torch.nn.Module, args: tuple, kwargs: dict, *, training: bool,
                  batch_axis: int | None) -> torch.export.ExportedProgram:
    """`torch.export.export` + `run_decompositions()` (core ATen), in the requested mode.

    In eval mode the batch axis is first marked dynamic from size 1 up, so that one program also
    serves the per-example computation (batch 1). torch.export then assumes that size 1 behaves like
    any other (it does not guard `x.shape[0] == 1`), so that program is kept only if PyTorch runs it
    on the first example exactly as the module itself does (output and parameter gradients).
    Otherwise, and in training mode: `Dim.AUTO` (dynamic where the model allows, sizes ≥ 2), then
    static; an `ExportError` reports why those failed.
    """
    dynamic = _dynamic_shapes(module, args, kwargs, batch_axis)
    attempts = [(None, True)]
    if dynamic is not None:
        attempts = [(dynamic, True)] + attempts
        if not training:
            attempts.insert(0, (_dynamic_shapes(module, args, kwargs, batch_axis, from_one=True),
                                False))
    error: Exception | None = None
    with module_mode(module, training), _only_entk_warnings(), _quiet_torch_logs():
        for shapes, report in attempts:
            try:
                with autograd_semantics.export_context(module, _KEEP):
                    program = torch.export.export(module, args, kwargs, dynamic_shapes=shapes,
                                                  strict=False)
            except autograd_semantics.AutogradFunctionError as e:  # raised by opaque_apply
                raise AutogradFunctionError(str(e)) from None
            except Exception as e:  # noqa: BLE001 - every export failure is reported below
                error = error or (e if report else None)
                continue
            with _autograd_errors_as_export_errors():
                autograd_semantics.detach_no_grad_outputs(program)
            try:
                program = program.run_decompositions(_decomposition_table())
            except Exception as e:  # noqa: BLE001 - every export failure is reported below
                error = error or (e if report else None)
                continue
            with _autograd_errors_as_export_errors():
                autograd_function.prepare_program(program)
            if not report and not program_check.reproduces(
                    program, module, *program_check.first_examples(args, kwargs, batch_axis, 1),
                    _module_runner(module, training)):
                continue  # the model treats batch size 1 differently: sizes ≥ 2 only
            return program
    message = _describe_export_failure(module, args, kwargs, error)
    kind = InputDtypeError if message.startswith("example_input holds") else ExportError
    raise kind(message) from error


def _module_runner(module: torch.nn.Module, training: bool) -> Any:
    """`run(params, args, kwargs)`: the module itself with these parameters, in the export's
    train/eval mode (what `program_check.reproduces` compares a program with)."""
    def run(params: dict, args: tuple, kwargs: dict) -> Any:
        with module_mode(module, training):
            return torch.func.functional_call(module, params, args, kwargs)

    return run


def _cached_export(module: torch.nn.Module, args: tuple, kwargs: dict, *, training: bool,
                   batch_axis: int | None) -> tuple[Any, str]:
    """`export_module`, or the program a previous process stored for this module (`program_cache.py`).

    Returns the program and what the disk cache did: "hit" (stored program used), "stored" (exported,
    then stored), "not stored" (exported; this program cannot be stored) or "off"; or "captured": in
    eval mode the module is first recorded by `dispatch_capture.capture` (milliseconds, this input's
    shapes only), and torch.export runs only where that capture refuses the model.
    """
    if not training and dispatch_capture.enabled():
        try:
            with module_mode(module, training):
                return dispatch_capture.capture(module, args, kwargs), "captured"
        except Exception as e:  # noqa: BLE001 - Refused, or forward failed: torch.export decides and reports
            logging.getLogger("entk").debug("dispatch capture of %s refused (%s: %s); using torch.export",
                                            type(module).__name__, type(e).__name__, e)
    if program_cache.directory() is None:
        return export_module(module, args, kwargs, training=training, batch_axis=batch_axis), "off"
    key = program_cache.fingerprint(module, args, kwargs, training=training, batch_axis=batch_axis)
    if key is None:
        program = export_module(module, args, kwargs, training=training, batch_axis=batch_axis)
        return program, "not stored"
    program = program_cache.load(key, module, args, kwargs, _module_runner(module, training),
                                 batch_axis)
    if program is not None:
        return program, "hit"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = export_module(module, args, kwargs, training=training, batch_axis=batch_axis)
    for w in caught:  # shown as they were; a program that warns is exported (and warns) every time
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if any(issubclass(w.category, autograd_semantics.ExportSemanticsWarning) for w in caught):
        return program, "not stored"
    return program, "stored" if program_cache.store(key, program, module) else "not stored"


@contextlib.contextmanager
def _autograd_errors_as_export_errors() -> Iterator[None]:
    """Raises what detaching no-grad blocks (`autograd_semantics.py`) or exporting custom Functions
    (`autograd_function.py`) refuses as an `ExportError`, so `mode="auto"` falls back to the bridge."""
    try:
        yield
    except autograd_semantics.AutogradFunctionError as e:
        raise AutogradFunctionError(str(e)) from None


# ---------------------------------------------------------------- placeholders


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where a placeholder's value comes from: ("params", name), ("state", group, name) or
    ("input", leaf index)."""

    source: str
    key: Any


def map_placeholders(program: torch.export.ExportedProgram, module: torch.nn.Module,
                     trainable: set[str]) -> dict[str, Slot]:
    """Placeholder name → the `params` / `state` / input slot it reads."""
    from torch.export.graph_signature import InputKind

    canonical = {}  # id(parameter) -> its named_parameters() name (resolves tied weights)
    for name, p in module.named_parameters():
        canonical.setdefault(id(p), name)
    slots: dict[str, Slot] = {}
    n_inputs = 0
    for spec in program.graph_signature.input_specs:
        placeholder = spec.arg.name
        if spec.kind == InputKind.PARAMETER:
            name = canonical.get(id(module.get_parameter(spec.target)), spec.target)
            slots[placeholder] = (Slot("params", name) if name in trainable
                                  else Slot("state", ("frozen", name)))
        elif spec.kind == InputKind.BUFFER:
            slots[placeholder] = Slot("state", ("buffers", spec.target))
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            slots[placeholder] = Slot("state", ("constants", spec.target))
        elif spec.kind == InputKind.USER_INPUT:
            slots[placeholder] = Slot("input", n_inputs)
            n_inputs += 1
        else:
            raise ExportError(f"torch.export produced a {spec.kind.name} input ({placeholder}), "
                              f"which export mode cannot feed; {BRIDGE_HINT}.")
    return slots


# ---------------------------------------------------------------- input and output structure


def flatten_by_spec(spec: torch_pytree.TreeSpec, obj: Any, path: str = "x") -> list[Any]:
    """The leaves of `obj` in the order of a torch `TreeSpec` (dict entries looked up by key)."""
    if spec.is_leaf():
        return [obj]
    children = spec.children() if hasattr(spec, "children") else spec.children_specs
    if spec.type in (dict,) or (isinstance(spec.context, list) and isinstance(obj, dict)):
        keys = spec.context
        if not isinstance(obj, dict) or set(obj) != set(keys):
            raise ValueError(f"{path} must be a dict with keys {sorted(keys)} (as in "
                             f"example_input), got {sorted(obj) if isinstance(obj, dict) else type(obj).__name__}.")
        out = []
        for key, child in zip(keys, children):
            out += flatten_by_spec(child, obj[key], f"{path}[{key!r}]")
        return out
    if not isinstance(obj, (tuple, list)) or len(obj) != len(children):
        raise ValueError(f"{path} must be a sequence of {len(children)} inputs (as in "
                         f"example_input), got {type(obj).__name__}"
                         f"{'' if not isinstance(obj, (tuple, list)) else f' of {len(obj)}'}.")
    out = []
    for i, (item, child) in enumerate(zip(obj, children)):
        out += flatten_by_spec(child, item, f"{path}[{i}]")
    return out


def unflatten_to_jax(spec: torch_pytree.TreeSpec, leaves: Sequence[Any]) -> Any:
    """Rebuilds a torch output structure with JAX-friendly containers.

    Tuples, lists, dicts and namedtuples keep their type; other registered containers (Hugging Face
    `ModelOutput`, ...) become dicts when the spec names their fields, tuples otherwise.
    """
    it = iter(leaves)

    def build(s: torch_pytree.TreeSpec) -> Any:
        if s.is_leaf():
            return next(it)
        children = [build(c) for c in (s.children() if hasattr(s, "children") else s.children_specs)]
        if s.type in (tuple, list):
            return s.type(children)
        if s.type is not None and issubclass(s.type, tuple) and hasattr(s.type, "_fields"):
            return s.type(*children)
        context = s.context
        if isinstance(context, (list, tuple)) and len(context) == len(children) and all(
                isinstance(k, str) for k in context):
            return dict(zip(context, children))
        if isinstance(context, (list, tuple)) and len(context) == 2 and isinstance(context[1], list):
            keys = context[1]  # some containers store (type, keys)
            if len(keys) == len(children):
                return dict(zip(keys, children))
        return tuple(children)

    return build(spec)


# ---------------------------------------------------------------- a converted module


@dataclasses.dataclass
class _Entry:
    """One exported program, translated, with what its user inputs accept."""

    program: torch.export.ExportedProgram
    translation: GraphTranslation
    slots: dict[str, Slot]
    input_shapes: list[tuple]  # per user input: its sizes as `graph_translation.input_dims` gives them


class ExportedModule:
    """A PyTorch module converted to JAX by export; `apply_with_state` is the `entk.Model` function.

    Holds the module (to export again for input shapes the first export does not cover) and one
    translated program per distinct shape set. `apply_with_state(params, state, x)` reads parameters
    from `params` (keyed by `named_parameters()` names), buffers / frozen weights / constants from
    `state`, and `x` with the structure of `example_input`.
    """

    def __init__(self, module: torch.nn.Module, example_input: Any, *, training: bool,
                 batch_axis: int | None, trainable: set[str]):
        self.module = module
        self.training = training
        self.batch_axis = batch_axis
        self.trainable = trainable
        args, kwargs, self.kind = split_example(example_input)
        leaves = torch_pytree.tree_leaves((args, kwargs))
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(
                    f"example_input leaf {i} is a {type(leaf).__name__}; export mode takes a tensor, "
                    f"a tuple of tensors (positional inputs) or a dict of tensors (keyword inputs). "
                    f"Bind other arguments with a wrapper module or functools.partial.")
        self.example_leaves = [(tuple(t.shape), t.dtype, t.device) for t in leaves]
        program, self.program_cache = _cached_export(module, args, kwargs, training=training,
                                                     batch_axis=batch_axis)
        self.primary = self._entry(program)
        self.in_spec = program.call_spec.in_spec
        self.out_spec = program.call_spec.out_spec
        self.by_shape: dict[tuple, _Entry] = {}
        self.dynamic = any(not isinstance(d, int) for s in self.primary.input_shapes for d in s)

    @property
    def program(self) -> torch.export.ExportedProgram:
        return self.primary.program

    def _entry(self, program: torch.export.ExportedProgram) -> _Entry:
        translation = GraphTranslation(program)
        translation.check_supported(type(self.module).__name__)
        slots = map_placeholders(program, self.module, self.trainable)
        by_name = {n.name: n for n in program.graph_module.graph.nodes if n.op == "placeholder"}
        inputs = sorted((slot.key, name) for name, slot in slots.items() if slot.source == "input")
        shapes = [input_dims(by_name[name].meta["val"].shape, program.range_constraints)
                  for _, name in inputs]
        return _Entry(program, translation, slots, shapes)

    def constants(self) -> dict[str, jax.Array]:
        """Lifted tensor constants of the program (they go to `state["constants"]`)."""
        return {name: tensor_to_jax(value, copy=True)
                for name, value in self.primary.program.constants.items()
                if isinstance(value, torch.Tensor)}

    # ------------------------------------------------------------ shapes

    def _accepts(self, entry: _Entry, shapes: list[tuple]) -> bool:
        bindings: dict[str, int] = {}
        derived = []
        for want, got in zip(entry.input_shapes, shapes):
            if len(want) != len(got):
                return False
            for w, g in zip(want, got):
                if isinstance(w, int):
                    if w != g:
                        return False
                elif w[0] == "sym":
                    _, name, lower, upper = w
                    if bindings.setdefault(name, g) != g:
                        return False
                    if (lower is not None and g < lower) or (upper is not None and g > upper):
                        return False
                else:
                    derived.append((w, g))
        if derived:
            import sympy

            for dim, g in derived:
                try:
                    expr = dim[2] if len(dim) > 2 else sympy.sympify(dim[1])  # stored: text only
                    value = expr.subs({s: bindings[str(s)] for s in expr.free_symbols
                                       if str(s) in bindings})
                    if not value.is_number or int(value) != g:
                        return False
                except (sympy.SympifyError, TypeError, ValueError):
                    return False  # exported again for these shapes
        return True

    def entry_for(self, shapes: list[tuple], *, static: bool = False) -> _Entry:
        """The translated program for these input shapes, exporting again on first sight.

        `static=True` skips the dynamic-batch program (used when one of its runtime assertions on
        sizes fails for these shapes).
        """
        if not static and self._accepts(self.primary, shapes):
            return self.primary
        key = tuple(shapes)
        if key not in self.by_shape:
            examples = [torch.zeros(shape, dtype=dtype, device=device)
                        for shape, (_, dtype, device) in zip(shapes, self.example_leaves)]
            args, kwargs = torch_pytree.tree_unflatten(examples, self.in_spec)
            try:
                program, _ = _cached_export(self.module, tuple(args), dict(kwargs),
                                            training=self.training, batch_axis=None)
            except ExportError as e:
                raise ExportError(f"Inputs of shapes {shapes} differ from those the model was "
                                  f"converted with ({[s for s, _, _ in self.example_leaves]}), and "
                                  f"exporting it again for them failed:\n{e}") from e
            self.by_shape[key] = self._entry(program)
        return self.by_shape[key]

    # ------------------------------------------------------------ the model function

    def _input_leaves(self, x: Any) -> list[jax.Array]:
        call = {"single": ((x,), {}), "args": (tuple(x) if isinstance(x, (tuple, list)) else x, {}),
                "kwargs": ((), x)}[self.kind]
        leaves = flatten_by_spec(self.in_spec, call, "x")
        out = []
        for i, (leaf, (shape, dtype, _)) in enumerate(zip(leaves, self.example_leaves)):
            where = "x" if self.kind == "single" else f"input {i}"
            if isinstance(leaf, torch.Tensor):
                leaf = tensor_to_jax(leaf, copy=False)
            elif not isinstance(leaf, jax.Array) and not hasattr(leaf, "aval"):
                leaf = jnp.asarray(leaf)
            want = jax.dtypes.canonicalize_dtype(numpy_dtype(dtype))
            wants_float = jnp.issubdtype(want, jnp.inexact)
            if wants_float != bool(jnp.issubdtype(leaf.dtype, jnp.inexact)):
                need = "floating-point" if wants_float else f"integer ({dtype})"
                raise TypeError(
                    f"{where} has dtype {leaf.dtype}, but the model was converted with a "
                    f"{dtype} example: it needs {need} inputs here (cast it, e.g. "
                    f"{'x.astype(jnp.float32)' if wants_float else 'x.astype(jnp.int32)'}).")
            if len(leaf.shape) != len(shape):
                raise ValueError(
                    f"{where} has shape {tuple(leaf.shape)}, but the model was converted with "
                    f"example shape {shape}: pass inputs with the same number of dimensions (the "
                    f"batch axis included).")
            out.append(leaf.astype(want) if leaf.dtype != want else leaf)
        return out

    def apply_with_state(self, params: PyTree, state: PyTree, x: Any, **kwargs: Any) -> PyTree:
        """`f(params, state, x)`: the module's output (its structure, JAX arrays) as plain JAX."""
        if kwargs:
            raise TypeError(f"an exported torch model takes no keyword arguments, got "
                            f"{sorted(kwargs)}; pass keyword inputs of the module as a dict x.")
        leaves = self._input_leaves(x)
        shapes = [tuple(int(d) for d in leaf.shape) for leaf in leaves]
        entry = self.entry_for(shapes)
        try:
            return self._run(entry, params, state, leaves)
        except aten.ShapeAssertionError:
            if entry is not self.primary:
                raise
        return self._run(self.entry_for(shapes, static=True), params, state, leaves)

    def _run(self, entry: _Entry, params: PyTree, state: PyTree, leaves: list[Any]) -> PyTree:
        values: dict[str, Any] = {}
        for placeholder, slot in entry.slots.items():
            if slot.source == "input":
                values[placeholder] = leaves[slot.key]
            elif slot.source == "params":
                if slot.key not in params:
                    raise KeyError(f"params has no entry {slot.key!r}; pass a dict keyed by the "
                                   f"module's named_parameters() names, like model.params.")
                values[placeholder] = params[slot.key]
            else:
                group, name = slot.key
                try:
                    values[placeholder] = state[group][name]
                except (KeyError, TypeError):
                    raise KeyError(f"state[{group!r}] has no entry {name!r}; pass the model's own "
                                   f"state (model.state).") from None
        return unflatten_to_jax(self.out_spec, entry.translation(values))
