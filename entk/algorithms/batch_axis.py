"""The abstract interpreter behind `entk.algorithms.batch_independence`: where is the batch axis?

Every jaxpr variable gets an `Axis`: the dimension holding the batch, or none (then which dimensions are
known constant, and where the value came from). `run_jaxpr` walks the equations with one rule per
primitive (`entk.algorithms.batch_axis_rules`, registered there with `@rule`); a rule raises `Coupled`
when its equation mixes examples and `Opaque` when it cannot tell. Call-like primitives (jit,
custom_jvp/vjp, remat) are entered; the first coupling found is reported with the primitive and the
user's source line (`jax.extend.source_info_util`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
from jax.extend import source_info_util

# ----------------------------------------------------------------------------------------------
# Abstract values and results


@dataclasses.dataclass(frozen=True)
class Axis:
    """What the analysis knows about one array variable.

    `batch`: the dimension holding the batch, or None if the value is the same function of every
    example (parameters, constants). `inner`: that dimension holds `N * inner` entries, batch-major
    (a reshape merged the batch with later dimensions, e.g. `(N, T, D) -> (N*T, D)`). For unbatched
    values, `const` lists the dimensions along which the value is known constant (a broadcast), and
    `origin` says where it came from, for messages.
    """

    batch: int | None = None
    inner: int = 1
    const: frozenset = frozenset()
    origin: "Origin | None" = None


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where an unbatched, non-constant value comes from: a phrase and what the user should do."""

    what: str
    hint: str


RANDOM = Origin("random numbers drawn with one key for the whole batch (e.g. a dropout mask from a "
                "fixed key), which differ with each example's position in the batch",
                "draw per-example randomness from per-example keys passed as a keyword argument with "
                "a declared batch axis, or use vmap_axes=None")
POSITIONS = Origin("positions along the batch (an iota, e.g. jnp.arange over the batch size)",
                   "use vmap_axes=None")
CAPTURED = Origin("an array captured by f (a constant of its jaxpr)", "use vmap_axes=None")


class Coupled(Exception):
    """Raised by a rule: this equation makes examples depend on each other (or cannot be proven not to)."""


class Opaque(Exception):
    """Raised for a primitive without a rule that sees a batched operand: the proof stops there."""


# ----------------------------------------------------------------------------------------------
# The interpreter

_RULES: dict[str, Callable] = {}


def rule(*names: str) -> Callable:
    """Registers `fn(ctx, eqn, ins: list[Axis]) -> list[Axis]` for the primitives `names`."""
    def register(fn: Callable) -> Callable:
        for name in names:
            _RULES[name] = fn
        return fn
    return register


@dataclasses.dataclass
class Context:
    n: int  # batch size (> 1)


def shape_of(v: Any) -> tuple[int, ...]:
    return tuple(getattr(v.aval, "shape", ()))


def _where(eqn: Any) -> str:
    try:
        return source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001 - a missing source line must not hide the verdict
        return ""


class Found(Exception):
    """Carries the first coupling found, with its equation, up through nested jaxprs."""

    def __init__(self, name: str, reason: str, where: str, opaque: bool = False):
        super().__init__(reason)
        self.name, self.reason, self.where, self.opaque = name, reason, where, opaque

    @property
    def message(self) -> str:
        return f"`{self.name}` at {self.where or 'an unknown source line'} {self.reason}"


def run_jaxpr(ctx: Context, jaxpr: Any, consts: Sequence[Axis], ins: Sequence[Axis]) -> list[Axis]:
    """Abstract interpretation of an (open) jaxpr: the `Axis` of every output."""
    env: dict = {}
    for var, info in zip(list(jaxpr.constvars) + list(jaxpr.invars), list(consts) + list(ins)):
        env[var] = info

    def read(v: Any) -> Axis:
        if not hasattr(v, "count") and hasattr(v, "val"):  # a Literal: a scalar constant
            return Axis(const=frozenset(range(len(shape_of(v)))))
        return env[v]

    for eqn in jaxpr.eqns:
        ins_ = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        try:
            fn = _RULES.get(name)
            if fn is None:
                sub = _sub_jaxpr(eqn)
                if sub is not None:
                    outs = run_closed(ctx, sub, ins_)
                elif all(i.batch is None for i in ins_):
                    outs = [Axis(origin=first_origin(ins_)) for _ in eqn.outvars]
                else:
                    raise Opaque("has no batch-independence rule, so entk cannot prove that it "
                                 "keeps examples apart")
            else:
                outs = fn(ctx, eqn, ins_)
        except Coupled as e:
            raise Found(name, str(e), _where(eqn)) from None
        except Opaque as e:
            raise Found(name, str(e), _where(eqn), opaque=True) from None
        except Found as found:  # inside a nested jaxpr: fall back on the caller's source line
            found.where = found.where or _where(eqn)
            raise
        for var, info in zip(eqn.outvars, outs):
            env[var] = info
    return [read(v) for v in jaxpr.outvars]


