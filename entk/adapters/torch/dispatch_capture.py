"""Dispatch capture: the module's forward run once by PyTorch, the ATen ops it dispatches recorded.

`torch.export` is most of a PyTorch user's first kernel: importing `torch._dynamo` takes ~0.85 s
and tracing symbolically ~0.5 s more, whatever the model (MLP: 1.46 s of a 2.3 s first call). For
the ordinary model, the same core-ATen program comes out of running `forward` once on the example
inputs under a `TorchDispatchMode` that writes down each ATen call below autograd, with its real
arguments and results (a ResNet-18: ~0.05 s). `capture` builds that program, in the form export mode
translates (`program_cache.CachedProgram`: an FX graph, its signature, the input/output tree specs).

Shapes are static: the program serves inputs of exactly the example's shapes, and `ExportedModule`
captures again for others (the per-example batch of one, another x2 size), each in milliseconds.

Nothing about the model may be lost on the way, so `capture` records only what it can prove, and
*refuses* (raises `Refused`; export mode then runs torch.export, as before) everything else:

- control flow or values that depend on tensor data: an op that returns a Python scalar (`.item()`,
  `bool(t)`, `torch.equal`), ops whose output *shape* depends on data (`nonzero`, boolean-mask
  indexing, `unique`, ...), and reading a tensor's data behind PyTorch's back (`.numpy()`,
  `.tolist()`, `np.asarray(t)`, `data_ptr()`, storages);
- random ops, custom `torch.autograd.Function`s (export mode keeps their backward), calls into the
  autograd engine (`torch.autograd.grad` inside `forward`);
- tensors the recording did not see being made (`.data`, a tensor attribute that is not a parameter or
  buffer, a tensor kept in a Python list): only parameters, buffers, the inputs and literals made in
  `forward` (`torch.tensor(...)`, recorded as constants by value) may enter the graph;
- writes a pure program cannot express: an in-place op (or `out=`) on a parameter, buffer, input or a
  view of one (refused before it runs: the module and the inputs are never changed), and any later
  use of a tensor that an in-place op changed through another view. An in-place op on a tensor of its
  own is recorded as its functional form (`relu_` as `relu`), the tensor rebound to the result;
- an op with neither a translation (`aten.py`) nor a core-ATen decomposition; training mode (running
  statistics are written), tensors off the CPU, TorchScript modules.

The recording is then checked against PyTorch itself: every tensor the program reads must have
`requires_grad` exactly where the graph makes it depend on a parameter through differentiable ops,
so whatever PyTorch decided at the autograd level out of the recording's sight shows up as a refusal.
For the duration of the forward, `torch.autograd.Function.apply` and the autograd engine refuse in
every thread (as torch.export's own context patches `Function.apply`).

PyTorch's autograd semantics are kept as export mode keeps them: `aten.detach` stays in the graph (a
stop-gradient), and every floating-point result of an op that ran with gradients disabled
(`torch.no_grad()`, `torch.inference_mode()` blocks in `forward`) gets one, so JAX does not
differentiate what PyTorch does not.
"""

from __future__ import annotations

import contextlib
import operator
import os
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as torch_pytree
from torch.utils._python_dispatch import TorchDispatchMode

from entk.adapters.torch import aten
from entk.adapters.torch.graph_translation import RecordedTensor
from entk.adapters.torch.program_cache import CachedProgram

_ops = torch.ops.aten


class Refused(Exception):
    """The forward did something `capture` cannot record exactly (the reason is the message)."""


# Ops whose output shape, or Python result, depends on the values of their inputs (the ones returning
# a Python value are refused anyway; listed so the reason says "depends on tensor values").
_DATA_DEPENDENT_SHAPES = frozenset({
    "nonzero", "masked_select", "unique", "unique_dim", "unique_consecutive", "_unique", "_unique2",
    "unique_dim_consecutive", "repeat_interleave", "bincount", "histc", "histogram", "argwhere",
    "masked_scatter", "_local_scalar_dense", "item", "equal", "is_nonzero", "allclose",
})
# Ops that read only their input's shape: PyTorch's results do not require grad.
_SHAPE_FACTORIES = frozenset({"zeros_like", "ones_like", "full_like", "empty_like", "new_zeros",
                              "new_ones", "new_full", "new_empty", "new_empty_strided"})
