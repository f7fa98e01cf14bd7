"""Keeps PyTorch's autograd semantics in export mode: what torch does not differentiate, JAX must not.

`torch.export` + `run_decompositions()` give a graph for the *forward* computation; three things
that change PyTorch's gradients would be lost on the way, and the translated model would then be
differentiated through them (a silently wrong kernel):

- `tensor.detach()` (stop-gradient branches, EMA targets, the straight-through trick
  `x + (q - x).detach()`): the default decompositions turn `aten.detach` into `aten.alias`, which is
  indistinguishable from a plain view. `decomposition_table` keeps `aten.detach` whole, and its
  translation is `jax.lax.stop_gradient` (`aten_elementwise.py`). The in-place `t.detach_()` becomes
  an `aten.detach` that every later use of `t` reads.
- `with torch.no_grad():` / `torch.inference_mode()` blocks inside `forward`: the exported graph
  records a no-grad block as a `wrap_with_set_grad_enabled(False, submodule, *inputs)` node, which
  `run_decompositions()` inlines without a trace. `inference_mode` is not recorded at all, so during
  the export it is entered as `no_grad` (the same gradients; inference tensors are a memory
  optimisation). `detach_no_grad_outputs` then puts an `aten.detach` on every value leaving a
  no-grad block, before the decompositions run.
- custom `torch.autograd.Function`s: the export would inline their `forward` and drop their
  `backward`. `export_context` wraps `torch.autograd.Function.apply` for the duration, so each
  application becomes one opaque op whose translation keeps the Function's own backward
  (`autograd_function.py`; reentrant `torch.utils.checkpoint`, whose gradient is that of the function
  it wraps, is traced through). Old-style Functions (`forward(ctx, ...)`, no `setup_context`) work
  there too, but cannot run under torch.func: bridge mode refuses them up front
  (`refuse_old_style_functions`, `OldStyleAutogradFunctionError`) instead of failing deep inside
  a JAX callback.

The export runs under `torch.enable_grad()`, so a caller inside `torch.no_grad()` does not turn the
whole model into one no-grad block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import sys
import warnings
from typing import Any, Iterator

import torch

from entk.adapters.torch import autograd_function
from entk.adapters.torch.autograd_function import AutogradFunctionError
from entk.adapters.torch.graph_translation import BRIDGE_HINT, node_location

__all__ = ["AutogradFunctionError", "OldStyleAutogradFunctionError", "ExportSemanticsWarning", "FunctionUse",
           "export_context", "decomposition_table", "detach_no_grad_outputs",
           "refuse_old_style_functions"]


class ExportSemanticsWarning(UserWarning):
    """Something about the model's gradients the user should know, noticed during the export."""


class OldStyleAutogradFunctionError(NotImplementedError):
    """Bridge mode was asked to run a model that applies an old-style `torch.autograd.Function` (no
    `setup_context`), which torch.func cannot transform; export mode keeps such Functions."""


# ---------------------------------------------------------------- the export context


@dataclasses.dataclass(frozen=True)
class FunctionUse:
    """One `Function.apply` seen during the export: the class, and where the model applied it."""

    function: type
    where: str

    @property
    def qualified_name(self) -> str:
        return autograd_function.qualified_name(self.function)

    @property
    def old_style(self) -> bool:
        return autograd_function.is_old_style(self.function)


@contextlib.contextmanager
def export_context(root: torch.nn.Module, keep: tuple = ()) -> Iterator[None]:
    """The context `torch.export.export` runs in: gradients enabled, `inference_mode` entered as
    `no_grad`, and every custom `Function.apply` of the model turned into one opaque op
    (`autograd_function.opaque_apply`; its forward and backward are exported keeping the ATen ops
    `keep` whole, as the model's)."""
    function = torch.autograd.Function
    original = function.__dict__["apply"]

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        if not autograd_function.intercepting():
            return original.__get__(None, cls)(*args, **kwargs)
        if cls.__module__ == "torch.utils.checkpoint" and cls.__name__ == "CheckpointFunction":
            return _reentrant_checkpoint(*args)
        return autograd_function.opaque_apply(cls, args, kwargs, _call_site(root), root, keep)

    with torch.enable_grad(), _inference_mode_as_no_grad():
        function.apply = classmethod(apply)
        try:
            yield
        finally:
            function.apply = original


