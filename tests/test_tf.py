"""TensorFlow / Keras adapter: tf2jax translation, the JAX-backend Keras path, bridge mode, to_tf.

References are TensorFlow itself: model outputs, and eNTKs from `tf.GradientTape` Jacobians contracted
by hand (`tf_reference_ntk`), all in float64.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import pytest

import entk
from entk import algorithms

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("tf2jax")

if keras.backend.backend() != "tensorflow":
    pytest.skip("these tests need Keras on the TensorFlow backend", allow_module_level=True)

from entk.adapters.tf import from_tf, to_tf  # noqa: E402
from entk.adapters.tf.translate import TranslationError  # noqa: E402

L = keras.layers
STRATEGIES = [s for s in ("jc", "ntvp", "sd") if algorithms.is_available(s)]
SD_MISSING = "structured derivatives (entk.algorithms.structured) are not in this build yet"


def _has_bridge() -> bool:
    try:
        from entk.adapters.tf.bridge import bridge_model  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# References


def tf_reference_ntk(model, x1, x2):
    """Θ(x1, x2) with the last output axis traced: Σ_v J1_v J2_vᵀ / O from GradientTape Jacobians."""
    def jacobians(x):
        x = tf.convert_to_tensor(x)
        with tf.GradientTape(persistent=True) as tape:
            y = model(x, training=False)
        try:
            jac = tape.jacobian(y, model.trainable_variables,
                                unconnected_gradients=tf.UnconnectedGradients.ZERO)
        except (ValueError, NotImplementedError, tf.errors.InvalidArgumentError):
            jac = tape.jacobian(y, model.trainable_variables, experimental_use_pfor=False,
                                unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return y.shape, [np.reshape(j.numpy(), (y.shape[0], y.shape[1], -1)) for j in jac]

    (n1, o), j1 = jacobians(x1)
    (n2, _), j2 = jacobians(x2)
    kernel = sum(np.einsum("aop,bop->ab", a, b) for a, b in zip(j1, j2))
    return kernel / o


def assert_rel(actual, expected, tol, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = float(np.max(np.abs(expected)))
    err = float(np.max(np.abs(actual - expected)))
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} × scale {scale:.3g}"


# ----------------------------------------------------------------------------------------------
# Models (module scope: TF is slow to trace, JAX to compile)


def _dense():
    inputs = keras.Input((5,))
    h = L.Dense(8, activation="tanh")(inputs)
    return keras.Model(inputs, L.Dense(3)(h), name="dense_net")


def _conv_bn_pool():
    inputs = keras.Input((8, 8, 2))
    h = L.Conv2D(4, 3, padding="same")(inputs)
    h = L.BatchNormalization()(h)
    h = L.Activation("relu")(h)
    h = L.MaxPooling2D()(h)
    h = L.Conv2D(3, 3)(h)
    h = L.AveragePooling2D(2)(h)
    return keras.Model(inputs, L.Dense(2)(L.Flatten()(h)), name="conv_bn_pool")


def _depthwise_layernorm():
    inputs = keras.Input((6, 6, 3))
    h = L.DepthwiseConv2D(3, depth_multiplier=2)(inputs)
    h = L.LayerNormalization()(h)
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, L.Dense(2)(h), name="depthwise_ln")


def _attention():
    inputs = keras.Input((4, 6))
    h = L.MultiHeadAttention(num_heads=2, key_dim=3)(inputs, inputs)
    return keras.Model(inputs, L.Dense(2)(L.Flatten()(h)), name="attention")


def _embedding_lstm():
    inputs = keras.Input((4,), dtype="int32")
    h = L.Embedding(10, 3)(inputs)
    h = L.LSTM(3)(h)
    return keras.Model(inputs, L.Dense(2)(h), name="embedding_lstm")


BUILDERS = {"dense": _dense, "conv_bn_pool": _conv_bn_pool, "depthwise_ln": _depthwise_layernorm,
            "attention": _attention, "embedding_lstm": _embedding_lstm}


@pytest.fixture(scope="module", autouse=True)
def float64_keras():
    # Keras caches its global dtype policy on first use, so set it too (not only floatx).
    old_floatx, old_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_floatx(old_floatx)
    keras.config.set_dtype_policy(old_policy)


def _inputs(model, n, seed):
    rng = np.random.default_rng(seed)
    shape = (n,) + tuple(model.inputs[0].shape[1:])
    if model.inputs[0].dtype.startswith("int"):
        return rng.integers(0, 10, shape).astype(np.int32)
    return rng.standard_normal(shape)


@pytest.fixture(scope="module")
def zoo(float64_keras):
    """name -> (keras model, entk model, x1, x2, TF reference eNTK)."""
    out = {}
    for name, build in BUILDERS.items():
        model = build()
        for v in model.non_trainable_variables:  # non-trivial BatchNorm statistics
            if v.dtype == "float64":
                v.assign(np.random.default_rng(1).uniform(0.5, 1.5, v.shape))
        x1, x2 = _inputs(model, 3, 0), _inputs(model, 2, 1)
        out[name] = (model, from_tf(model, x1), x1, x2, tf_reference_ntk(model, x1, x2))
    return out


@pytest.fixture(scope="module")
def ntk_fns():
    """(name, strategy, vmap) -> jitted ntk_fn, compiled once."""
    cache = {}

    def get(model, name, strategy, vmap_axes=None):
        key = (name, strategy, vmap_axes)
        if key not in cache:
            cache[key] = jax.jit(entk.empirical_ntk_fn(model, implementation=strategy,
                                                       vmap_axes=vmap_axes))
        return cache[key]

    return get


# ----------------------------------------------------------------------------------------------
# Keras on the TensorFlow backend, translated with tf2jax


@pytest.mark.parametrize("name", list(BUILDERS))
def test_outputs_match_tf(zoo, name):
    model, converted, x1, x2, _ = zoo[name]
    assert converted.source == "keras" and converted.info["mode"] == "tf2jax"
    assert all(p.dtype == np.float64 for p in converted.params.values())
    for x in (x1, x2):
        assert_rel(converted(x), model(x, training=False).numpy(), 1e-6, name)


# JC and SD on every model; NTVP (forward-over-reverse) on the BatchNorm and the loop models.
CASES = ([(name, "jc") for name in BUILDERS] + [("conv_bn_pool", "ntvp"), ("embedding_lstm", "ntvp")]
         + [(name, "sd") for name in BUILDERS])


@pytest.mark.parametrize("name,strategy", CASES)
def test_ntk_matches_tf_reference(zoo, ntk_fns, name, strategy):
    if strategy not in STRATEGIES:
        pytest.skip(SD_MISSING)
    model, converted, x1, x2, reference = zoo[name]
    kernel = ntk_fns(converted, name, strategy)(x1, x2, converted.params)
    assert_rel(kernel, reference, 1e-10, f"{name}/{strategy}")


def test_ntk_per_example(zoo, ntk_fns):
    """vmap_axes=0: the model is run one example at a time (a new input shape, translated once)."""
    name = "embedding_lstm"
    model, converted, x1, x2, reference = zoo[name]
    kernel = ntk_fns(converted, name, "jc", 0)(x1, x2, converted.params)
    assert_rel(kernel, reference, 1e-10, f"{name}/vmap")


def test_params_are_trainable_state_is_not(zoo):
    model, converted, *_ = zoo["conv_bn_pool"]
    assert set(converted.params) == {v.path for v in model.trainable_variables}
    assert set(converted.state) == {v.path for v in model.non_trainable_variables}
    assert any("moving_mean" in k for k in converted.state)
    assert not any("moving" in k for k in converted.params)
    bn = next(v for v in model.non_trainable_variables if "moving_variance" in v.path)
    np.testing.assert_array_equal(converted.state[bn.path], bn.numpy())


def test_conversion_is_cached_and_follows_weights(float64_keras):
    model = _dense()
    x = _inputs(model, 3, 0)
    first = from_tf(model, x)
    assert from_tf(model, x) is first
    assert from_tf(model, _inputs(model, 5, 2)) is first  # other shapes: translated on first use
    count = first.apply_with_state.translation_count()
    first(x)
    assert first.apply_with_state.translation_count() == count
    kernel = model.trainable_variables[0]
    kernel.assign(kernel.numpy() * 2.0)
    second = from_tf(model, x)
    assert second is not first and second.apply_with_state is first.apply_with_state
    np.testing.assert_array_equal(second.params[kernel.path], kernel.numpy())
    assert_rel(second(x), model(x).numpy(), 1e-12)


def test_keras_application_outputs(float64_keras):
    model = keras.applications.MobileNet(input_shape=(32, 32, 3), alpha=0.25, weights=None, classes=4)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3))
    converted = from_tf(model, x, mode="tf2jax")
    assert converted.info["param_count"] == sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert len(converted.state) == len(model.non_trainable_variables) > 0
    assert_rel(converted(x), model(x, training=False).numpy(), 1e-6)


# ----------------------------------------------------------------------------------------------
# tf.function with tf.Variables


@pytest.fixture(scope="module")
def tf_function_model():
    rng = np.random.default_rng(3)
    w1 = tf.Variable(rng.standard_normal((4, 6)), name="w1")
    b1 = tf.Variable(rng.standard_normal(6), name="b")
    w2 = tf.Variable(rng.standard_normal((6, 2)), name="w2")
    b2 = tf.Variable(rng.standard_normal(2), name="b")  # same name as b1: keys made unique
    scale = tf.Variable(rng.uniform(0.5, 1.5, 6), trainable=False, name="scale")

    @tf.function
    def fn(x):
        return tf.matmul(tf.sin(tf.matmul(x, w1) + b1) * scale, w2) + b2

    return fn, [w1, b1, w2, b2], scale


def test_tf_function(tf_function_model, ntk_fns):
    fn, trainable, scale = tf_function_model
    x1, x2 = np.random.default_rng(4).standard_normal((3, 4)), np.ones((2, 4))
    converted = from_tf(fn, x1)
    assert converted.source == "tf"
    assert sorted(converted.params) == ["b", "b_1", "w1", "w2"] and list(converted.state) == ["scale"]
    assert_rel(converted(x2), fn(x2).numpy(), 1e-12)

    class Wrapped:  # GradientTape reference over the function's variables
        trainable_variables = trainable

        def __call__(self, x, training=False):
            return fn(x)

    kernel = ntk_fns(converted, "tf_function", "jc")(x1, x2, converted.params)
    assert_rel(kernel, tf_reference_ntk(Wrapped(), x1, x2), 1e-10)


def test_tf_function_loops(ntk_fns):
    """A loop with a static trip count becomes lax.scan (reverse mode works); a data-dependent one
    is refused in tf2jax mode, naming the loop."""
    w = tf.Variable(np.random.default_rng(6).standard_normal((3, 3)) * 0.5, name="w_loop")

    @tf.function
    def three_steps(x):
        for _ in tf.range(3):
            x = tf.tanh(tf.matmul(x, w))
        return x

    x1, x2 = np.random.default_rng(7).standard_normal((2, 3)), np.ones((1, 3))
    converted = from_tf(three_steps, x1, mode="tf2jax")

    class Wrapped:
        trainable_variables = [w]

        def __call__(self, x, training=False):
            return three_steps(x)

    kernel = ntk_fns(converted, "three_steps", "jc")(x1, x2, converted.params)
    assert_rel(kernel, tf_reference_ntk(Wrapped(), x1, x2), 1e-10)

    @tf.function
    def halve_until_small(x):
        return tf.while_loop(lambda y: tf.reduce_max(tf.abs(y)) > 0.1, lambda y: (y * 0.5,),
                             (tf.matmul(x, w),))[0]

    with pytest.raises(TranslationError, match=r"while loop .* depends on the inputs.*mode='bridge'"):
        from_tf(halve_until_small, x1, mode="tf2jax")


# ----------------------------------------------------------------------------------------------
# entk.ntk on Keras models; to_tf


def test_entk_ntk_tf_and_numpy_in_same_kind_out(zoo):
    model, converted, x1, x2, reference = zoo["dense"]
    out = entk.ntk(model, tf.constant(x1), tf.constant(x2), implementation="jc")
    assert isinstance(out, tf.Tensor) and out.dtype == tf.float64
    assert_rel(out.numpy(), reference, 1e-10)
    out = entk.ntk(model, x1, x2, implementation="jc")
    assert isinstance(out, np.ndarray)
    assert_rel(out, reference, 1e-10)


def test_to_tf_round_trip(zoo, ntk_fns):
    model, converted, x1, x2, reference = zoo["dense"]
    ntk_fn = entk.empirical_ntk_fn(converted, implementation="jc")
    tf_kernel = to_tf(ntk_fn, converted.params)
    out = tf_kernel(tf.constant(x1), tf.constant(x2))
    assert isinstance(out, tf.Tensor) and out.dtype == tf.float64
    jax_kernel = np.asarray(ntk_fns(converted, "dense", "jc")(x1, x2, converted.params))
    np.testing.assert_allclose(out.numpy(), jax_kernel, rtol=1e-12, atol=1e-14)
    assert_rel(out.numpy(), reference, 1e-10)
    same = tf_kernel(tf.constant(x1))  # x2=None: the kernel of x1 with itself
    np.testing.assert_allclose(same.numpy(), tf_kernel(tf.constant(x1), tf.constant(x1)).numpy(),
                               rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# Errors and the bridge fallback


class Dawson(L.Layer):
    """A layer whose op (`Dawsn`) tf2jax does not translate, with a trainable scale."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return tf.math.special.dawsn(x * self.scale)