# Literals `forward` makes (`torch.tensor([...])`): their argument is a fresh tensor, a constant.
_LITERALS = frozenset({_ops.lift_fresh.default, _ops.lift_fresh_copy.default})
# Tensor methods that read data outside the dispatcher (values would be baked in unseen).
_DATA_READS = frozenset({"numpy", "tolist", "__array__", "data_ptr", "untyped_storage", "storage",
                         "_typed_storage", "__dlpack__", "__reduce_ex__", "__deepcopy__"})
# Tensor methods that change gradients at the autograd level, out of the dispatcher's sight.
_GRADIENT_EDITS = frozenset({"detach_", "requires_grad_", "register_hook",
                             "register_post_accumulate_grad_hook", "__set__"})


def enabled() -> bool:
    """Whether export mode tries `capture` before torch.export: yes unless `ENTK_TORCH_CAPTURE=export`
    (always torch.export, e.g. to compare the two)."""
    return os.environ.get("ENTK_TORCH_CAPTURE", "dispatch").strip().lower() != "export"


def capture(module: torch.nn.Module, args: tuple, kwargs: dict) -> CachedProgram:
    """Runs `module(*args, **kwargs)` as it is (export mode puts it in eval mode first), gradients
    enabled, and returns the program of ATen ops it dispatched, for exactly these input shapes;
    raises `Refused` where the program would not be exact (see the module docstring). The module and
    the inputs are not changed."""
    leaves, in_spec = torch_pytree.tree_flatten((args, kwargs))
    state = [t for _, t in module.named_parameters()] + [t for _, t in module.named_buffers()]
    if any(not isinstance(t, torch.Tensor) or t.device.type != "cpu" for t in leaves + state):
        raise Refused("an input, parameter or buffer is not a CPU tensor")
    if any(isinstance(m, torch.jit.ScriptModule) for m in module.modules()):
        raise Refused("TorchScript runs its own interpreter (control flow the recording cannot see)")
    if len({id(t) for t in leaves}) != len(leaves):
        raise Refused("the same tensor object is passed as two inputs")
    recorder = _Recorder(module, leaves)
    with _no_autograd_calls(), torch.enable_grad(), recorder, _TensorMethodGuard():
        out = module(*args, **kwargs)
    out_leaves, out_spec = torch_pytree.tree_flatten(out)
    return recorder.program(out_leaves, in_spec, out_spec)


