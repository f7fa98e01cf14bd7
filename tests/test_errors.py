"""Bad input gets a clear error naming the argument, its value and what to do."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import entk
from tests import jax_models


@pytest.fixture(scope="module")
def mlp():
    return jax_models.make("mlp")


def test_axis_out_of_range(mlp):
    f, params, x1, x2 = mlp
    with pytest.raises(ValueError, match=r"trace_axes=\(5,\) has axis 5, out of range .* 2 dimension"):
        entk.empirical_ntk_fn(f, trace_axes=(5,))(x1, x2, params)
    with pytest.raises(ValueError, match=r"diagonal_axes=\(-3,\) has axis -3"):
        entk.empirical_ntk_fn(f, diagonal_axes=(-3,))(x1, x2, params)


def test_axis_both_traced_and_diagonal(mlp):
    f, params, x1, x2 = mlp
    with pytest.raises(ValueError, match="both trace_axes"):
        entk.empirical_ntk_fn(f, trace_axes=(1,), diagonal_axes=(1,))
    # -1 and 1 are the same axis of a 2-d output: caught once the output rank is known.
    with pytest.raises(ValueError, match="both name axis 1"):
        entk.empirical_ntk_fn(f, trace_axes=(-1,), diagonal_axes=(1,))(x1, x2, params)


def test_inputs_with_different_feature_shapes(mlp):
    f, params, x1, _ = mlp
    with pytest.raises(ValueError, match=r"x1 has shape \(3, 5\) and x2 has \(2, 4\)"):
        entk.empirical_ntk_fn(f)(x1, jnp.ones((2, 4)), params)


def test_diagonal_batch_axis_with_different_batch_sizes(mlp):
    f, params, x1, x2 = mlp
    with pytest.raises(ValueError, match="diagonal_axes includes axis 0 .* size 3 for x1 but 2 for x2"):
        entk.empirical_ntk_fn(f, diagonal_axes=(0,))(x1, x2, params)


def test_integer_and_non_array_parameters(mlp):
    f, params, x1, x2 = mlp
    bad = [dict(params[0], w=params[0]["w"].astype(jnp.int32)), params[1]]
    with pytest.raises(TypeError, match=r"params\[0\]\['w'\] has dtype int32"):
        entk.empirical_ntk_fn(f)(x1, x2, bad)
    with pytest.raises(TypeError, match=r"params\['s'\] is a float"):
        entk.empirical_ntk_fn(lambda p, x: p["s"] * x)(x1, x2, {"s": 2.0})


def test_unknown_strategy_and_unsupported_strategy():
    with pytest.raises(ValueError, match='use one of "auto", "jc", "ntvp", "sd"'):
        entk.empirical_ntk_fn(lambda p, x: x, implementation=7)
    model = entk.Model.from_function(lambda p, x: x @ p, jnp.ones((5, 2)),
                                     capabilities=frozenset({"jc", "ntvp"}))
    with pytest.raises(ValueError, match="'sd' is not supported by this model"):
        entk.empirical_ntk_fn(model, implementation="sd")


def _batch_norm_in_training(p, x):
    h = x @ p
    return (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5)


@pytest.mark.parametrize("implementation", ["jc", "ntvp"])
def test_vmap_axes_with_batch_coupled_model_is_refused(implementation):
    params = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 5))
    fn = entk.empirical_ntk_fn(_batch_norm_in_training, vmap_axes=0, implementation=implementation)
    with pytest.raises(ValueError, match="couples examples along the batch .* Use vmap_axes=None"):
        fn(x, None, params)
    # Without vmap_axes the same model is fine (the batch coupling is part of f).
    assert entk.empirical_ntk_fn(_batch_norm_in_training)(x, None, params).shape == (4, 4)


def test_vmap_axes_output_axis_mismatch():
    params = jnp.ones((5, 3))
    x = jnp.ones((4, 5))
    with pytest.raises(ValueError, match="has size 3 on its batch axis 0, but the input batch has 4"):
        entk.empirical_ntk_fn(lambda p, y: (y @ p).T, vmap_axes=0, trace_axes=())(x, None, params)


def test_kernel_fn_needs_params(mlp):
    f, params, x1, x2 = mlp
    with pytest.raises(TypeError, match="params="):
        entk.empirical_kernel_fn(f)(x1, x2, "ntk")