def _reentrant_checkpoint(run_function: Any, preserve_rng_state: bool, *inputs: Any) -> Any:
    """`torch.utils.checkpoint(..., use_reentrant=True)` as PyTorch differentiates it: the function
    itself, except that when none of its tensor inputs requires grad, the parameters inside get no
    gradient (PyTorch warns "None of the inputs have requires_grad=True"), so its outputs are
    detached."""
    out = run_function(*inputs)
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
        return out
    warnings.warn("A reentrant torch.utils.checkpoint (use_reentrant=True) has no input that requires "
                  "grad, so PyTorch gives the parameters inside it no gradient, and entk's kernel "
                  "leaves them out as well; pass use_reentrant=False to differentiate them.",
                  ExportSemanticsWarning, stacklevel=2)
    return torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, out)


@contextlib.contextmanager
def _inference_mode_as_no_grad() -> Iterator[None]:
    cls = torch.autograd.grad_mode.inference_mode
    enter, leave = cls.__dict__["__enter__"], cls.__dict__["__exit__"]

    def __enter__(self: Any) -> None:
        self._entk_context = torch.no_grad() if self.mode else contextlib.nullcontext()
        self._entk_context.__enter__()

    def __exit__(self: Any, *exc: Any) -> None:
        self._entk_context.__exit__(*exc)

    cls.__enter__, cls.__exit__ = __enter__, __exit__
    try:
        yield
    finally:
        cls.__enter__, cls.__exit__ = enter, leave


@contextlib.contextmanager
def _record_functions(root: torch.nn.Module, uses: list[FunctionUse]) -> Iterator[None]:
    function = torch.autograd.Function
    original = function.__dict__["apply"]

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        uses.append(FunctionUse(cls, _call_site(root)))
        return original.__get__(None, cls)(*args, **kwargs)

    function.apply = classmethod(apply)
    try:
        yield
    finally:
        function.apply = original


def _call_site(root: torch.nn.Module) -> str:
    """The submodule (path and type) whose code applied a Function, and the source line."""
    paths = {id(m): name for name, m in root.named_modules()}
    frame, line = sys._getframe(2), None
    while frame is not None:
        file = frame.f_code.co_filename
        if line is None and "/torch/" not in file and "autograd_semantics" not in file:
            line = f"{file.rsplit('/', 1)[-1]}:{frame.f_lineno} in {frame.f_code.co_name}"
        owner = frame.f_locals.get("self")
        if id(owner) in paths:
            path = paths[id(owner)] or "<root>"
            return f"module '{path}' ({type(owner).__name__})" + (f", {line}" if line else "")
        frame = frame.f_back
    return line or "unknown location"


def refuse_old_style_functions(module: torch.nn.Module, args: tuple) -> None:
    """Runs `module(*args)` once (no gradients) and raises `OldStyleAutogradFunctionError` if it
    applies an old-style custom Function, which bridge mode's torch.func transforms would refuse
    later, deep inside a JAX callback, without naming it."""
    uses: list[FunctionUse] = []
    flags = [(m, m.training) for m in module.modules()]
    module.eval()  # as bridge mode runs it: no dropout, no running-statistics updates
    try:
        with torch.no_grad(), _record_functions(module, uses):
            module(*args)
    finally:
        for m, flag in flags:
            m.training = flag
    by_class: dict[type, list[FunctionUse]] = {}
    for use in uses:
        if use.old_style:
            by_class.setdefault(use.function, []).append(use)
    if not by_class:
        return
    lines = []
    for found in by_class.values():
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        lines.append(f"  {found[0].qualified_name}: in {found[0].where}{more}")
    names = ", ".join(found[0].qualified_name for found in by_class.values())
    raise OldStyleAutogradFunctionError(
        f"{type(module).__name__} applies old-style custom torch.autograd.Function(s) ({names}: "
        f"`forward(ctx, ...)` without a `setup_context` staticmethod):\n" + "\n".join(lines) +
        "\nBridge mode (torch.func) cannot run old-style Functions. Use mode='export' (or "
        "mode='auto'), which keeps their backward, or rewrite them with `forward(*inputs)` plus "
        "`setup_context(ctx, inputs, output)` (and `generate_vmap_rule = True`)."
        + (" For torch.utils.checkpoint, pass use_reentrant=False (its non-reentrant form exports "
           "as plain ops)." if any("Checkpoint" in n for n in names.split(", ")) else ""))


