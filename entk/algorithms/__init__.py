"""Algorithms that compute the empirical NTK, and the registry that names them.

Each strategy is a module in this package exposing one function with the signature of
`KernelAlgorithm` (see `entk.algorithms.axes` for the conventions every strategy shares). Modules are
imported lazily, on first use, so `import entk` stays light.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
from typing import Any, Callable, Protocol

from entk.algorithms.axes import KernelAxes, VmapAxes

PyTree = Any


class Strategy(enum.IntEnum):
    """How the empirical NTK is computed (numbering as in neural-tangents' `NtkImplementation`)."""

    AUTO = 0
    JACOBIAN_CONTRACTION = 1
    NTK_VECTOR_PRODUCTS = 2
    STRUCTURED_DERIVATIVES = 3

    @property
    def short_name(self) -> str:
        """`"auto"`, `"jc"`, `"ntvp"` or `"sd"`."""
        return _SHORT_NAMES[self]

    @classmethod
    def parse(cls, value: "Strategy | str | int") -> "Strategy":
        """Accepts a `Strategy`, its short name, its full name, or its integer value."""
        if isinstance(value, Strategy):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for strategy, short in _SHORT_NAMES.items():
                if key in (short, strategy.name.lower()):
                    return strategy
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        choices = ", ".join(f'"{s}"' for s in _SHORT_NAMES.values())
        raise ValueError(f"implementation={value!r} is not a known strategy; use one of {choices}, "
                         f"an entk.Strategy, or the integers 0-3.")


_SHORT_NAMES = {
    Strategy.AUTO: "auto",
    Strategy.JACOBIAN_CONTRACTION: "jc",
    Strategy.NTK_VECTOR_PRODUCTS: "ntvp",
    Strategy.STRUCTURED_DERIVATIVES: "sd",
}


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


_REGISTRY: dict[Strategy, str] = {
    Strategy.JACOBIAN_CONTRACTION: "entk.algorithms.jacobian_contraction:empirical_ntk",
    Strategy.NTK_VECTOR_PRODUCTS: "entk.algorithms.ntk_vector_products:empirical_ntk",
    Strategy.STRUCTURED_DERIVATIVES: "entk.algorithms.structured:empirical_ntk",
}


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


__all__ = ["Strategy", "KernelAlgorithm", "KernelAxes", "VmapAxes", "register", "get",
           "is_available", "concrete_strategies"]
