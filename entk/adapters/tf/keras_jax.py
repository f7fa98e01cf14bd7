"""Keras 3 models on the JAX backend: already pure JAX through `stateless_call`.

Keras picks its backend once, at import, from `KERAS_BACKEND` (or `~/.keras/keras.json`); in a process
where it is `"jax"`, a Keras model's `stateless_call(trainable_values, non_trainable_values, x)` is a
pure JAX function of the variable values, so no translation is needed and every strategy (JC, NTVP,
SD) applies. `params` are the trainable variables keyed by Keras path (`"dense/kernel"`), `state` the
non-trainable ones (BatchNorm statistics, seed-generator state); the model runs in inference mode
(`training=False`) unless `training=` is passed as a keyword argument.

Precision: Keras' JAX backend caps its type promotion at 32 bits, so even a float64 model
(`keras.config.set_floatx("float64")`) computes ops such as `tanh` and BatchNorm in float32; its
kernels are then float32-accurate. The TensorFlow backend keeps float64 throughout.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from entk.adapters.tf.translate import unique_keys
from entk.model import ALL_STRATEGIES, Model

PyTree = Any


class KerasJaxApply:
    """`(params, state, x, **kw) -> outputs` for a JAX-backend Keras model; `params`/`state` are dicts."""

    def __init__(self, model: Any):
        self.model = model
        self.param_keys = unique_keys([v.path for v in model.trainable_variables])
        self.state_keys = unique_keys([v.path for v in model.non_trainable_variables])

    def values(self) -> tuple[dict, dict]:
        """The model's current `(params, state)`."""
        import jax.numpy as jnp

        params = {k: jnp.asarray(v.value) for k, v in zip(self.param_keys, self.model.trainable_variables)}
        state = {k: jnp.asarray(v.value)
                 for k, v in zip(self.state_keys, self.model.non_trainable_variables)}
        return params, state

    def __call__(self, params: dict, state: dict | None, x: PyTree, **kwargs: Any) -> PyTree:
        state = state or {}
        kwargs.setdefault("training", False)
        outputs, _ = self.model.stateless_call([params[k] for k in self.param_keys],
                                               [state[k] for k in self.state_keys], x, **kwargs)
        return outputs


def from_keras_jax(model: Any, example_input: Any = None) -> Model:
    """An `entk.Model` for a Keras 3 model on the JAX backend (`example_input` is not needed).

    Raises:
      ValueError: the model has not been built (no variables yet).
    """
    apply = KerasJaxApply(model)
    params, state = apply.values()
    return Model(apply, params, state, source="keras", capabilities=ALL_STRATEGIES,
                 info={"mode": "keras_jax", "param_names": apply.param_keys,
                       "state_names": apply.state_keys,
                       "param_count": int(sum(np.size(p) for p in params.values()))})