class _Recorder(TorchDispatchMode):
    """Records every ATen call of the forward into an FX graph (see `capture`)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # PyTorch's documented opt-out; else the first call imports torch._dynamo (~0.85 s)

    def __init__(self, module: torch.nn.Module, inputs: list[torch.Tensor]):
        super().__init__()
        from torch.export import graph_signature as gs

        self.graph = torch.fx.Graph()
        self.nodes: dict[int, torch.fx.Node] = {}  # id(tensor) -> the node holding its value
        self.grad: dict[torch.fx.Node, bool] = {}  # would PyTorch flag the value requires_grad
        self.keep: list[Any] = []  # every recorded tensor stays alive, so ids are not reused
        self.stale: set[int] = set()  # ids of tensors an in-place op changed through another view
        self.storages: dict[int, list[torch.Tensor]] = {}  # storage -> the recorded tensors on it
        self.fixed: set[int] = set()  # storages of parameters, buffers, inputs, constants
        self.specs: list[Any] = []
        self.constants: dict[str, torch.Tensor] = {}
        self.decompositions: dict | None = None
        self.last_placeholder: torch.fx.Node | None = None
        seen: set[int] = set()
        for name, p in module.named_parameters():
            self._placeholder(f"p_{name}", p, gs.InputKind.PARAMETER, name)
            seen.add(id(p))
        for name, b in module.named_buffers():
            if id(b) not in seen:
                seen.add(id(b))
                self._placeholder(f"b_{name}", b, gs.InputKind.BUFFER, name)
        self.module_state = {self._storage(t) for t in _module_tensors(module)}
        for i, x in enumerate(inputs):
            if id(x) in seen:
                raise Refused("an input is one of the module's own parameters or buffers")
            self._placeholder(f"x_{i}", x, gs.InputKind.USER_INPUT, None)

    # ------------------------------------------------------------ values

    @staticmethod
    def _storage(t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata

    def _placeholder(self, name: str, t: torch.Tensor, kind: Any, target: str | None) -> None:
        from torch.export import graph_signature as gs

        if self.last_placeholder is None:
            node = self.graph.placeholder(name)
        else:
            with self.graph.inserting_after(self.last_placeholder):
                node = self.graph.placeholder(name)
        self.last_placeholder = node
        node.meta["val"] = _recorded(t)
        self.grad[node] = t.requires_grad
        self.specs.append(gs.InputSpec(kind, gs.TensorArgument(name=node.name), target,
                                       persistent=True if kind == gs.InputKind.BUFFER else None))
        self._bind(t, node)
        self.fixed.add(self._storage(t))

    def _bind(self, t: torch.Tensor, node: torch.fx.Node) -> None:
        self.nodes[id(t)] = node
        self.stale.discard(id(t))
        self.keep.append(t)
        self.storages.setdefault(self._storage(t), []).append(t)

    def _constant(self, t: torch.Tensor) -> torch.fx.Node:
        from torch.export import graph_signature as gs

        name = f"c_lifted_tensor_{len(self.constants)}"
        self.constants[name] = t.detach().clone()
        self._placeholder(name, t, gs.InputKind.CONSTANT_TENSOR, name)
        return self.nodes[id(t)]

    def _arg(self, value: Any, literal: bool = False) -> Any:
        if isinstance(value, torch.Tensor):
            node = self.nodes.get(id(value))
            if node is None:
                if self._storage(value) in self.module_state:
                    raise Refused("forward uses a tensor the module holds outside its parameters "
                                  "and buffers (a tensor attribute, or a view of a weight made "
                                  "behind autograd's back)")
                if not literal:
                    raise Refused("forward uses a tensor its recording did not see being made "
                                  "(a tensor kept in a list or a global, or made by NumPy)")
                node = self._constant(value)
            if id(value) in self.stale:
                raise Refused("forward reads a tensor after an in-place op changed it through "
                              "another view")
            return node
        if isinstance(value, (list, tuple)):
            return type(value)(self._arg(v, literal) for v in value)
        if isinstance(value, dict):
            return {k: self._arg(v, literal) for k, v in value.items()}
        if isinstance(value, (int, float, bool, complex, str, type(None), torch.dtype, torch.device,
                              torch.layout, torch.memory_format)):
            return value
        raise Refused(f"an argument of type {type(value).__name__}")

    # ------------------------------------------------------------ dispatch

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        name = _name(func)
        if name in _DATA_DEPENDENT_SHAPES or _data_dependent_index(func, args):
            raise Refused(f"{func} depends on tensor values (data-dependent control flow or shapes)")
        if torch.Tag.nondeterministic_seeded in func.tags and _dropout(func, args, kwargs) != 0:
            raise Refused(f"{func} is random")
        if _updates_statistics(func, args, kwargs):
            raise Refused(f"{func} updates running statistics (batch norm in training mode)")
        if any(not _is_tensor_type(r.type) for r in func._schema.returns):
            raise Refused(f"{func} returns a Python value")
        if not func._schema.returns:  # assertions
            return func(*args, **kwargs)
        written = [a for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        target = self._in_place_target(func, written, args)
        op = func if target is None else _functional(func)
        if aten.lookup(op) is None and op not in _LITERALS:
            decomposition = self._decomposition(func)
            if decomposition is None:
                raise Refused(f"{func} has no translation and no decomposition")
            with self:
                return decomposition(*args, **kwargs)
        literal = func in _LITERALS
        node_args, node_kwargs = self._arg(args, literal), self._arg(kwargs, literal)
        out = func(*args, **kwargs)
        if literal:
            self._bind(out, node_args[0])
            return out
        node = self.graph.call_function(op, node_args, node_kwargs)
        # A tuple's items are checked at their getitem nodes: the ones never read may differ (eval
        # mode `native_batch_norm` returns empty statistics where its translation computes them).
        node.meta["val"] = _recorded(out) if isinstance(out, torch.Tensor) else None
        if target is not None:
            storage = self._storage(target)
            self.stale.update(id(t) for t in self.storages.get(storage, ()) if t is not target)
        flows = any(self.grad[n] for n in node.all_input_nodes) and func is not _ops.detach.default
        no_grad = not torch.is_grad_enabled()
        self.grad[node] = flows and not no_grad
        self._bind_outputs(out, node, detach=no_grad)
        if no_grad and any(r.alias_info is not None for r in func._schema.returns):
            # A view made under no_grad of a tensor that requires grad is flagged requires_grad by
            # PyTorch, and so is what is computed from it, but it is a leaf of its own: no gradient
            # reaches the base through it. Detached in the graph; flagged as PyTorch flags it.
            for t in _tensors(out):
                self.grad[self.nodes[id(t)]] = flows
        return out

    def _in_place_target(self, func: Any, written: list, args: tuple) -> Any:
        """The tensor an in-place op writes, None for a functional op; refuses other writes."""
        if not written:
            return None
        if len(written) > 1 or written[0].name != "self" or not args:
            raise Refused(f"{func} writes into an output argument")
        target = args[0]
        if self._storage(target) in self.fixed:
            raise Refused(f"{func} writes into a parameter, buffer or input (or a view of one)")
        if id(target) not in self.nodes:
            raise Refused(f"{func} writes into a tensor its recording did not see being made")
        if aten.lookup(_functional(func)) is None:
            raise Refused(f"{func} has no functional form with a translation")
        return target

    def _bind_outputs(self, out: Any, node: torch.fx.Node, detach: bool) -> None:
        if isinstance(out, torch.Tensor):
            self._bind(out, self._detached(out, node) if detach else node)
            return
        for i, t in enumerate(out):
            if isinstance(t, torch.Tensor):
                item = self.graph.call_function(operator.getitem, (node, i))
                item.meta["val"] = _recorded(t)
                self.grad[item] = self.grad[node]
                self._bind(t, self._detached(t, item) if detach else item)
            elif t is not None:
                raise Refused(f"{node.target} returns a {type(t).__name__} among its outputs")

    def _detached(self, t: torch.Tensor, node: torch.fx.Node) -> torch.fx.Node:
        if not (t.is_floating_point() or t.is_complex()):
            return node
        detached = self.graph.call_function(_ops.detach.default, (node,))
        detached.meta["val"] = _recorded(t)
        self.grad[detached] = False
        return detached

    def _decomposition(self, func: Any) -> Any:
        if self.decompositions is None:
            from entk.adapters.torch.autograd_semantics import decomposition_table

            self.decompositions = decomposition_table()
        return self.decompositions.get(func)

    # ------------------------------------------------------------ the program

    def check_gradients(self) -> None:
        """Refuses unless every recorded tensor the program reads requires grad in PyTorch exactly
        where the graph makes its value depend on a parameter through differentiable ops: whatever
        PyTorch decided at the autograd level, out of the recording's sight (`t.detach_()`, grad-mode
        tricks), shows up here as a disagreement. Factories of a tensor's shape (`zeros_like`, ...) are exempt: their
        translations have zero derivative, as PyTorch's outputs have none."""
        live = set(self.graph.nodes)  # after dead code elimination: unread results are exempt
        seen: set[int] = set()
        for t in self.keep:
            if id(t) in seen or self.nodes[id(t)] not in live:
                continue
            seen.add(id(t))
            node = self.nodes[id(t)]
            implied = self.grad[node] and (t.is_floating_point() or t.is_complex())
            if implied != t.requires_grad and not (
                    implied and node.op == "call_function" and _name(node.target) in _SHAPE_FACTORIES):
                where = node.target if node.op == "call_function" else node.name
                raise Refused(f"PyTorch {'does not differentiate' if implied else 'differentiates'} "
                              f"the result of {where}, unlike the recorded graph")

    def program(self, out_leaves: list, in_spec: Any, out_spec: Any) -> CachedProgram:
        from torch.export import graph_signature as gs

        outputs, results = [], []
        for leaf in out_leaves:
            if isinstance(leaf, torch.Tensor):
                node = self._arg(leaf)
                results.append(node)
                outputs.append(gs.OutputSpec(gs.OutputKind.USER_OUTPUT,
                                             gs.TensorArgument(name=node.name), None))
            elif isinstance(leaf, (int, float, bool, str, type(None))):
                outputs.append(gs.OutputSpec(gs.OutputKind.USER_OUTPUT,
                                             gs.ConstantArgument(name="", value=leaf), None))
            else:
                raise Refused(f"the module returns a {type(leaf).__name__}")
        self.graph.output(tuple(results))
        self.graph.eliminate_dead_code()
        self.check_gradients()
        return CachedProgram.of(self.graph, gs.ExportGraphSignature(self.specs, outputs), in_spec,
                                out_spec, dict(self.constants))


