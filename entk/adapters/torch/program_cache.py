"""Exported programs kept on disk, so that a new process converting the same module skips torch.export.

`torch.export` is most of a PyTorch user's first call: importing `torch._dynamo` alone takes about a
second, whatever the model. The core-ATen program it produces depends only on the module's code, its
structure and plain attributes, the dtypes / shapes / `requires_grad` of its tensors, the input
signature and the export settings; not on the weights' values. So export mode stores each program it
exports (as JSON: the FX graph, its signature, the input/output tree specs and the recorded shapes),
in `$ENTK_CACHE_DIR/torch-programs/`, under a SHA-256 of:

- the module's guard record (`guards.portable_snapshot`: the module tree, every plain attribute
  `forward` may read, the tensors' dtypes / shapes / devices / `requires_grad`, hooks), with functions
  and classes named and their code hashed instead of their addresses;
- the code of every class in the module tree (each class's methods, and the whole source file it is
  defined in), outside `torch` itself;
- the example input's structure, dtypes and shapes, the export settings (train/eval, batch axis), JAX's
  64-bit mode, the torch version and the source of entk's export code.

What no key can see (a helper function in another file that `forward` calls, a global) is checked
before a stored program is used: the program is run with PyTorch itself on the example input and
must reproduce the module's own output and its gradient with respect to every floating-point
parameter (for a random output cotangent) to within rounding; otherwise the module is exported
afresh and the entry replaced. A stored program is a speed-up only, never a change of answer.

Tensor constants the program lifted are stored by their attribute path where they are module
attributes (a plain tensor attribute, a Hugging Face non-persistent buffer) and read from the module
when the program is loaded, so they alias its storage as a fresh export's do; those `forward` makes
itself (`torch.tensor(...)`) are stored by value (up to `MAX_CONSTANT_ELEMENTS`). Not stored
(exported every time): programs with a constant that is module state without an attribute path (the
weights of a submodule kept in a plain list: a stored copy would miss in-place edits), custom
autograd Functions or other non-ATen ops, training-mode exports, and anything this module cannot
encode. `ENTK_PROGRAM_CACHE=0` turns the cache off; `ENTK_PROGRAM_CACHE=/some/dir` moves it
(`entk/adapters/program_store.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import os
import pathlib
from typing import Any, Callable

import jax
import torch
from torch.utils import _pytree as torch_pytree

from entk.adapters.program_store import directory
from entk.adapters.torch import guards
from entk.adapters.torch.graph_translation import RecordedTensor, SymbolicSize, input_dims
from entk.adapters.torch.program_check import check_inputs, reproduces

_VERSION = 2
MAX_CONSTANT_ELEMENTS = 1 << 16
"""Tensor constants `forward` makes itself (`torch.tensor(...)`, index tables) are stored by value up
to this size; constants that are module attributes are read from the module instead."""
# Python-level targets a core-ATen graph may call besides ATen ops (SymInt arithmetic, getitem):
# module → allowed name prefix. Nothing else is stored or read back (a stored file names no code).
_PY_TARGETS = {"_operator": "", "math": "", "torch": "sym_"}
_OP_NAMESPACES = ("aten", "prims")
# Files whose code decides what a stored program is: a change to them invalidates every entry.
_EXPORT_SOURCES = ("export.py", "autograd_semantics.py", "program_cache.py", "program_check.py",
                   "graph_translation.py")


class Uncacheable(Exception):
    """This program (or module) cannot be stored; it is exported every time."""


# ---------------------------------------------------------------- the key


def fingerprint(module: torch.nn.Module, args: tuple, kwargs: dict, *, training: bool,
                batch_axis: int | None) -> str | None:
    """The key of `module`'s exported program for inputs like `(args, kwargs)`; None if not cacheable."""
    if training:
        return None  # train-mode BatchNorm updates running statistics: no verification run
    leaves, spec = torch_pytree.tree_flatten((args, kwargs))
    if not all(isinstance(t, torch.Tensor) for t in leaves):
        return None
    parts = [f"v{_VERSION}", torch.__version__, str(bool(jax.config.x64_enabled)),
             f"batch_axis={batch_axis}", str(spec),
             repr([(t.dtype, tuple(t.shape), str(t.device)) for t in leaves]),
             _export_code(), _class_code(module), repr(guards.portable_snapshot(module))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def _export_code() -> str:
    here = pathlib.Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in _EXPORT_SOURCES)).hexdigest()


