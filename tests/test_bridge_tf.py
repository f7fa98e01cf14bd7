"""TensorFlow bridge mode: Keras models (TF backend) and tf.functions as foreign JAX functions.

References are TensorFlow itself: model outputs, `tf.autodiff.ForwardAccumulator` / `tf.GradientTape`
derivatives, and eNTKs from `GradientTape.jacobian` contracted by hand, all in float64.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import entk

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

if keras.backend.backend() != "tensorflow":
    pytest.skip("the TF bridge needs Keras on the TensorFlow backend", allow_module_level=True)

tf.config.set_visible_devices([], "GPU")  # TF on CPU next to JAX; neither grabs accelerator memory

from entk.adapters.tf.bridge import bridge_model  # noqa: E402

L = keras.layers
TOL = 1e-10


@pytest.fixture(scope="module", autouse=True)
def float64_keras():
    old, old_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")  # the policy is fixed at first use: set it explicitly
    yield
    keras.config.set_floatx(old)
    keras.config.set_dtype_policy(old_policy)
    case.cache_clear()


def _mlp():
    return keras.Sequential([keras.Input((3,)), L.Dense(6, activation="tanh"), L.Dense(2)])


def _cnn():
    model = keras.Sequential([keras.Input((6, 6, 2)), L.Conv2D(3, 3), L.BatchNormalization(), L.ReLU(),
                              L.MaxPooling2D(), L.Flatten(), L.Dense(2)])
    bn = model.layers[1]
    bn.moving_mean.assign(np.linspace(-0.5, 0.5, 3))  # non-trivial statistics: inference mode shows
    bn.moving_variance.assign(np.linspace(0.5, 2.0, 3))
    return model


def _lstm(unroll=True):
    # Unrolled: vectorizing the gradient of the rolled LSTM's while loop (tf.vectorized_map) works but
    # takes tens of seconds to trace; the rolled one is covered unbatched below.
    return keras.Sequential([keras.Input((3,), dtype="int32"), L.Embedding(7, 4),
                             L.LSTM(3, unroll=unroll), L.Dense(2)])


class Affine(tf.Module):
    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.w = tf.Variable(rng.standard_normal((3, 4)))
        self.b = tf.Variable(rng.standard_normal(4))
        self.out = tf.Variable(rng.standard_normal((4, 2)))
        self.scale = tf.Variable(np.float64(1.5), trainable=False)

    @tf.function
    def __call__(self, x):
        return tf.tanh(x @ self.w + self.b) @ self.out * self.scale


def _inputs(name, rng):
    if name == "lstm":
        return rng.integers(0, 7, (3, 3)).astype(np.int32), rng.integers(0, 7, (2, 3)).astype(np.int32)
    shape = (6, 6, 2) if name == "cnn" else (3,)
    return rng.standard_normal((3, *shape)), rng.standard_normal((2, *shape))


MAKERS = {"mlp": _mlp, "cnn": _cnn, "lstm": _lstm, "module": Affine}


@functools.lru_cache(maxsize=None)
def case(name):
    """(TF model, bridged model, x1, x2, reference NTK), built once."""
    keras.utils.set_random_seed(0)
    model = MAKERS[name]()
    x1, x2 = _inputs(name, np.random.default_rng(1))
    return model, bridge_model(model, x1), x1, x2, tf_reference_ntk(model, x1, x2)


def _call(model, x):
    return model(x, training=False) if isinstance(model, keras.Model) else model(x)


def tf_reference_ntk(model, x1, x2):
    """Θ(x1, x2), last output axis traced: Σ_o J1[:, o] J2[:, o]ᵀ / O from GradientTape Jacobians."""
    def jacobian(x):
        with tf.GradientTape(persistent=True) as tape:
            y = _call(model, tf.constant(x))
        jac = tape.jacobian(y, model.trainable_variables, experimental_use_pfor=False,
                            unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return np.concatenate([np.reshape(j, (*y.shape, -1)) for j in jac], -1)

    j1, j2 = jacobian(x1), jacobian(x2)
    return np.einsum("iop,jop->ij", j1, j2) / j1.shape[1]


def assert_close(actual, expected, tol=TOL, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(actual - expected).max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}"


# ----------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_outputs_match_tf(name):
    model, bridged, x1, x2, _ = case(name)
    assert_close(bridged(jnp.asarray(x1)), _call(model, x1), what=name)
    assert_close(bridged.apply(bridged.params, tf.constant(x2)), _call(model, x2),
                 what=f"{name} (tf input)")


def test_params_and_state():
    model, bridged, *_ = case("cnn")
    assert list(bridged.params) == [v.path for v in model.trainable_variables]
    assert list(bridged.state) == [v.path for v in model.non_trainable_variables]
    assert any("moving_mean" in k for k in bridged.state)
    assert_close(bridged.params[model.trainable_variables[0].path], model.trainable_variables[0].numpy())
    assert bridged.capabilities == frozenset({"jc", "ntvp"}) and bridged.source == "keras"
    assert "opaque to JAX" in bridged.info["sd"]
    with pytest.raises(ValueError, match="not supported by this model"):
        entk.empirical_ntk_fn(bridged, implementation="sd")

    module, fn_bridged, *_ = case("module")
    assert set(fn_bridged.params) == {"w", "b", "out"} and set(fn_bridged.state) == {"scale"}
    assert fn_bridged.source == "tf"


def test_structured_outputs():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    hidden = L.Dense(4, activation="tanh")(inputs)
    model = keras.Model(inputs, {"logits": L.Dense(2)(hidden), "score": L.Dense(1)(hidden)})
    x = np.random.default_rng(0).standard_normal((2, 3))
    bridged = bridge_model(model, x)
    out, expected = bridged(x), model(x, training=False)
    assert set(out) == {"logits", "score"}
    for key in out:
        assert_close(out[key], expected[key], what=key)
    (grads,) = jax.vjp(lambda p: bridged.apply(p, x), bridged.params)[1](
        {"logits": jnp.ones((2, 2)), "score": jnp.zeros((2, 1))})
    with tf.GradientTape() as tape:
        y = model(tf.constant(x), training=False)["logits"]
    reference = tape.gradient(y, [v.value for v in model.trainable_variables],
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
    for v, g in zip(model.trainable_variables, reference):
        assert_close(grads[v.path], g, what=f"vjp through the dict output {v.path}")


def test_unbuilt_model_is_refused():
    model = keras.Sequential([L.Dense(3)])
    with pytest.raises(ValueError, match="not been built"):
        bridge_model(model, np.ones((2, 4)))


def test_function_variables_are_restored_and_params_are_used():
    module, bridged, x1, *_ = case("module")
    before = [v.numpy().copy() for v in module.variables]
    doubled = {k: 2 * v for k, v in bridged.params.items()}
    out = jax.jit(bridged.apply)(doubled, x1)
    hidden = np.tanh(x1 @ (2 * module.w.numpy()) + 2 * module.b.numpy())
    expected = hidden @ (2 * module.out.numpy()) * 1.5
    assert_close(out, expected)
    for v, b in zip(module.variables, before):
        assert np.array_equal(v.numpy(), b)


# ----------------------------------------------------------------------------------------------
# Kernels


@pytest.mark.parametrize("name, implementation, vmap_axes", [
    ("mlp", "jc", 0), ("mlp", "ntvp", None),
    ("cnn", "jc", None), ("cnn", "ntvp", 0),
    ("lstm", "ntvp", None),
    ("module", "jc", 0), ("module", "ntvp", None),
])
def test_kernel_matches_gradient_tape_reference(name, implementation, vmap_axes):
    _, bridged, x1, x2, reference = case(name)
    ntk_fn = jax.jit(entk.empirical_ntk_fn(bridged, implementation=implementation, vmap_axes=vmap_axes))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to a Python loop
        kernel = ntk_fn(x1, x2, bridged.params)
    assert_close(kernel, reference, what=f"{name}/{implementation}/{vmap_axes}")


# ----------------------------------------------------------------------------------------------
# Transforms of the foreign function against TensorFlow's own


@pytest.mark.parametrize("name", ["cnn", "module"])
def test_jvp_vjp_vmap_match_tf(name):
    model, bridged, x1, *_ = case(name)
    params = bridged.params
    rng = np.random.default_rng(0)
    tangent = {k: jnp.asarray(rng.standard_normal(v.shape)) for k, v in params.items()}
    cotangent = jnp.asarray(rng.standard_normal(np.shape(_call(model, x1))))
    f = lambda p: bridged.apply(p, x1)  # noqa: E731

    @jax.jit
    def transforms(params, tangent, cotangent):
        _, jvp_out = jax.jvp(f, (params,), (tangent,))
        (vjp_out,) = jax.vjp(f, params)[1](cotangent)
        per_example = jax.vmap(lambda x: bridged.apply(params, x[None])[0])(x1)
        return jvp_out, vjp_out, per_example

    jvp_out, vjp_out, per_example = transforms(params, tangent, cotangent)
    variables = _variables_in_param_order(model, bridged)
    tf_tangent = [tf.constant(np.asarray(tangent[k])) for k in params]
    with tf.autodiff.ForwardAccumulator(variables, tf_tangent) as acc:
        y = _call(model, tf.constant(x1))
    assert_close(jvp_out, acc.jvp(y), what="jvp")
    with tf.GradientTape() as tape:
        y = _call(model, tf.constant(x1))
    grads = tape.gradient(y, variables, output_gradients=tf.constant(np.asarray(cotangent)))
    for k, g in zip(params, grads):
        assert_close(vjp_out[k], g, what=f"vjp {k}")
    assert_close(per_example, _call(model, x1), what="vmap over examples")


def _variables_in_param_order(model, bridged):
    if isinstance(model, keras.Model):
        by_path = {v.path: v.value for v in model.trainable_variables}  # the tf.Variables
        return [by_path[k] for k in bridged.params]
    return [getattr(model, k) for k in bridged.params]


def test_jacfwd_and_jacrev_agree_with_tape():
    model, bridged, x1, *_ = case("mlp")
    rev = jax.jit(jax.jacrev(bridged.apply))(bridged.params, x1)
    fwd = jax.jit(jax.jacfwd(bridged.apply))(bridged.params, x1)
    with tf.GradientTape(persistent=True) as tape:
        y = model(tf.constant(x1), training=False)
    jac = tape.jacobian(y, model.trainable_variables, experimental_use_pfor=False)
    for v, j in zip(model.trainable_variables, jac):
        assert_close(rev[v.path], j, what=f"jacrev {v.path}")
        assert_close(fwd[v.path], j, what=f"jacfwd {v.path}")


def test_rolled_lstm_jvp_falls_back_to_reverse_mode():
    """ForwardAccumulator fails on a Keras LSTM's while loop inside a graph; the JVP must be right."""
    keras.utils.set_random_seed(0)
    model = _lstm(unroll=False)
    x = np.random.default_rng(1).integers(0, 7, (3, 3)).astype(np.int32)
    bridged = bridge_model(model, x)
    rng = np.random.default_rng(2)
    tangent = {k: jnp.asarray(rng.standard_normal(v.shape)) for k, v in bridged.params.items()}
    _, jvp_out = jax.jit(lambda p, t: jax.jvp(lambda q: bridged.apply(q, x), (p,), (t,)))(bridged.params,
                                                                                         tangent)
    variables = _variables_in_param_order(model, bridged)
    with tf.autodiff.ForwardAccumulator(variables, [tf.constant(np.asarray(tangent[k]))
                                                    for k in bridged.params]) as acc:
        y = model(tf.constant(x), training=False)  # eager forward mode does work
    assert_close(jvp_out, acc.jvp(y), what="rolled LSTM jvp")
