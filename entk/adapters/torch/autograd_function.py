"""Custom `torch.autograd.Function`s in export mode, with their own backward.

`torch.export` inlines a Function's `forward` and drops its `backward`, so a straight-through
estimator or a hand-written GeLU derivative would be differentiated as plain ops: a silently wrong
kernel. Instead, while the model is exported, every `Function.apply` becomes one opaque op,

    entk_autograd.apply(key, tensors) -> list of output tensors

(`key` indexes a `FunctionCall`: the Function class and the non-tensor arguments of that call), so
the exported graph keeps the Function as a unit. Its JAX translation is a `jax.custom_jvp`:

- primal: the Function's `forward`, exported on its own (`_Rules.forward`);
- tangent: `J t`, the transpose of the Function's `backward` (`g ↦ Jᵀ g`, linear in `g`, exported
  on its own as `_Rules.backward`) applied to the input tangents (`jax.linear_transpose`). Forward
  mode (NTK-vector products, structured derivatives) and reverse mode (JAX transposes that linear
  map back into the Function's backward) then both give exactly PyTorch's gradients.

The two pieces are exported per input shapes, on first sight (the example's shapes while the model is
converted, so a Function that cannot be exported fails there and `mode="auto"` falls back to the
bridge). Both old-style (`forward(ctx, ...)`) and new-style (`setup_context`) Functions work; `ctx`
is a stand-in (`_Context`) that keeps what `save_for_backward` saved and other attributes.

Refused with `AutogradFunctionError` (bridge mode then runs the Function in PyTorch): `mark_dirty`
(in-place outputs), non-tensor outputs, tensors passed by keyword, and a `forward` / `backward` that
reads module parameters or buffers it was not given as inputs (their values would be frozen into
the translation; `torch.utils.checkpoint`'s reentrant form is such a case).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch

from entk.adapters.torch import aten
from entk.adapters.torch.graph_translation import (BRIDGE_HINT, GraphTranslation, numpy_dtype,
                                                   tensor_to_jax)

__all__ = ["FunctionCall", "AutogradFunctionError", "intercepting", "is_old_style", "opaque_apply",
           "prepare_program", "qualified_name"]


class AutogradFunctionError(RuntimeError):
    """A custom `torch.autograd.Function` (or a grad-mode construct) that export mode cannot keep;
    bridge mode runs it in PyTorch."""


_TENSOR = object()  # marks a tensor argument's place in FunctionCall.template


def qualified_name(function: type) -> str:
    """`module.Class` of a Function, as messages name it."""
    return f"{function.__module__}.{function.__qualname__}"


def is_old_style(function: type) -> bool:
    """No `setup_context` override: `forward(ctx, ...)`, which torch.func cannot transform."""
    return function.setup_context is torch.autograd.Function.setup_context


@dataclasses.dataclass(eq=False)
class FunctionCall:
    """One `Function.apply` in an exported model: what the opaque op with this call's key runs.

    Attributes:
      function: the `torch.autograd.Function` subclass.
      template: `apply`'s positional arguments, with `_TENSOR` where a tensor goes.
      kwargs: `apply`'s keyword arguments (non-tensor).
      where: the submodule and source line that applied it (for messages).
      root: the exported module (weakly), to recognise its parameters read by closure.
      keep: ATen ops the sub-exports keep whole (those of the main export).
      single: whether `forward` returns one tensor rather than a tuple (known after its first run).
      rules: the translated forward / backward per input signature (shapes and dtypes).
    """

    function: type
    template: tuple
    kwargs: dict
    where: str
    root: Any
    keep: tuple
    single: bool | None = None
    rules: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return qualified_name(self.function)

    @property
    def old_style(self) -> bool:
        return is_old_style(self.function)

    def arguments(self, tensors: Sequence[torch.Tensor]) -> list:
        it = iter(tensors)
        return [next(it) if a is _TENSOR else a for a in self.template]

    def forward(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, _Context]:
        """Runs the Function's forward (and `setup_context`) as autograd would: `(outputs, ctx)`."""
        global _DEPTH
        args = self.arguments(tensors)
        ctx = _Context(self, tuple(isinstance(a, torch.Tensor) and a.is_floating_point() for a in args))
        _DEPTH += 1  # Functions applied inside this one run as they are (see `intercepting`)
        try:
            with torch.no_grad():
                if self.old_style:
                    out = self.function.forward(ctx, *args, **self.kwargs)
                else:
                    out = self.function.forward(*args, **self.kwargs)
                    self.function.setup_context(ctx, tuple(args), out)
        finally:
            _DEPTH -= 1
        single = not isinstance(out, (tuple, list))
        outs = (out,) if single else tuple(out)
        if not all(isinstance(o, torch.Tensor) for o in outs):
            raise AutogradFunctionError(
                f"{self.name} (in {self.where}) returns non-tensor outputs, which export mode "
                f"cannot keep; {BRIDGE_HINT}.")
        self.single = single
        return outs, ctx

    def backward(self, ctx: _Context, outs: tuple, grads: Sequence[Any]) -> list:
        """The Function's backward: one gradient (or None) per tensor input of `forward`, given
        `grads` for its outputs (None for an output without one: zeros where it is a float)."""
        grad_outputs = [torch.zeros_like(o) if g is None and o.is_floating_point() else g
                        for o, g in zip(outs, grads)]
        result = self.function.backward(ctx, *grad_outputs)
        result = result if isinstance(result, (tuple, list)) else (result,)
        if len(result) < len(self.template):
            raise AutogradFunctionError(
                f"{self.name}.backward (in {self.where}) returned {len(result)} gradient(s) for "
                f"{len(self.template)} input(s) of forward.")
        return [g for a, g in zip(self.template, result) if a is _TENSOR]


