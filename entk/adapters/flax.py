"""Flax (linen) modules as `entk.Model`: the `params` collection is differentiated, the rest is state."""

from __future__ import annotations

from typing import Any, Mapping

from entk.model import Model

PyTree = Any


def from_flax(module: Any, variables: Mapping[str, PyTree], *, method: Any = None,
              **apply_kwargs: Any) -> Model:
    """Wraps a Flax linen `module` and its `variables` (as returned by `module.init`).

    `variables["params"]` becomes `Model.params`; every other collection (`batch_stats`, constants)
    becomes `Model.state`, held fixed. `apply_kwargs` (e.g. `train=False`) are passed on every call,
    before the per-call keyword arguments. Collections that `apply` would mutate are not requested, so
    modules run in inference mode.
    """
    if "params" not in variables:
        raise ValueError(f"variables has no 'params' collection (it has {sorted(variables)}); pass "
                         f"the dict returned by module.init(rng, x).")
    state = {k: v for k, v in variables.items() if k != "params"}

    def apply_with_state(params: PyTree, state: Mapping[str, PyTree], x: PyTree, **kw: Any) -> PyTree:
        return module.apply({"params": params, **state}, x, method=method, **{**apply_kwargs, **kw})

    return Model(apply_with_state, variables["params"], state, source="flax",
                 info={"module": type(module).__name__})
