"""Flax modules and the one-call `entk.ntk`, against brute force and the framework itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import entk
from tests.reference import assert_close, brute_force_ntk

nn = pytest.importorskip("flax.linen")


class SmallNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), strides=(2, 2))(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        x = nn.relu(x)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(3)(x)


@pytest.fixture(scope="module")
def flax_case():
    module = SmallNet()
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 6, 2), jnp.float64)
    variables = module.init(jax.random.PRNGKey(1), x)
    # Non-trivial running statistics so that state matters.
    variables = {"params": variables["params"],
                 "batch_stats": jax.tree_util.tree_map(lambda v: v + 0.3, variables["batch_stats"])}
    variables = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64), variables)  # flax inits float32
    return module, variables, x


def test_from_flax_splits_params_and_state(flax_case):
    module, variables, x = flax_case
    model = entk.from_flax(module, variables)
    assert model.source == "flax"
    assert set(model.state) == {"batch_stats"}
    assert jax.tree_util.tree_structure(model.params) == jax.tree_util.tree_structure(variables["params"])
    assert_close(model(x), module.apply(variables, x))


@pytest.mark.parametrize("implementation", ["jc", "ntvp"])
def test_flax_ntk_matches_brute_force(flax_case, implementation):
    module, variables, x = flax_case
    model = entk.from_flax(module, variables)
    x2 = x[:2] * 0.5
    kernel = jax.jit(entk.empirical_ntk_fn(model, trace_axes=(), vmap_axes=0,
                                           implementation=implementation))(x, x2, model.params)
    assert_close(kernel, brute_force_ntk(model.apply, x, x2, model.params, trace_axes=()))


def test_ntk_one_call_numpy_in_numpy_out(flax_case):
    module, variables, x = flax_case
    model = entk.from_flax(module, variables)
    x_np = np.asarray(x)
    kernel = entk.ntk(model, x_np, implementation="jc")
    assert isinstance(kernel, np.ndarray)
    assert_close(jnp.asarray(kernel), brute_force_ntk(model.apply, x, None, model.params))
    # Same model and settings: the compiled kernel function is reused, not rebuilt, also when the
    # Model is rebuilt with new weights (as after a training step).
    from entk import empirical
    cache = empirical._COMPILED[id(model.apply_with_state)][1]
    assert len(cache) == 1
    first = next(iter(cache.values()))
    entk.ntk(model, x_np[:2], implementation="jc")
    trained = model.replace(params=jax.tree_util.tree_map(lambda p: p * 1.1, model.params))
    assert_close(jnp.asarray(entk.ntk(trained, x_np, implementation="jc")),
                 brute_force_ntk(trained.apply, x, None, trained.params))
    assert len(cache) == 1 and next(iter(cache.values())) is first


def test_ntk_plain_function_and_flax_pair(flax_case):
    module, variables, x = flax_case
    f = lambda p, x: module.apply({"params": p, "batch_stats": variables["batch_stats"]}, x)
    expected = brute_force_ntk(f, x, None, variables["params"])
    assert_close(entk.ntk(f, x, params=variables["params"]), expected)
    # The plain function maps to one apply function, so calls reuse its compiled kernel function,
    # and each call's params are the ones used.
    from entk import adapters, empirical
    model = adapters.to_model(f, x, params=variables["params"])
    assert len(empirical._COMPILED[id(model.apply_with_state)][1]) == 1
    doubled = jax.tree_util.tree_map(lambda p: 2 * p, variables["params"])
    assert adapters.to_model(f, x, params=doubled).params is doubled
    assert_close(entk.ntk(f, x, params=doubled), brute_force_ntk(f, x, None, doubled))
    assert len(empirical._COMPILED[id(model.apply_with_state)][1]) == 1
    assert_close(entk.ntk((module, variables), x), expected)
    with pytest.raises(TypeError, match="needs its parameters"):
        entk.ntk(f, x)