class _Context:
    """Stands in for autograd's `ctx` in a Function's forward / setup_context / backward."""

    def __init__(self, call: FunctionCall, needs_input_grad: tuple):
        self._call = call
        self.needs_input_grad = needs_input_grad
        self.saved_tensors: tuple = ()
        self.non_differentiable: list = []
        self.materialize_grads = True

    def save_for_backward(self, *tensors: Any) -> None:
        self.saved_tensors = tensors

    def save_for_forward(self, *tensors: Any) -> None:
        self.saved_for_forward = tensors

    @property
    def saved_variables(self) -> tuple:
        return self.saved_tensors

    def mark_non_differentiable(self, *tensors: Any) -> None:
        self.non_differentiable += tensors

    def set_materialize_grads(self, value: bool) -> None:
        self.materialize_grads = value

    def mark_dirty(self, *tensors: Any) -> None:
        raise AutogradFunctionError(
            f"{self._call.name} (in {self._call.where}) modifies its inputs in place "
            f"(ctx.mark_dirty), which export mode cannot keep; {BRIDGE_HINT}.")


# ---------------------------------------------------------------- the opaque op

_CALLS: list[FunctionCall] = []
_DEPTH = 0  # > 0 while a Function's own forward runs


def intercepting() -> bool:
    """Whether a `Function.apply` seen now belongs to the model (not to another Function's forward,
    where autograd does not record it either)."""
    return _DEPTH == 0


