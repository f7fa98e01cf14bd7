"""Runs an exported core-ATen graph with JAX: the interpreter half of export mode.

`GraphTranslation` walks a `torch.export` program's FX graph node by node and calls the JAX
translation registered for each ATen op (`aten.py` and the `aten_*.py` modules), so the traced
computation holds only JAX primitives. Around it: the dtype and tensor conversions the walk needs,
the errors it raises (ops without a translation, a translation failing on its arguments), each
naming the op and where in the model it came from.

Exporting the module, mapping placeholders to `params` / `state` / inputs, and input / output
structure live in `export.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import traceback
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch

from entk.adapters.torch import aten


# ---------------------------------------------------------------- errors


class UnsupportedOpsError(NotImplementedError):
    """The exported graph contains ATen ops with no JAX translation (all of them are listed).

    `ops`: the op names; `where`: for each op, the places in the model it occurs (`node_location`).
    """

    def __init__(self, message: str, ops: Sequence[str],
                 where: dict[str, Sequence[str]] | None = None):
        super().__init__(message)
        self.ops = tuple(ops)
        self.where = {op: tuple(w) for op, w in (where or {}).items()}


class TranslationError(RuntimeError):
    """An op's translation failed on the arguments the graph gave it."""


# What to do about a model export mode cannot handle; ends every export-mode error message.
BRIDGE_HINT = ("use entk.from_torch(..., mode='bridge') (the model stays in PyTorch and is called "
               "through torch.func: Jacobian contraction and NTK-vector products work, structured "
               "derivatives do not)")


def node_location(node: torch.fx.Node) -> str:
    """Where a graph node came from: the innermost module path and type, and the source line."""
    parts = []
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, kind = list(stack.values())[-1]
        path = re.sub(r"^L\['self'\]\.?", "", str(path)) or "<root>"
        kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        parts.append(f"module '{path}' ({kind.rsplit('.', 1)[-1]})")
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', trace)
    if frames:
        user = [f for f in frames if "/torch/" not in f[0]] or frames
        file, line, fn = user[-1]
        parts.append(f"{file.rsplit('/', 1)[-1]}:{line} in {fn}")
    return ", ".join(parts) or "unknown location"


# ---------------------------------------------------------------- dtype conversion