class _TensorMethodGuard(TorchFunctionMode):
    """Refuses tensor methods that read values outside the dispatcher (`.numpy()`, `.tolist()`,
    `.data`, ...: what they return would be baked into the program unseen) or change gradients at
    the autograd level (`detach_()`, tensor hooks, attribute assignment)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None):
        name = getattr(func, "__name__", "")
        if name in _DATA_READS or (name == "__get__" and getattr(getattr(func, "__self__", None),
                                                                  "__name__", "") == "data"):
            raise Refused(f"forward reads tensor data outside PyTorch's ops ({name})")
        if name in _GRADIENT_EDITS:
            raise Refused(f"forward changes gradients at the autograd level ({name})")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _no_autograd_calls() -> Iterator[None]:
    """Custom `Function.apply` and the autograd engine (`torch.autograd.grad` / `.backward()` inside
    forward) raise `Refused` for the duration."""
    function = torch.autograd.Function
    apply = function.__dict__["apply"]
    variable = torch.autograd.variable.Variable
    engine = variable._execution_engine

    def refuse(*_: Any, **__: Any) -> Any:
        raise Refused("forward applies a custom autograd Function or calls the autograd engine")

    class _Engine:
        def __getattr__(self, name: str) -> Any:
            return refuse

    function.apply = classmethod(refuse)
    variable._execution_engine = _Engine()
    try:
        yield
    finally:
        function.apply = apply
        variable._execution_engine = engine


# ---------------------------------------------------------------- helpers


def _module_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor the module holds: parameters, buffers and plain tensor attributes."""
    for m in module.modules():
        yield from (p for p in m._parameters.values() if p is not None)
        yield from (b for b in m._buffers.values() if b is not None)
        yield from (v for v in vars(m).values() if isinstance(v, torch.Tensor))