@torch.library.custom_op("entk_autograd::apply", mutates_args=())
def _apply_op(key: int, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    outs, _ = _CALLS[key].forward(inputs)
    return [o.clone() for o in outs]  # a custom op's outputs may not alias its inputs


@_apply_op.register_fake
def _apply_fake(key: int, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    outs, _ = _CALLS[key].forward(inputs)
    return [o.clone() for o in outs]


def opaque_apply(function: type, args: tuple, kwargs: dict, where: str, root: torch.nn.Module,
                 keep: tuple) -> Any:
    """`function.apply(*args, **kwargs)` as one `entk_autograd.apply` op (used during the export)."""
    if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
        raise AutogradFunctionError(
            f"{qualified_name(function)} (in {where}) is applied with tensor "
            f"keyword arguments, which export mode cannot keep; pass them positionally, or "
            f"{BRIDGE_HINT}.")
    template = tuple(_TENSOR if isinstance(a, torch.Tensor) else a for a in args)
    call = FunctionCall(function, template, dict(kwargs), where, weakref.ref(root), keep)
    _CALLS.append(call)
    outs = _apply_op(len(_CALLS) - 1, [a for a in args if isinstance(a, torch.Tensor)])
    return outs[0] if call.single else tuple(outs)


# ---------------------------------------------------------------- translation


@dataclasses.dataclass
class _Rules:
    """A Function's forward and backward as JAX functions, for one input signature."""

    forward: Callable[..., list]   # (*tensor inputs) -> outputs
    backward: Callable[..., list]  # (*tensor inputs, *output grads) -> input grads
    differentiable_out: list[bool]  # float outputs not marked non-differentiable


class _Forward(torch.nn.Module):
    def __init__(self, call: FunctionCall):
        super().__init__()
        self.call = call

    def forward(self, *tensors: torch.Tensor) -> tuple:
        return tuple(o.clone() for o in self.call.forward(tensors)[0])


class _Backward(torch.nn.Module):
    def __init__(self, call: FunctionCall, n_inputs: int, float_outputs: list[bool]):
        super().__init__()
        self.call, self.n_inputs, self.float_outputs = call, n_inputs, float_outputs

    def forward(self, *tensors: torch.Tensor) -> tuple:
        inputs, given = tensors[:self.n_inputs], iter(tensors[self.n_inputs:])
        outs, ctx = self.call.forward(inputs)
        grads = [next(given) if f else None for f in self.float_outputs]
        with torch.enable_grad():
            result = self.call.backward(ctx, outs, grads)
        return tuple(torch.zeros_like(x) if g is None else _sum_to(g, x)
                     for x, g in zip(inputs, result) if x.is_floating_point())


def _sum_to(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A gradient brought to its input's shape and dtype as autograd does (summing broadcast axes)."""
    if tuple(grad.shape) != tuple(x.shape):
        grad = grad.sum_to_size(x.shape)
    return grad.to(x.dtype)


def _example(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def _export(call: FunctionCall, module: torch.nn.Module, examples: list, what: str) -> Callable:
    """`module` exported and translated: a JAX function of its (flat) tensor inputs."""
    from torch.export.graph_signature import InputKind

    try:
        with torch.no_grad():
            program = torch.export.export(module, tuple(examples), strict=False)
        table = torch.export.default_decompositions()
        for op in call.keep:
            table.pop(op, None)
        program = program.run_decompositions(table)
    except AutogradFunctionError:
        raise
    except Exception as e:  # noqa: BLE001 - reported with the Function's name
        first = f"{type(e).__name__}: {e}".strip().splitlines()[0][:400]
        raise AutogradFunctionError(
            f"the {what} of {call.name} (in {call.where}) could not be exported: {first}\n"
            f"To use this model, {BRIDGE_HINT}.") from e
    translation = GraphTranslation(program)
    translation.check_supported(f"{call.name}.{what}")
    _refuse_captured_state(call, program, what)
    constants, users = {}, []
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            users.append(spec.arg.name)
        else:  # lifted tensors created inside (torch.tensor(0.5), ...): checked above
            constants[spec.arg.name] = tensor_to_jax(program.constants[spec.target], copy=True)

    def run(*values: Any) -> list:
        return translation({**constants, **dict(zip(users, values))})

    return run


def _refuse_captured_state(call: FunctionCall, program: torch.export.ExportedProgram,
                           what: str) -> None:
    root = call.root()
    if root is None:
        return
    state = {t.untyped_storage().data_ptr() for t in list(root.parameters()) + list(root.buffers())
             if t.numel()}
    captured = [name for name, t in program.constants.items()
                if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() in state]
    if captured:
        hint = (" For torch.utils.checkpoint, pass use_reentrant=False (its non-reentrant form "
                "exports as plain ops)." if "Checkpoint" in call.name else "")
        raise AutogradFunctionError(
            f"the {what} of {call.name} (in {call.where}) reads parameters or buffers of the model "
            f"that are not among its inputs; export mode would freeze their current values. Pass "
            f"them to {call.function.__qualname__}.apply(...), or {BRIDGE_HINT}.{hint}")


_SHARED: dict[tuple, _Rules] = {}  # rules of calls that differ only in their tensors' values


def _plain(value: Any) -> bool:
    if value is _TENSOR or value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return True
    if isinstance(value, (tuple, list)):
        return all(map(_plain, value))
    return False


def _rules(call: FunctionCall, signature: tuple) -> _Rules:
    """The translated forward and backward of `call` for inputs of `signature`: exported on first
    sight, and shared by every call of the same Function with the same non-tensor arguments (a
    Function applied in each of 24 layers is exported once)."""
    if signature in call.rules:
        return call.rules[signature]
    shared = None
    if _plain(call.template) and _plain(list(call.kwargs.values())):
        shared = (call.function, repr(call.template), repr(sorted(call.kwargs.items())), signature)
        if shared in _SHARED:
            call.rules[signature] = _SHARED[shared]
            return _SHARED[shared]
    examples = [_example(shape, dtype) for shape, dtype in signature]
    forward = _export(call, _Forward(call), examples, "forward")
    outs, ctx = call.forward(examples)
    floats = [o.is_floating_point() for o in outs]
    grads = [torch.randn(o.shape, dtype=o.dtype) for o in outs if o.is_floating_point()]
    backward = _export(call, _Backward(call, len(examples), floats), examples + grads, "backward")
    differentiable = [o.is_floating_point() and not any(o is m for m in ctx.non_differentiable)
                      for o in outs]
    rules = _Rules(forward, backward, differentiable)
    call.rules[signature] = rules
    if shared is not None:
        _SHARED[shared] = rules
    return rules


@functools.cache
def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of a NumPy / JAX dtype (the inverse of `numpy_dtype`)."""
    for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16,
              torch.int32, torch.int64, torch.uint8, torch.bool):
        if numpy_dtype(t) == dtype:
            return t
    raise TypeError(f"no torch dtype for {dtype}")


def _signature(values: Sequence[Any]) -> tuple:
    """(shape, torch dtype) per JAX input."""
    return tuple((tuple(int(d) for d in v.shape), _torch_dtype(np.dtype(v.dtype))) for v in values)


def _is_float(x: Any) -> bool:
    return bool(jnp.issubdtype(x.dtype, jnp.inexact))


@aten.register("entk_autograd::apply")
def apply(key: int, inputs: list) -> list:
    """The Function as a `jax.custom_jvp`: its forward, and its backward transposed for tangents."""
    call = _CALLS[key]
    inputs = list(inputs)
    rules = _rules(call, _signature(inputs))

    @jax.custom_jvp
    def function(*xs: Any) -> tuple:
        return tuple(rules.forward(*xs))

    @function.defjvp
    def function_jvp(primals: tuple, tangents: tuple) -> tuple:
        outs = function(*primals)
        diff_in = [i for i, x in enumerate(primals) if _is_float(x)]
        diff_out = [j for j, d in enumerate(rules.differentiable_out) if d]
        float_out = [j for j, o in enumerate(outs) if _is_float(o)]

        def vjp(*cotangents: Any) -> tuple:  # linear in the cotangents: g ↦ Jᵀ g
            given = dict(zip(diff_out, cotangents))
            grads = [given[j] if j in given else jnp.zeros_like(outs[j]) for j in float_out]
            return tuple(rules.backward(*primals, *grads))

        avals = [jax.ShapeDtypeStruct(outs[j].shape, outs[j].dtype) for j in diff_out]
        pushed = jax.linear_transpose(vjp, *avals)(tuple(tangents[i] for i in diff_in))
        by_out = dict(zip(diff_out, pushed))
        out_tangents = tuple(by_out[j] if j in by_out else
                             (jnp.zeros_like(o) if _is_float(o) else
                              np.zeros(o.shape, dtype=jax.dtypes.float0))
                             for j, o in enumerate(outs))
        return outs, out_tangents

    return list(function(*inputs))


def prepare_program(program: torch.export.ExportedProgram) -> None:
    """Exports and translates the forward / backward of every Function in `program` for the shapes
    it was exported with, so that a Function export mode cannot handle fails at conversion (where
    `mode="auto"` falls back to the bridge), not at the first kernel."""
    for node in program.graph_module.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.entk_autograd.apply.default:
            key, args = node.args
            signature = tuple((tuple(d if isinstance(d, int) else d.node.hint for d in a.meta["val"].shape),
                               a.meta["val"].dtype) for a in args)
            _rules(_CALLS[key], signature)