def first_origin(ins: Sequence[Axis]) -> Origin | None:
    return next((i.origin for i in ins if i.origin is not None), None)


def _sub_jaxpr(eqn: Any) -> Any:
    """The body of a call-like primitive (jit, custom_jvp/vjp, remat, closed_call), if it has one."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is not None and hasattr(sub, "eqns" if not hasattr(sub, "jaxpr") else "jaxpr"):
            inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
            if len(inner.invars) == len(eqn.invars):
                return sub
    return None


def run_closed(ctx: Context, sub: Any, ins: Sequence[Axis]) -> list[Axis]:
    inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
    values = list(getattr(sub, "consts", ())) or [None] * len(inner.constvars)
    consts = [captured(ctx, v, shape_of(var)) for v, var in zip(values, inner.constvars)]
    return run_jaxpr(ctx, inner, consts, ins)


def captured(ctx: Context, value: Any, shape: Sequence[int]) -> Axis:
    """A constant of a jaxpr: known constant along each batch-sized axis on which its value is uniform.

    Translated models (tf2jax, torch export) bake arrays such as an RNN's zero initial state of shape
    `(N, H)` into the program; such a value is the same for every example, so it does not couple them.
    An abstract value (a tracer of an enclosing `jit`) proves nothing and is treated as varying.
    """
    const = {d for d, s in enumerate(shape) if s == 1}
    try:
        array = np.asarray(value) if value is not None else None
    except Exception:  # noqa: BLE001 - a tracer: its value is unknown
        array = None
    if array is not None and array.shape == tuple(shape):
        for d, s in enumerate(shape):
            if s == ctx.n and np.array_equal(array, np.take(array, [0] * s, axis=d), equal_nan=True):
                const.add(d)
    return Axis(const=frozenset(const), origin=CAPTURED)


# ----------------------------------------------------------------------------------------------
# Helpers shared by rules


def align(ctx: Context, info: Axis, shape: Sequence[int], dim: int) -> None:
    """An unbatched operand meets the batch on `dim`: fine if it is constant there, else coupling."""
    if info.batch is not None or len(shape) == 0 or shape[dim] == 1 or dim in info.const:
        return
    origin = info.origin or Origin("a value that varies along the batch-aligned axis",
                                   "use vmap_axes=None")
    raise Coupled(f"combines the batch with {origin.what}, which has the batch size on axis {dim}: "
                  f"examples are treated by position in the batch. Fix: {origin.hint}")


def same_batch(infos: Sequence[Axis], what: str) -> Axis | None:
    """The one batch placement shared by all batched `infos` (None if none is batched)."""
    batched = [i for i in infos if i.batch is not None]
    for i in batched[1:]:
        if (i.batch, i.inner) != (batched[0].batch, batched[0].inner):
            raise Coupled(f"{what} values whose batch axes differ ({batched[0].batch} and "
                          f"{i.batch}): examples are paired across the batch")
    return batched[0] if batched else None


def unbatched(const: Any = (), origin: Origin | None = None) -> Axis:
    return Axis(const=frozenset(const), origin=origin)


def const_elementwise(eqn: Any, ins: Sequence[Axis]) -> frozenset:
    out_shape = shape_of(eqn.outvars[0])
    const = set(range(len(out_shape)))
    for v, i in zip(eqn.invars, ins):
        shape = shape_of(v)
        if len(shape) == len(out_shape):
            const &= set(i.const) | {d for d, s in enumerate(shape) if s == 1}
    return frozenset(const)