@functools.lru_cache(maxsize=None)
def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy / JAX dtype of a torch dtype."""
    mapping = {torch.bfloat16: jnp.bfloat16, torch.bool: np.bool_}
    if dtype in mapping:
        return np.dtype(mapping[dtype])
    return np.dtype(torch.empty((), dtype=dtype).numpy().dtype)


def tensor_to_jax(t: torch.Tensor, *, copy: bool) -> jax.Array:
    """A torch tensor as a JAX array.

    `copy=False` shares memory through DLPack where possible (JAX then sees later in-place changes
    of the tensor; fine for inputs). `copy=True` never aliases (used for parameters and buffers,
    which the user may keep training in place). 64-bit tensors go through NumPy when JAX's x64
    mode is off, so they are canonicalized to 32 bits as JAX does everywhere else.
    """
    t = t.detach().resolve_conj().resolve_neg()
    wide = t.dtype in (torch.float64, torch.int64, torch.complex128)
    if not (wide and not jax.config.jax_enable_x64):
        try:
            out = jax.dlpack.from_dlpack(t.contiguous())
            return jnp.array(out, copy=True) if copy else out
        except Exception:  # noqa: BLE001 - a device or dtype JAX cannot import: go through host
            pass
    if t.dtype == torch.bfloat16:
        return jnp.asarray(t.float().cpu().numpy(), dtype=jnp.bfloat16)
    array = t.cpu().numpy()
    return jnp.array(array, copy=True) if copy else jnp.asarray(array)


# ---------------------------------------------------------------- recorded shapes


@dataclasses.dataclass(frozen=True)
class SymbolicSize:
    """A size the export left symbolic, as stored by `program_cache.py`: `dim` is `input_dims`'s
    form (`("sym", name, lower, upper)` for an input's own size, `("expr", text)` otherwise)."""

    dim: tuple


@dataclasses.dataclass(frozen=True)
class RecordedTensor:
    """What PyTorch recorded of a node's tensor value (`node.meta["val"]`), for a stored program:
    dtype, shape (ints and `SymbolicSize`s), strides (None where some are symbolic), storage offset."""

    dtype: torch.dtype
    shape: tuple
    strides: tuple | None
    offset: int

    def stride(self) -> tuple | None:
        return self.strides

    def storage_offset(self) -> int:
        return self.offset


def input_dims(shape: Sequence[Any], range_constraints: dict) -> tuple:
    """An input's recorded shape with each size as an int (static), `("sym", name, lower, upper)`
    (a dynamic size of its own; bounds are ints, None for unbounded) or `("expr", text[, sympy
    expression])` (a size derived from others, e.g. `2*s0`; stored programs keep the text only),
    from `torch.SymInt`s or `SymbolicSize`s."""
    dims = []
    for d in shape:
        if isinstance(d, int):
            dims.append(int(d))
        elif isinstance(d, SymbolicSize):
            dims.append(d.dim)
        else:
            expr = d.node.expr
            if getattr(expr, "is_Symbol", False):
                bounds = range_constraints.get(expr)
                lower, upper = (None, None) if bounds is None else (_int_or_none(bounds.lower),
                                                                   _int_or_none(bounds.upper))
                dims.append(("sym", str(expr), lower, upper))
            else:
                dims.append(("expr", str(expr), expr))
    return tuple(dims)


def _int_or_none(bound: Any) -> int | None:
    try:
        value = int(bound)
    except (TypeError, ValueError, AttributeError):
        return None
    return value if abs(value) < 2 ** 62 else None


# ---------------------------------------------------------------- the graph interpreter


class GraphTranslation:
    """Runs an exported core-ATen graph with JAX: one registered translation per node.

    `__call__(slots_values)` takes `{placeholder name: value}` and returns the flat list of user
    outputs. Python-level work (dispatch, shape arithmetic) happens once per JAX trace; the traced
    computation contains only the JAX primitives the translations emit.
    """

    def __init__(self, program: torch.export.ExportedProgram):
        self.program = program
        graph = program.graph_module.graph
        self.nodes = list(graph.nodes)
        self.fns: dict[str, Callable[..., Any]] = {}
        self.missing: list[tuple[str, str]] = []
        for node in self.nodes:
            if node.op == "call_function":
                fn = aten.lookup(node.target)
                if fn is None:
                    self.missing.append((aten.op_name(node.target), node_location(node)))
                else:
                    self.fns[node.name] = fn
            elif node.op in ("call_module", "call_method"):
                self.missing.append((f"{node.op} {node.target}", node_location(node)))
        # Free every intermediate right after its last use (matters when running eagerly).
        last_use: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for used in node.all_input_nodes:
                last_use[used.name] = i
        self.release: list[list[str]] = [[] for _ in self.nodes]
        for name, i in last_use.items():
            self.release[i].append(name)
        # User outputs, in the order of the program's output TreeSpec: a node, or a constant.
        self.outputs: list[tuple[str, Any]] = []
        for spec in program.graph_signature.output_specs:
            if spec.kind.name != "USER_OUTPUT":
                continue  # buffer mutations (train-mode running statistics) are not outputs
            if type(spec.arg).__name__ == "ConstantArgument":
                self.outputs.append(("constant", spec.arg.value))
            else:
                self.outputs.append(("node", spec.arg.name))

    def check_supported(self, module_name: str) -> None:
        """Raises `UnsupportedOpsError` listing every op without a translation, with locations."""
        if not self.missing:
            return
        by_op: dict[str, list[str]] = {}
        for op, where in self.missing:
            by_op.setdefault(op, []).append(where)
        lines = []
        for op, wheres in by_op.items():
            more = f" (and {len(wheres) - 1} more)" if len(wheres) > 1 else ""
            lines.append(f"  {op}: in {wheres[0]}{more}")
        raise UnsupportedOpsError(
            f"Export mode cannot translate {module_name}: {len(by_op)} ATen op(s) have no JAX "
            f"translation:\n" + "\n".join(lines) + f"\nTo use this model, {BRIDGE_HINT}; or "
            f"register a translation with entk.adapters.torch.aten.register.", list(by_op), by_op)

    def __call__(self, inputs: dict[str, Any]) -> list[Any]:
        env: dict[str, Any] = {}
        for i, node in enumerate(self.nodes):
            if node.op == "placeholder":
                env[node.name] = inputs[node.name]
            elif node.op == "call_function":
                env[node.name] = self._run(node, env)
            elif node.op == "get_attr":
                env[node.name] = _constant(getattr(self.program.graph_module, node.target))
            elif node.op == "output":
                return [env[v] if kind == "node" else v for kind, v in self.outputs]
            for name in self.release[i]:
                env.pop(name, None)
        raise TranslationError("the exported graph has no output node")

    def _run(self, node: torch.fx.Node, env: dict[str, Any]) -> Any:
        name = aten.op_name(node.target)
        try:
            args = _materialize(node.args, env, node)
            kwargs = _materialize(node.kwargs, env, node)
            fn = self.fns[node.name]
            if getattr(fn, "wants_node", False):  # reads the strides PyTorch recorded
                kwargs = {**kwargs, "node": node}
            out = fn(*args, **kwargs)
            return _match_meta(out, node.meta.get("val"))
        except (TranslationError, aten.ShapeAssertionError):
            raise
        except Exception as e:  # noqa: BLE001 - add the op and its place in the model
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            raise TranslationError(f"Translating {name} (in {node_location(node)}) failed: "
                                   f"{detail}\nIf this op is used in a way export mode does not "
                                   f"support, {BRIDGE_HINT}.") from e


def _constant(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tensor_to_jax(value, copy=True)
    return value


def _materialize(value: Any, env: dict[str, Any], node: torch.fx.Node) -> Any:
    if isinstance(value, torch.fx.Node):
        out = env[value.name]
        if isinstance(out, aten.Unavailable):
            raise TranslationError(
                f"{aten.op_name(node.target)} (in {node_location(node)}) uses {out.what}, which "
                f"export mode does not compute; {BRIDGE_HINT}.")
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(_materialize(v, env, node) for v in value)
    if isinstance(value, dict):
        return {k: _materialize(v, env, node) for k, v in value.items()}
    if isinstance(value, torch.dtype):  # as JAX would hold it (64-bit types need x64 mode)
        return np.dtype(jax.dtypes.canonicalize_dtype(numpy_dtype(value)))
    if isinstance(value, torch.Tensor):
        return tensor_to_jax(value, copy=True)
    return value


def _match_meta(out: Any, val: Any) -> Any:
    """Casts a translated result to the dtype PyTorch recorded and checks its static shape."""
    if isinstance(val, (torch.Tensor, RecordedTensor)):
        if isinstance(out, (bool, int, float, np.number, np.bool_)):
            out = jnp.asarray(out)
        if not hasattr(out, "dtype"):
            return out
        want = jax.dtypes.canonicalize_dtype(numpy_dtype(val.dtype))
        if out.dtype != want:
            out = out.astype(want)
        shape = tuple(val.shape)
        if len(shape) != out.ndim or any(isinstance(s, int) and s != o
                                         for s, o in zip(shape, out.shape)):
            raise TranslationError(f"translation produced shape {tuple(out.shape)}, but PyTorch "
                                   f"recorded {tuple(str(s) for s in shape)} (a translation bug; "
                                   f"please report it)")
        return out
    if isinstance(val, (list, tuple)) and isinstance(out, (list, tuple)) and len(val) == len(out):
        return type(out)(_match_meta(o, v) for o, v in zip(out, val))
    return out
