"""Guards: everything a conversion of a torch module baked in, so that a change converts it again.

entk reads a module's parameter and buffer *values* at every call (`entk.adapters.torch`), but an
exported graph (and a bridged model's output structure) also bakes in, once:

- the dtypes, shapes and devices of parameters and buffers, and which parameters are differentiated
  (`requires_grad`);
- the module tree (which submodule sits where) and its hooks;
- every plain attribute `forward` may read, of every submodule (`self.scale = 3.0`, `self.eps`, a
  config object's fields, a list of sizes), since torch.export evaluates Python at export time;
- tensors held outside the registered ones (a plain tensor attribute, the weights of submodules kept
  in a Python list), which torch.export lifts as constants: their storage is read at every call
  (the constants alias it), so replacing one (`t.data = ...`) is what must be noticed;
- `torch.get_default_dtype()` (tensors created inside `forward`).

`snapshot(module)` records all of that as one flat tuple of plain values and identities; two
snapshots compare equal exactly when none of it changed (torch.compile's guards, checked in Python).
It walks each submodule's `__dict__` once, so its cost grows with the number of attributes: about
0.3 ms for a ResNet-18 (`benchmarks/bench_torch_guards.py`).

What is not guarded: the insides of functions (a closure), what weak references point to (caches),
an RNN's flat weight list (a cache `forward` rebuilds from its parameters), objects nested deeper
than `_MAX_DEPTH` below a module attribute, and global state other than the default dtype. A
module's `training` flag is not guarded either: every conversion sets train/eval mode itself.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import marshal
import types
import weakref
from typing import Any

import numpy as np
import torch

__all__ = ["code_hash", "portable_snapshot", "snapshot"]

# Plain values recorded as themselves (compared by ==).
_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size,
          enum.Enum)
_FAST_ATOMS = frozenset({type(None), bool, int, float, str, torch.dtype, torch.device})
_CONTAINERS = frozenset({dict, collections.OrderedDict, list, tuple, set})
# Module attributes handled separately (_parameters, _buffers, _modules) or forced by every
# conversion (`training`: export and bridge both set train/eval mode themselves).
_MODULE_SKIP = frozenset({"_parameters", "_buffers", "_modules", "training"})
# Caches a module rebuilds from its registered tensors in `forward`, which torch.func calls leave
# pointing at their own temporaries: an RNN's flat weight list (`RNNBase._update_flat_weights`).
_DERIVED = ((torch.nn.RNNBase, frozenset({"_flat_weights", "_flat_weight_refs"})),)
_SKIP_BY_TYPE: dict[type, frozenset] = {}
# Recorded by identity only (as are all callables: functions, classes, methods).
_OPAQUE = (types.ModuleType,)
_MAX_DEPTH = 4  # nesting of containers / plain objects below a module attribute
_SMALL_ARRAY = 4096  # NumPy arrays up to this many bytes are guarded by value, larger by identity


def snapshot(module: torch.nn.Module, keep: list | None = None) -> tuple:
    """A comparable record of what a conversion of `module` depends on.

    Equal snapshots (`==`) mean the module can be run with the same exported graph, reading its
    current parameter and buffer values; any difference means it must be converted again.

    Objects are recorded by `id()`. Pass `keep` (a list) for the snapshot that is stored: every
    object recorded by identity is appended to it, and holding them keeps their ids from being
    reused by new objects (a replaced attribute freed, a new one allocated at the same address).
    The snapshots compared with the stored one need no `keep`.
    """
    walk = _Walk(keep)
    walk.module(module)
    return tuple(walk.out)


def portable_snapshot(module: torch.nn.Module) -> tuple:
    """`snapshot(module)` as it would read in another process: objects recorded by identity become
    their order of first appearance, functions and classes their qualified names and code hashes;
    addresses (`data_ptr`, NumPy buffers) are left out. Its `repr` keys stored programs on disk
    (`program_cache.py`): equal records mean the same module tree, attributes, tensor metadata and
    hooks, as far as a snapshot sees."""
    walk = _Walk(None, portable=True)
    walk.module(module)
    return tuple(walk.out)


def code_hash(obj: Any) -> str:
    """A hash of the code behind a function, method, property or static/class method ("" if none)."""
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        return "".join(code_hash(f) for f in (obj.fget, obj.fset, obj.fdel) if f is not None)
    obj = getattr(obj, "__func__", obj)  # bound methods
    code = getattr(obj, "__code__", None)
    if code is None:
        return ""
    try:
        return hashlib.sha256(marshal.dumps(code)).hexdigest()[:16]
    except ValueError:  # unmarshallable constants
        return hashlib.sha256(repr(code.co_code).encode()).hexdigest()[:16]


def _portable_token(obj: Any, ordinal: int) -> tuple:
    if isinstance(obj, type):
        return ("class", obj.__module__, obj.__qualname__)
    if isinstance(obj, types.ModuleType):
        return ("module", obj.__name__)
    if callable(obj) and hasattr(getattr(obj, "__func__", obj), "__qualname__"):
        fn = getattr(obj, "__func__", obj)
        return ("fn", getattr(fn, "__module__", None), fn.__qualname__, code_hash(obj), ordinal)
    return ("obj", type(obj).__module__, type(obj).__qualname__, ordinal)


class _Walk:
    """One snapshot being taken: the record so far, the objects seen (shared ones are recorded
    once, cycles end), and the objects to keep alive (or None)."""

    def __init__(self, keep: list | None, portable: bool = False):
        self.out: list = [torch.get_default_dtype()]
        self.seen: set = set()
        self.keep = keep
        self.portable = portable
        self.tokens: dict[int, tuple] = {}  # portable mode: id -> token
        self.held: list = []  # portable mode: the objects tokenized (their ids stay unique)

    def identity(self, obj: Any) -> Any:
        if self.portable:
            token = self.tokens.get(id(obj))
            if token is None:
                token = self.tokens[id(obj)] = _portable_token(obj, len(self.tokens))
                self.held.append(obj)
            return token
        if self.keep is not None:
            self.keep.append(obj)
        return id(obj)

    def first_visit(self, obj: Any) -> bool:
        """Whether `obj` is new to this walk (else a back-reference is recorded)."""
        if id(obj) in self.seen:
            self.out.append(("seen", self.identity(obj) if self.portable else id(obj)))
            return False
        self.seen.add(id(obj))
        return True

    def tensor(self, t: torch.Tensor, registered: bool) -> tuple:
        """A tensor's guarded properties. Registered ones are read at every call, so their storage
        may change; unregistered ones are baked as constants aliasing their storage, so it may not."""
        meta = (self.identity(t), t.dtype, t.shape, t.device, t.requires_grad, type(t))
        if registered or self.portable:
            return meta
        try:
            return meta + (t.data_ptr(), t.stride(), t.storage_offset())
        except RuntimeError:  # no storage (e.g. a functorch wrapper left in an LSTM's _flat_weights)
            return meta

    def module(self, m: torch.nn.Module, registered: bool = True) -> None:
        """Records `m`. `registered=False` for a module reached outside the module tree (in a list,
        a dict, a plain attribute): its parameters are exported as constants, like any tensor there."""
        if not self.first_visit(m):
            return
        out = self.out
        d = m.__dict__
        skip = _SKIP_BY_TYPE.get(type(m))
        if skip is None:
            skip = _SKIP_BY_TYPE[type(m)] = _MODULE_SKIP.union(
                *(names for base, names in _DERIVED if isinstance(m, base)))
        out.append((type(m), self.identity(m), len(d)))
        for name, p in d["_parameters"].items():
            out.append((name, None if p is None else self.tensor(p, registered)))
        for name, b in d["_buffers"].items():
            out.append((name, None if b is None else self.tensor(b, registered)))
        for key, value in d.items():
            if key in skip:
                continue
            kind = type(value)
            if kind in _FAST_ATOMS:  # `value`'s fast path, inlined: most attributes are these
                out.append((key, value))
            elif kind in _CONTAINERS and not value:
                out.append((key, kind))  # never the container itself: it may fill up later
            else:
                out.append(key)
                self.value(value, 0)
        for name, child in d["_modules"].items():
            out.append(name)
            if child is None:
                out.append(None)
            else:
                self.module(child, registered)

    def value(self, v: Any, depth: int) -> None:
        """Records what `v` (an attribute value, or something reachable from one) contributes."""
        out = self.out
        kind = type(v)
        if kind in _FAST_ATOMS:
            out.append(v)
        elif kind in _CONTAINERS and not v:
            out.append(kind)
        elif isinstance(v, _ATOMS):
            out.append(v)
        elif isinstance(v, torch.Tensor):
            out.append(self.tensor(v, False))
        elif isinstance(v, torch.nn.Module):
            self.module(v, registered=False)
        elif isinstance(v, weakref.ref):
            # Not followed: weak references are caches of what the module holds (an RNN's
            # _flat_weight_refs, re-pointed by every torch.func call to whatever it last ran with).
            out.append(weakref.ref)
        elif depth >= _MAX_DEPTH or isinstance(v, _OPAQUE) or callable(v):
            out.append(("id", self.identity(v)))  # functions, classes, too deep: same object or not
        elif isinstance(v, (list, tuple, set, frozenset)):
            out.append((kind, len(v)))
            for item in (sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v):
                self.value(item, depth + 1)
        elif isinstance(v, dict):
            out.append((kind, len(v)))
            for key, item in v.items():
                out.append(key if isinstance(key, _ATOMS) else ("id", self.identity(key)))
                self.value(item, depth + 1)
        elif isinstance(v, np.ndarray):
            small = v.nbytes <= _SMALL_ARRAY
            out.append(("ndarray", v.dtype, v.shape, v.tobytes() if small else (
                self.identity(v), None if self.portable else v.ctypes.data)))
        elif hasattr(v, "__dict__"):  # a plain object, e.g. a config: its fields
            if self.first_visit(v):
                out.append((kind, self.identity(v)))
                for key, item in vars(v).items():
                    out.append(key)
                    self.value(item, depth + 1)
        else:
            out.append(("id", kind, self.identity(v)))
