"""`entk.Model`: any supported model, seen as a pure JAX function of its parameters.

Every adapter (PyTorch, TensorFlow/Keras, Flax, stax) produces one of these, and everything above it
(algorithms, kernels, scale, predict) only ever sees `model.apply(params, x, **kw)` and the `params` pytree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from entk.algorithms import capabilities as _capabilities

PyTree = Any

ALL_STRATEGIES = _capabilities()
"""Every concrete strategy's short name (from `entk.algorithms.Strategy`): a pure JAX model's
capabilities."""


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A differentiable model as pure JAX.

    Attributes:
      apply_with_state: `(params, state, x, **kw) -> output pytree`, pure JAX (jit/vmap/jvp/vjp-able).
      params: the pytree the kernel differentiates with respect to (floating-point leaves only).
      state: constants the model needs but that are not differentiated (BatchNorm statistics, frozen
        weights, non-`params` Flax collections); `None` when there are none.
      source: where the model came from: `"jax"`, `"flax"`, `"stax"`, `"torch"`, `"tf"`, `"keras"`.
      capabilities: the short names of the strategies that work on this model
        (`entk.algorithms.capabilities`, e.g. `{"jc", "ntvp", "sd"}`); e.g. a model that calls back into
        PyTorch supports Jacobian contraction and NTK-vector products but not structured derivatives,
        which need the model's jaxpr.
      info: adapter details users may want (parameter names, input layout, export mode, ...).

    Identity semantics: two `Model`s are equal only if they are the same object, so a model can key a
    cache of compiled kernel functions.
    """

    apply_with_state: Callable[..., Any]
    params: PyTree
    state: PyTree = None
    source: str = "jax"
    capabilities: frozenset = ALL_STRATEGIES
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def apply(self, params: PyTree, x: PyTree, **kwargs: Any) -> PyTree:
        """`f(params, x, **kw)`: the model contract used by every kernel function."""
        return self.apply_with_state(params, self.state, x, **kwargs)

    def __call__(self, x: PyTree, **kwargs: Any) -> PyTree:
        """The model's output at its own parameters."""
        return self.apply(self.params, x, **kwargs)

    @classmethod
    def from_function(cls, f: Callable[..., Any], params: PyTree, *, source: str = "jax",
                      **fields: Any) -> "Model":
        """Wraps a plain `f(params, x, **kw)` that holds no state of its own."""
        return cls(lambda p, _state, x, **kw: f(p, x, **kw), params, None, source=source, **fields)

    def replace(self, **changes: Any) -> "Model":
        """A copy with some fields changed (e.g. new `params` after training)."""
        return dataclasses.replace(self, **changes)