def _class_code(module: torch.nn.Module) -> str:
    """A hash of the code of every class in the module tree (and their bases), outside torch."""
    digest = hashlib.sha256()
    classes = {cls for m in module.modules() for cls in type(m).__mro__}
    for cls in sorted(classes, key=lambda c: (c.__module__, c.__qualname__)):
        if cls is object or cls.__module__.split(".")[0] == "torch":
            continue
        digest.update(f"{cls.__module__}.{cls.__qualname__}".encode())
        for name, member in sorted(vars(cls).items(), key=lambda kv: kv[0]):
            digest.update(name.encode() + guards.code_hash(member).encode())
        try:
            source = inspect.getsourcefile(cls)
        except (TypeError, OSError):
            source = None
        if source is not None:
            digest.update(_file_hash(source).encode())
    return digest.hexdigest()


def _file_hash(path: str) -> str:
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"
    return _file_hash_at(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _file_hash_at(path: str, mtime_ns: int, size: int) -> str:
    try:
        return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


# ---------------------------------------------------------------- encoding


def encode(program: Any, module: torch.nn.Module) -> dict:
    """`module`'s exported program as JSON-ready data (raises `Uncacheable` for what cannot be stored)."""
    from torch.export.graph_signature import ConstantArgument, TensorArgument

    constants = {}
    held = None  # storages of every tensor the module holds, registered or not (a list's weights)
    for name, value in program.constants.items():
        if not isinstance(value, torch.Tensor):
            raise Uncacheable(f"constant {name!r} is not a tensor")
        record = {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape)}
        if _attribute(module, name) is not value:
            if held is None:
                reached: list = []
                guards.snapshot(module, reached)
                held = {_storage(t) for t in reached if isinstance(t, torch.Tensor)}
            if _storage(value) in held:  # e.g. a weight in a plain list: must alias the module
                raise Uncacheable(f"constant {name!r} is module state with no attribute path")
            if value.numel() > MAX_CONSTANT_ELEMENTS or value.is_complex():
                raise Uncacheable(f"constant {name!r} is large and not a tensor attribute")
            record["values"] = value.detach().cpu().reshape(-1).tolist()  # made by forward's code
        constants[name] = record
    nodes = []
    graph = program.graph_module.graph
    for node in graph.nodes:
        if node.op not in ("placeholder", "call_function", "output"):
            raise Uncacheable(f"a {node.op} node")
        record = {"op": node.op, "name": node.name, "target": _encode_target(node),
                  "args": _encode_value(node.args), "kwargs": _encode_value(node.kwargs),
                  "val": _encode_meta(node.meta.get("val"), program, node.op == "placeholder")}
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path, kind = list(stack.values())[-1]
            kind = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
            record["module"] = [str(path), kind]
        if node.meta.get("stack_trace"):
            record["stack_trace"] = node.meta["stack_trace"]
        nodes.append(record)
    for node in graph.nodes:
        if node.op == "call_function" and "as_strided" in str(node.target):
            val = node.args[0].meta.get("val") if node.args else None
            if val is not None and not (all(isinstance(s, int) for s in val.stride())
                                        and isinstance(val.storage_offset(), int)):
                raise Uncacheable("as_strided of a tensor with a symbolic layout")
    signature = program.graph_signature
    inputs = [[spec.kind.name, spec.arg.name, spec.target] for spec in signature.input_specs]
    outputs = []
    for spec in signature.output_specs:
        if isinstance(spec.arg, ConstantArgument):
            outputs.append([spec.kind.name, "constant", _encode_value(spec.arg.value), spec.target])
        elif isinstance(spec.arg, TensorArgument):
            outputs.append([spec.kind.name, "tensor", spec.arg.name, spec.target])
        else:
            raise Uncacheable(f"a {type(spec.arg).__name__} output")
    try:
        in_spec = torch_pytree.treespec_dumps(program.call_spec.in_spec)
        out_spec = torch_pytree.treespec_dumps(program.call_spec.out_spec)
    except Exception as e:  # noqa: BLE001 - a container type torch cannot serialize
        raise Uncacheable(f"the input/output structure: {e}") from None
    return {"version": _VERSION, "nodes": nodes, "inputs": inputs, "outputs": outputs,
            "constants": constants, "in_spec": in_spec, "out_spec": out_spec}


def _storage(t: torch.Tensor) -> Any:
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # no storage (a functorch wrapper)
        return ("id", id(t))


def _attribute(module: torch.nn.Module, path: str) -> Any:
    """The tensor at attribute path `path` of `module` (e.g. `embeddings.position_ids`), or None."""
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


