"""entk: the empirical neural tangent kernel of JAX, PyTorch and TensorFlow models.

    Θ(x1, x2) = J(x1) J(x2)ᵀ,   J = ∂f(params, x)/∂params

Importing entk needs only JAX: adapters (torch, TensorFlow, Flax), the stax library, prediction and
scale utilities are imported on first use of the name that needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

from entk import _xla_cpu

_xla_cpu.apply()  # before JAX makes its CPU backend: an XLA:CPU float32 miscompilation (see module)

from entk.algorithms import Strategy  # noqa: E402
# Imported eagerly (JAX only): `entk.linearize` names both the function and its submodule, and a later
# import of the submodule must not rebind the package attribute to the module.
from entk.linearize import linearize, taylor_expand  # noqa: E402
from entk.model import Model  # noqa: E402

__version__ = "0.1.0"

# Public name -> "module:attribute" (or "module" for a submodule), resolved on first access.
_LAZY = {
    "empirical_ntk_fn": "entk.empirical:empirical_ntk_fn",
    "empirical_nngp_fn": "entk.empirical:empirical_nngp_fn",
    "empirical_kernel_fn": "entk.empirical:empirical_kernel_fn",
    "empirical_ntk_vp_fn": "entk.empirical:empirical_ntk_vp_fn",
    "ntk": "entk.empirical:ntk",
    "from_flax": "entk.adapters.flax:from_flax",
    "from_torch": "entk.adapters.torch:from_torch",
    "from_tf": "entk.adapters.tf:from_tf",
    "compare": "entk.algorithms.compare:compare",
    "monte_carlo_kernel_fn": "entk.stax.monte_carlo:monte_carlo_kernel_fn",
    "batch": "entk.scale:batch",
    "compute_kernel": "entk.scale:compute_kernel",
    "stax": "entk.stax",
    "predict": "entk.predict",
    "scale": "entk.scale",
    "metrics": "entk.metrics",
    "monitor": "entk.monitor",
    "algorithms": "entk.algorithms",
    "adapters": "entk.adapters",
}

__all__ = ["Model", "Strategy", "linearize", "taylor_expand", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'entk' has no attribute {name!r}")
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    value = getattr(module, attr) if attr else module
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public API only (not this module's imports such as `importlib`, nor private names)."""
    return sorted({*__all__, "__version__"})