# ---------------------------------------------------------------- the graph


def decomposition_table(keep: tuple = ()) -> dict:
    """The default core-ATen decompositions, minus `aten.detach` (a stop-gradient) and `keep`."""
    table = torch.export.default_decompositions()
    for op in (torch.ops.aten.detach.default,) + tuple(keep):
        table.pop(op, None)
    return table


def detach_no_grad_outputs(program: torch.export.ExportedProgram) -> None:
    """Puts an `aten.detach` on every output of a `wrap_with_set_grad_enabled(False, ...)` block,
    and turns `t.detach_()` into `aten.detach(t)` read by every later use of `t`.

    Runs on the exported (not yet decomposed) program, in place. A no-grad block that itself enables
    gradients again (`torch.enable_grad()` nested inside `torch.no_grad()`, not split apart by the
    export) is refused, since detaching its outputs would be wrong for the inner values.
    """
    _rewrite(program.graph_module)


def _is_grad_block(node: torch.fx.Node) -> bool:
    hop = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    return node.op == "call_function" and hop is not None and node.target is hop


def _rewrite(graph_module: torch.fx.GraphModule) -> None:
    graph = graph_module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.detach_.default:
            _detach_in_place(graph, node)
            changed = True
        elif _is_grad_block(node):
            enabled, body = node.args[0], getattr(graph_module, node.args[1].target)
            if enabled:
                _rewrite(body)
                continue
            _refuse_reenabled_gradients(node, body)
            for user in list(node.users):
                _detach_block_output(graph, node, user)
                changed = True
    if changed:
        graph.lint()
        graph_module.recompile()


def _detach_block_output(graph: torch.fx.Graph, block: torch.fx.Node, user: torch.fx.Node) -> None:
    if user.op != "call_function" or user.target is not operator.getitem:
        raise AutogradFunctionError(f"unexpected use {user.format_node()} of a torch.no_grad() "
                                    f"block (in {node_location(block)}); {BRIDGE_HINT}.")
    with graph.inserting_after(user):
        detached = graph.call_function(torch.ops.aten.detach.default, (user,))
    detached.meta.update(user.meta)
    user.replace_all_uses_with(detached, delete_user_cb=lambda u: u is not detached)


def _detach_in_place(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """`t.detach_()` → `d = aten.detach(t)`, and every use of `t` after it reads `d`."""
    source = node.args[0]
    position = {n: i for i, n in enumerate(graph.nodes)}
    with graph.inserting_before(node):
        detached = graph.call_function(torch.ops.aten.detach.default, (source,))
    detached.meta.update(node.meta)
    node.replace_all_uses_with(detached)
    graph.erase_node(node)
    later = position[node]
    source.replace_all_uses_with(
        detached, delete_user_cb=lambda u: u is not detached and position.get(u, -1) > later)


def _refuse_reenabled_gradients(block: torch.fx.Node, body: torch.fx.GraphModule) -> None:
    inner = [n for n in body.graph.nodes if _is_grad_block(n) and n.args[0]]
    if inner:
        raise AutogradFunctionError(
            f"a torch.no_grad() block (in {node_location(block)}) re-enables gradients inside (in "
            f"{node_location(inner[0])}), which export mode cannot express; move the enable_grad() "
            f"part out of the no_grad() block, or {BRIDGE_HINT}.")