def _encode_target(node: Any) -> Any:
    target = node.target
    if node.op != "call_function":
        return target
    if isinstance(target, torch._ops.OpOverload):
        namespace = target.namespace
        if namespace not in _OP_NAMESPACES:
            raise Uncacheable(f"op {target} (not ATen)")
        packet = target.overloadpacket
        return ["op", namespace, packet._qualified_op_name.split("::")[1], target._overloadname]
    module, name = getattr(target, "__module__", None), getattr(target, "__name__", "")
    if _resolve_python(module, name) is target:
        return ["py", module, name]
    raise Uncacheable(f"call target {target!r}")


def _resolve_python(module: Any, name: str) -> Any:
    """`module.name` if it is an allowed Python-level target (`_PY_TARGETS`), else None."""
    prefix = _PY_TARGETS.get(module)
    if prefix is None or not name.startswith(prefix) or "." in name:
        return None
    return getattr(importlib.import_module(module), name, None)


_ENUMS = {torch.layout: "layout", torch.memory_format: "memory_format"}


def _encode_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if type(value) is int else _refuse(value)
    if isinstance(value, float):
        return {"float": repr(value)} if value != value or value in (float("inf"), float("-inf")) \
            else value
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [_encode_value(v) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode_value(v) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if type(value) in _ENUMS:
        return {_ENUMS[type(value)]: str(value).removeprefix("torch.")}
    return _refuse(value)


def _refuse(value: Any) -> Any:
    raise Uncacheable(f"an argument of type {type(value).__name__}")


def _encode_meta(val: Any, program: Any, placeholder: bool) -> Any:
    """A node's recorded value: dtype, shape (symbolic sizes as text, inputs' with their bounds),
    strides where they are all static."""
    if isinstance(val, torch.Tensor):
        if placeholder:
            shape = [list(d[:4] if d[0] == "sym" else d[:2]) if isinstance(d, tuple) else d
                     for d in input_dims(val.shape, program.range_constraints)]
        else:
            shape = [int(d) if isinstance(d, int) else ["expr", str(d)] for d in val.shape]
        strides = list(val.stride()) if all(isinstance(s, int) for s in val.stride()) else None
        offset = val.storage_offset()
        return {"dtype": str(val.dtype).removeprefix("torch."), "shape": shape, "strides": strides,
                "offset": offset if isinstance(offset, int) else 0}
    if isinstance(val, (list, tuple)):
        return {"list": [_encode_meta(v, program, False) for v in val]}
    return None  # SymInts, Python scalars: nothing the translation checks


# ---------------------------------------------------------------- decoding


@dataclasses.dataclass
class CachedProgram:
    """What export mode reads of a `torch.export.ExportedProgram`, rebuilt from a stored one."""

    graph_module: Any  # has .graph, a torch.fx.Graph of core-ATen calls
    graph_signature: Any  # torch.export.graph_signature.ExportGraphSignature
    call_spec: Any  # has .in_spec, .out_spec (torch TreeSpecs)
    constants: dict = dataclasses.field(default_factory=dict)
    range_constraints: dict = dataclasses.field(default_factory=dict)  # bounds live in input_dims

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph

    @classmethod
    def of(cls, graph: torch.fx.Graph, signature: Any, in_spec: Any, out_spec: Any,
           constants: dict) -> "CachedProgram":
        """A program from its graph, `ExportGraphSignature`, input/output TreeSpecs and constants."""
        return cls(_Holder(graph), signature, _CallSpec(in_spec, out_spec), constants)


@dataclasses.dataclass
class _Holder:
    graph: torch.fx.Graph


@dataclasses.dataclass
class _CallSpec:
    in_spec: Any
    out_spec: Any


def decode(data: dict, module: torch.nn.Module) -> CachedProgram:
    """The program `encode` stored for `module` (its constants read from the module now)."""
    from torch.export import graph_signature as gs

    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for record in data["nodes"]:
        target = _decode_target(record["target"]) if record["op"] == "call_function" else record["target"]
        args = _decode_value(record["args"], env)
        kwargs = _decode_value(record["kwargs"], env)
        node = graph.create_node(record["op"], target, args, kwargs, name=record["name"])
        node.meta["val"] = _decode_meta(record["val"])
        if "module" in record:
            node.meta["nn_module_stack"] = {"stored": tuple(record["module"])}
        if "stack_trace" in record:
            node.meta["stack_trace"] = record["stack_trace"]
        env[record["name"]] = node  # FX may rename (e.g. `input` → `input_1`)
    inputs = [gs.InputSpec(kind=gs.InputKind[kind], arg=gs.TensorArgument(name=env[name].name),
                           target=target,
                           persistent=True if kind == "BUFFER" else None)
              for kind, name, target in data["inputs"]]
    outputs = []
    for kind, arg_kind, value, target in data["outputs"]:
        arg = (gs.ConstantArgument(name="", value=_decode_value(value, env)) if arg_kind == "constant"
               else gs.TensorArgument(name=env[value].name))
        outputs.append(gs.OutputSpec(kind=gs.OutputKind[kind], arg=arg, target=target))
    constants = {}
    for name, record in data["constants"].items():
        dtype = getattr(torch, record["dtype"])
        if "values" in record:
            constants[name] = torch.tensor(record["values"], dtype=dtype).reshape(record["shape"])
            continue
        value = _attribute(module, name)
        if value is None or value.dtype != dtype or list(value.shape) != record["shape"]:
            raise ValueError(f"constant {name!r} is not the module's tensor it was")
        constants[name] = value
    return CachedProgram.of(graph, gs.ExportGraphSignature(inputs, outputs),
                            torch_pytree.treespec_loads(data["in_spec"]),
                            torch_pytree.treespec_loads(data["out_spec"]), constants)


def _decode_target(record: list) -> Any:
    kind, *rest = record
    if kind == "op":
        namespace, name, overload = rest
        if namespace not in _OP_NAMESPACES:
            raise ValueError(f"stored op in namespace {namespace!r}")
        return getattr(getattr(getattr(torch.ops, namespace), name), overload)
    module, name = rest
    target = _resolve_python(module, name)
    if target is None:
        raise ValueError(f"stored call target {module}.{name} is not allowed or does not exist")
    return target


def _decode_value(value: Any, env: dict) -> Any:
    if not isinstance(value, dict):
        return value
    (kind, inner), = value.items()
    if kind == "node":
        return env[inner]
    if kind == "list":
        return [_decode_value(v, env) for v in inner]
    if kind == "tuple":
        return tuple(_decode_value(v, env) for v in inner)
    if kind == "dict":
        return {k: _decode_value(v, env) for k, v in inner.items()}
    if kind == "float":
        return float(inner)
    if kind == "dtype":
        return getattr(torch, inner)
    if kind == "device":
        return torch.device(inner)
    if kind in ("layout", "memory_format"):
        return getattr(torch, inner)
    raise ValueError(f"unknown stored value kind {kind!r}")


def _decode_meta(val: Any) -> Any:
    if val is None:
        return None
    if "list" in val:
        return [_decode_meta(v) for v in val["list"]]
    shape = tuple(d if isinstance(d, int) else SymbolicSize(tuple(d)) for d in val["shape"])
    strides = None if val["strides"] is None else tuple(val["strides"])
    return RecordedTensor(getattr(torch, val["dtype"]), shape, strides, val["offset"])


# ---------------------------------------------------------------- load / store


def load(key: str | None, module: torch.nn.Module, args: tuple, kwargs: dict,
         run_module: Callable[..., Any], batch_axis: int | None = None) -> CachedProgram | None:
    """The stored program for `key`, if there is one and it reproduces the module on `(args,
    kwargs)` (on the examples `check_inputs` picks along `batch_axis`), else None."""
    where = directory()
    if key is None or where is None:
        return None
    path = where / f"{key}.json"
    try:
        data = json.loads(path.read_text())
        if data.get("version") != _VERSION:
            return None
        program = decode(data, module)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError):
        return None
    if not all(reproduces(program, module, a, k, run_module)
               for a, k in check_inputs(program, args, kwargs, batch_axis)):
        return None
    try:
        os.utime(path)  # recently used: evicted last (see `store`)
    except OSError:
        pass
    return program


