"""Algorithms that compute the empirical NTK, and the registry that names them.

Each strategy is a module in this package exposing one function with the signature of
`KernelAlgorithm` (see `entk.algorithms.axes` for the conventions every strategy shares) and its
`asymptotic_flops`. Modules are imported lazily, on first use, so `import entk` stays light.

`Strategy` is the only list of strategies: a new one is a member there (its short name, module and
what it needs of a model) plus its module and tests. Everything else derives from it: the registry
(`get`), the models' capabilities (`capabilities`, used by every adapter), the CLI's choices
(`short_names`) and the cost model (`asymptotic_flops`, `concrete_strategies`). `entk.algorithms.call`
prepares the validated call each strategy is handed.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
from typing import Any, Callable, Protocol

from entk.algorithms.axes import KernelAxes, VmapAxes

PyTree = Any


class Strategy(enum.IntEnum):
    """How the empirical NTK is computed (numbering as in neural-tangents' `NtkImplementation`).

    The one list of strategies. Each member carries:
      short_name: `"auto"`, `"jc"`, `"ntvp"`, `"sd"`: what users type;
      target: `"module:function"`, the `KernelAlgorithm` implementing it (None for AUTO), whose module
        also provides `asymptotic_flops` for the cost model;
      needs_jvp: it needs forward-mode derivatives of the model (JVPs);
      needs_jaxpr: it reads the model's jaxpr, so the model must be pure JAX (not a call back into
        PyTorch or TensorFlow).
    The registry, `capabilities` (what the adapters declare), the CLI's choices and the cost model
    derive from these members: a new strategy is one member here plus its module (and its tests).
    """

    short_name: str
    target: str | None
    needs_jvp: bool
    needs_jaxpr: bool

    def __new__(cls, value: int, short_name: str, target: str | None, needs_jvp: bool = False,
                needs_jaxpr: bool = False) -> "Strategy":
        member = int.__new__(cls, value)
        member._value_ = value
        member.short_name = short_name
        member.target = target
        member.needs_jvp = needs_jvp
        member.needs_jaxpr = needs_jaxpr
        return member

    AUTO = 0, "auto", None
    JACOBIAN_CONTRACTION = 1, "jc", "entk.algorithms.jacobian_contraction:empirical_ntk"
    NTK_VECTOR_PRODUCTS = 2, "ntvp", "entk.algorithms.ntk_vector_products:empirical_ntk", True
    STRUCTURED_DERIVATIVES = 3, "sd", "entk.algorithms.structured:empirical_ntk", False, True

    @classmethod
    def parse(cls, value: "Strategy | str | int") -> "Strategy":
        """Accepts a `Strategy`, its short name, its full name, or its integer value."""
        if isinstance(value, Strategy):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for strategy in cls:
                if key in (strategy.short_name, strategy.name.lower()):
                    return strategy
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        choices = ", ".join(f'"{s}"' for s in short_names())
        raise ValueError(f"implementation={value!r} is not a known strategy; use one of {choices}, "
                         f"an entk.Strategy, or the integers {min(cls)}-{max(cls)}.")


def short_names() -> tuple[str, ...]:
    """Every strategy's short name, AUTO's first: `("auto", "jc", "ntvp", "sd")` (e.g. CLI choices)."""
    return tuple(s.short_name for s in Strategy)


def capabilities(*, jvp: bool = True, jaxpr: bool = True) -> frozenset[str]:
    """Short names of the concrete strategies that work on a model offering what is given.

    Args:
      jvp: the model has forward-mode derivatives.
      jaxpr: the model is pure JAX, with a jaxpr to read (False for a call back into a framework).

    `capabilities()` is every strategy (`entk.model.ALL_STRATEGIES`).
    """
    return frozenset(s.short_name for s in Strategy if s is not Strategy.AUTO
                     and (jvp or not s.needs_jvp) and (jaxpr or not s.needs_jaxpr))


class KernelAlgorithm(Protocol):
    """The function every strategy module provides.

    Args:
      f: the model, `f(params, x, **kw) -> output pytree`.
      x1, x2: inputs; `x2 is None` means the kernel of `x1` with itself (strategies may reuse work).
      params: parameter pytree (floating-point leaves, already validated).
      kwargs1, kwargs2: keyword arguments for `f` on `x1` and on `x2` (already split, rng keys included).
      axes: the requested trace / diagonal axes (`KernelAxes`).
      vmap_axes: `None` (apply `f` to whole batches) or a normalized `VmapAxes`.

    Returns:
      A pytree with the structure of `f`'s output; each leaf is that output leaf's kernel in the layout
      of `KernelAxes.output_shape`.
    """

    def __call__(self, f: Callable[..., PyTree], x1: PyTree, x2: PyTree | None, params: PyTree,
                 kwargs1: dict, kwargs2: dict, axes: KernelAxes,
                 vmap_axes: VmapAxes | None) -> PyTree: ...


_REGISTRY: dict[Strategy, "str | KernelAlgorithm"] = {
    s: s.target for s in Strategy if s.target is not None}


def register(strategy: Strategy, target: str | KernelAlgorithm) -> None:
    """Registers (or replaces) the implementation of a concrete strategy.

    `target` is a `KernelAlgorithm` or a `"module:function"` string imported on first use.
    """
    if Strategy.parse(strategy) is Strategy.AUTO:
        raise ValueError("AUTO is a selection rule, not an algorithm; register a concrete strategy.")
    _REGISTRY[Strategy.parse(strategy)] = target


def get(strategy: Strategy | str | int) -> KernelAlgorithm:
    """The implementation of a concrete strategy (importing its module if needed)."""
    strategy = Strategy.parse(strategy)
    if strategy is Strategy.AUTO:
        raise ValueError("AUTO has no single implementation; resolve it to a concrete strategy first.")
    target = _REGISTRY.get(strategy)
    if target is None:
        raise NotImplementedError(f"Strategy {strategy.short_name!r} is not available in this build.")
    if isinstance(target, str):
        module_name, attr = target.split(":")
        target = getattr(importlib.import_module(module_name), attr)
        _REGISTRY[strategy] = target
    return target


def is_available(strategy: Strategy | str | int) -> bool:
    """Whether a concrete strategy is registered and its module can be found."""
    target = _REGISTRY.get(Strategy.parse(strategy))
    if target is None:
        return False
    if isinstance(target, str):
        return importlib.util.find_spec(target.split(":")[0]) is not None
    return True


def concrete_strategies() -> tuple[Strategy, ...]:
    """Every available strategy other than AUTO, in enum order."""
    return tuple(s for s in Strategy if s is not Strategy.AUTO and is_available(s))


def asymptotic_flops(strategy: Strategy | str | int, **sizes: Any) -> float:
    """The strategy's FLOPs in Novak et al. (2022)'s model: its module's `asymptotic_flops(**sizes)`."""
    strategy = Strategy.parse(strategy)
    if strategy.target is None:
        raise ValueError(f"No asymptotic model for {strategy!r}.")
    return importlib.import_module(strategy.target.split(":")[0]).asymptotic_flops(**sizes)


__all__ = ["Strategy", "KernelAlgorithm", "KernelAxes", "VmapAxes", "register", "get",
           "is_available", "concrete_strategies", "capabilities", "short_names", "asymptotic_flops"]