def _tensors(out: Any) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


def _is_tensor_type(t: Any) -> bool:
    return "Tensor" in str(t)  # Tensor, List[Tensor], Optional[Tensor]


def _dropout(func: Any, args: tuple, kwargs: dict) -> Any:
    """The dropout probability of an attention kernel (random only where it is not 0), else None."""
    if func is not _ops._scaled_dot_product_flash_attention_for_cpu.default:
        return None
    return args[3] if len(args) > 3 else kwargs.get("dropout_p", 0.0)


def _updates_statistics(func: Any, args: tuple, kwargs: dict) -> bool:
    """A batch norm with `training=True` and running statistics writes them, though
    `native_batch_norm`'s schema does not say so (`F.batch_norm(..., training=True)` in eval mode)."""
    names = [a.name for a in func._schema.arguments]
    if "training" not in names or "running_mean" not in names:
        return False
    bound = dict(zip(names, args)) | kwargs
    return bool(bound.get("training")) and bound.get("running_mean") is not None


def _data_dependent_index(func: Any, args: tuple) -> bool:
    """Indexing with a boolean mask (the result's size is the mask's count of True)."""
    if func not in (_ops.index.Tensor, _ops.index_put.default, _ops.index_put_.default):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _name(func: Any) -> str:
    """An op's name without namespace and overload: `aten.relu_.default` → `relu_`."""
    schema = getattr(func, "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else ""


def _functional(func: Any) -> Any:
    """`aten.relu_.default` → `aten.relu.default` (the same overload of the name without `_`)."""
    name = _name(func)
    packet = getattr(_ops, name[:-1], None) if name.endswith("_") else None
    overload = func._overloadname
    return getattr(packet, overload, None) if packet is not None else None


def _recorded(value: Any) -> Any:
    """What the translation checks of a value (`RecordedTensor`), as export records `meta["val"]`."""
    if isinstance(value, torch.Tensor):
        return RecordedTensor(value.dtype, tuple(value.shape), tuple(value.stride()),
                              value.storage_offset())
    return None


__all__ = ["Refused", "capture", "enabled"]