@pytest.fixture(scope="module")
def dawson_model(float64_keras):
    inputs = keras.Input((3,))
    h = Dawson(name="dawson")(L.Dense(4)(inputs))
    return keras.Model(inputs, L.Dense(2)(h))


def test_untranslatable_layer_is_named(dawson_model):
    x = np.ones((2, 3))
    with pytest.raises(TranslationError, match=r"'Dawsn'.*layer 'dawson' \(Dawson\).*mode='bridge'"):
        from_tf(dawson_model, x, mode="tf2jax")


def test_auto_falls_back_to_bridge_with_one_warning(dawson_model):
    if not _has_bridge():
        pytest.skip("entk.adapters.tf.bridge is not in this build yet")
    x1, x2 = np.random.default_rng(5).standard_normal((3, 3)), np.ones((2, 3))
    with pytest.warns(UserWarning, match=r"layer 'dawson' \(Dawson\), TF op 'Dawsn'") as record:
        converted = from_tf(dawson_model, x1)
    assert len([w for w in record if "tf2jax could not translate" in str(w.message)]) == 1
    assert converted.capabilities == frozenset({"jc", "ntvp"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert from_tf(dawson_model, x1) is converted  # cached: no second warning
    kernel = jax.jit(entk.empirical_ntk_fn(converted, implementation="jc"))(x1, x2, converted.params)
    assert_rel(kernel, tf_reference_ntk(dawson_model, x1, x2), 1e-10)


def test_bridge_mode_matches_translation(zoo, ntk_fns):
    if not _has_bridge():
        pytest.skip("entk.adapters.tf.bridge is not in this build yet")
    model, _, x1, x2, reference = zoo["dense"]
    bridged = from_tf(model, x1, mode="bridge")
    assert bridged.info["mode"] == "bridge" and bridged.capabilities == frozenset({"jc", "ntvp"})
    for strategy in ("jc", "ntvp"):
        kernel = ntk_fns(bridged, "dense-bridge", strategy)(x1, x2, bridged.params)
        assert_rel(kernel, reference, 1e-10, strategy)


def test_unbuilt_model_error(float64_keras):
    model = keras.Sequential([L.Dense(3)])
    with pytest.raises(ValueError, match=r"(?i)not been built.*call it once.*input shape"):
        from_tf(model, np.ones((2, 4)))


def test_integer_trainable_variable_error(float64_keras):
    class Counter(L.Layer):
        def build(self, input_shape):
            self.count = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=True)

        def call(self, x):
            return x * tf.cast(self.count + 1, x.dtype)

    inputs = keras.Input((2,))
    model = keras.Model(inputs, Counter(name="counter")(inputs))
    with pytest.raises(ValueError, match=r"counter/.*int32.*only floating-point.*trainable=False"):
        from_tf(model, np.ones((1, 2)))


def test_unknown_mode_error(zoo):
    with pytest.raises(ValueError, match="mode='torch'"):
        from_tf(zoo["dense"][0], zoo["dense"][2], mode="torch")


# ----------------------------------------------------------------------------------------------
# Keras on the JAX backend (a subprocess: Keras picks its backend at import)


KERAS_JAX_SCRIPT = textwrap.dedent("""
    import os
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import keras
    import numpy as np
    import entk

    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    keras.utils.set_random_seed(0)
    x1 = np.random.default_rng(2).standard_normal((3, 4))
    x2 = np.random.default_rng(3).standard_normal((2, 4))

    def ntk(converted, strategy):
        return entk.empirical_ntk_fn(converted, implementation=strategy)(x1, x2, converted.params)

    def rel_err(a, b):
        return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))

    # 1. Dense layers, against the same network written out by hand (Jacobians by jax.jacrev).
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(5, activation="relu")(inputs)))
    converted = entk.from_tf(model, x1)
    assert converted.info["mode"] == "keras_jax" and converted.source == "keras", converted.info
    assert converted.capabilities == {"jc", "ntvp", "sd"}
    k0, b0, k1, b1 = [v.path for v in model.trainable_variables]

    def by_hand(p, x):
        return jnp.maximum(x @ p[k0] + p[b0], 0.0) @ p[k1] + p[b1]

    params = {k: jnp.asarray(v) for k, v in converted.params.items()}
    np.testing.assert_allclose(converted(x1), by_hand(params, x1), rtol=1e-12)
    j1, j2 = jax.jacrev(by_hand)(params, x1), jax.jacrev(by_hand)(params, x2)
    ref = sum(np.reshape(j1[k], (6, -1)) @ np.reshape(j2[k], (4, -1)).T for k in params)
    ref = np.einsum("aobo->ab", ref.reshape(3, 2, 2, 2)) / 2
    for strategy in ("jc", "ntvp"):
        assert rel_err(ntk(converted, strategy), ref) < 1e-10, strategy

    # 2. BatchNormalization: statistics are state; inference mode (Keras is the output reference:
    #    its JAX backend computes BatchNorm in float32 even for float64 models).
    h = keras.layers.BatchNormalization()(keras.layers.Dense(5)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    for v in model.non_trainable_variables:
        v.assign(np.random.default_rng(1).uniform(0.5, 1.5, v.shape))
    converted = entk.from_tf(model, x1)
    assert set(converted.state) == {v.path for v in model.non_trainable_variables}
    assert set(converted.params) == {v.path for v in model.trainable_variables}
    np.testing.assert_allclose(converted(x1), model(x1, training=False), rtol=1e-12)
    print("OK")
""")


def test_keras_jax_backend_subprocess():
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", KERAS_JAX_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