def store(key: str | None, program: Any, module: torch.nn.Module) -> bool:
    """Stores `module`'s `program` under `key`; False (nothing written) if it cannot be stored."""
    where = directory()
    if key is None or where is None:
        return False
    try:
        text = json.dumps(encode(program, module))
    except Exception:  # noqa: BLE001 - Uncacheable, or a program shape this encoder does not know
        return False
    try:
        where.mkdir(parents=True, exist_ok=True)
        tmp = where / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, where / f"{key}.json")
    except OSError:
        return False
    _evict(where)
    return True


MAX_BYTES = 512 * 2**20
"""The directory's size limit: past it, the least recently used programs are deleted (a ResNet-18's
program is ~0.3 MB, a BERT-base's ~1 MB)."""


def _evict(where: pathlib.Path) -> None:
    try:
        files = [(f.stat().st_mtime, f.stat().st_size, f) for f in where.glob("*.json")]
    except OSError:
        return
    total = sum(size for _, size, _ in files)
    for _, size, f in sorted(files, key=lambda t: t[0]):
        if total <= MAX_BYTES:
            break
        try:
            f.unlink()
            total -= size
        except OSError:
            pass


__all__ = ["CachedProgram", "Uncacheable", "decode", "directory", "encode", "fingerprint", "load",
           "store"]
