"""`vmap_axes` is verified wherever it is used, and `vmap_axes="auto"` picks per-example only when proven.

Coupled models are refused eagerly, under `jax.jit` and through `entk.ntk` (whose model state is a jit
argument), with an error naming the coupling primitive and the user's source line. Independent models of
the zoo pass the structural proof. Declared per-example keyword arguments and `"auto"` give kernels
equal to the brute-force float64 Jacobian (`tests/reference.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import entk
from entk.algorithms import batch_independence
from entk.algorithms.axes import VmapAxes
from tests import jax_models
from tests.reference import assert_close, brute_force_ntk

RNG = np.random.default_rng(0)
W = jnp.asarray(RNG.standard_normal((4, 3)))
X = jnp.asarray(RNG.standard_normal((5, 4)))
S = jnp.asarray(RNG.standard_normal(5))


def mean_center(p, x):
    h = x @ p
    return h - h.mean(0)


def batch_norm(p, x):
    h = x @ p
    return (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5)


def minus_last(p, x):
    h = jnp.tanh(x @ p)
    return h - h[-1:]


def reverse_cumsum(p, x):
    return lax.cumsum(jnp.tanh(x @ p), axis=0, reverse=True)


def flipped_cumsum(p, x):
    return jnp.cumsum(jnp.tanh(x @ p)[::-1], axis=0)


def fixed_key_dropout(p, x):
    h = jnp.tanh(x @ p)
    keep = jax.random.bernoulli(jax.random.PRNGKey(0), 0.5, h.shape)
    return jnp.where(keep, h / 0.5, 0.0)


def scan_over_batch(p, x):
    _, ys = lax.scan(lambda c, h: (c + h, c + h), jnp.zeros(3, x.dtype), jnp.tanh(x @ p))
    return ys


def per_example_scale(p, x, s):
    return jnp.tanh(x @ p) * s[:, None]


# (model, text the error must contain: the primitive and what it does)
COUPLED = {
    "mean_center": (mean_center, "`reduce_sum` at .*test_batch_independence.py:\\d+.*mean_center.* "
                                 "reduces over the batch axis 0"),
    "batch_norm": (batch_norm, "`reduce_sum` at .*batch_norm.* reduces over the batch axis 0"),
    "minus_last": (minus_last, "`slice` at .*minus_last.* slices \\[4:5:1\\] of the batch axis 0"),
    "reverse_cumsum": (reverse_cumsum, "`cumsum` at .*reverse_cumsum.* accumulates along the batch"),
    "flipped_cumsum": (flipped_cumsum, "`rev` at .*flipped_cumsum.* reverses the batch axis 0"),
    "fixed_key_dropout": (fixed_key_dropout, "`select_n` at .*fixed_key_dropout.* random numbers "
                                             "drawn with one key for the whole batch"),
    "scan_over_batch": (scan_over_batch, "`scan` at .*scan_over_batch.* loops over the batch axis 0"),
}
GENERIC = "couples examples along the batch .* Use vmap_axes=None"


def reference(f, x1, x2, params, **kwargs):
    """Brute-force float64 NTK (no axis traced), compiled: eager Jacobians are slow."""
    return jax.jit(lambda p, a, b, kw: brute_force_ntk(f, a, b, p, trace_axes=(), **kw))(
        params, x1, x2, kwargs)


@pytest.mark.parametrize("mode", ["eager", "jit", "entk.ntk"])
@pytest.mark.parametrize("name", sorted(COUPLED))
def test_coupled_models_are_refused(name, mode):
    f, what = COUPLED[name]
    if mode == "entk.ntk":
        call = functools.partial(entk.ntk, f, X, params=W, vmap_axes=0, implementation="jc")
    else:
        fn = entk.empirical_ntk_fn(f, vmap_axes=0, implementation="jc")
        call = functools.partial(jax.jit(fn) if mode == "jit" else fn, X, None, W)
    with pytest.raises(ValueError, match=GENERIC) as info:
        call()
    assert info.match(what)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_undeclared_per_example_kwarg_is_refused(mode):
    fn = entk.empirical_ntk_fn(per_example_scale, vmap_axes=0, implementation="jc")
    fn = jax.jit(fn) if mode == "jit" else fn
    with pytest.raises(ValueError, match="`mul` at .*per_example_scale.* keyword argument 's' "
                                         "\\(shape \\(5,\\)\\).*declare it: vmap_axes=\\(0, 0, "
                                         "\\{'s': 0\\}\\)"):
        fn(X, None, W, s=S)


@pytest.mark.parametrize("strategy", ["jc", "ntvp", "sd", "auto"])
def test_declared_per_example_kwargs_match_brute_force(strategy):
    vmap = VmapAxes.create((0, 0, {"s": 0}))
    batch_independence.check(per_example_scale, X, W, {"s": S}, vmap)  # eager: proof and probe pass
    fn = entk.empirical_ntk_fn(per_example_scale, trace_axes=(), vmap_axes=(0, 0, {"s": 0}),
                               implementation=strategy)
    expected = reference(per_example_scale, X, None, W, s=S)
    assert_close(jax.jit(fn)(X, None, W, s=S), expected, what=strategy)
    x2, s2 = X[:3] * 0.5, S[:3] + 1.0
    # f treats examples apart, so the x1-x2 block of the kernel of both batches together is the answer.
    both = reference(per_example_scale, jnp.concatenate([X, x2]), None, W, s=jnp.concatenate([S, s2]))
    assert_close(jax.jit(fn)(X, x2, W, s=(S, s2)), both[:5, 5:], what=f"{strategy} x1 vs x2")


@pytest.mark.parametrize("name", sorted(jax_models.ZOO))
def test_zoo_is_proven_independent(name):
    """MLP, CNNs, pooling, attention over tokens, LayerNorm, embedding, scan RNN, dict outputs."""
    f, params, x1, _ = jax_models.make(name)
    in_axes = jax.tree_util.tree_map(lambda _: 0, x1)
    verdict = batch_independence.analyse(f, x1, params, {}, in_axes, {}, lambda *_: "")
    assert verdict.independent, verdict.reason
    assert all(axes == {0} for axes in verdict.out_axes)


def test_analysis_under_jit_and_output_axis():
    """Works on tracers; finds a moved output batch axis and checks the declared one against it."""
    def transposed(p, x):
        return jnp.tanh(x @ p).T

    seen = []

    @jax.jit
    def traced(x, p):
        verdict = batch_independence.analyse(transposed, x, p, {}, 0, {}, lambda *_: "")
        seen.append(verdict)
        return x

    traced(X, W)
    assert seen[0].independent and seen[0].out_axes == (frozenset({1}),)
    kernel = jax.jit(entk.empirical_ntk_fn(transposed, trace_axes=(0,), vmap_axes=(0, 1, {}),
                                           implementation="jc"))(X, None, W)
    assert_close(kernel, brute_force_ntk(transposed, X, None, W, trace_axes=(0,)))
    square = jnp.asarray(RNG.standard_normal((4, 4)))
    with pytest.raises(ValueError, match="carries the batch on axis 1, not on axis 0"):
        entk.empirical_ntk_fn(lambda p, x: jnp.tanh(x @ p).T, vmap_axes=0)(X[:4], None, square)


def test_probe_catches_what_structure_cannot():
    """A constant computed from the batch size is invisible to the proof; the probe sees it."""
    def times_batch_size(p, x):
        return jnp.tanh(x @ p) * x.shape[0]

    with pytest.raises(ValueError, match="one example at a time differs .* couples examples along "
                                         "the batch"):
        entk.empirical_ntk_fn(times_batch_size, vmap_axes=0)(X, None, W)
    assert batch_independence.auto_vmap_axes(times_batch_size, X, None, W, {}, {}) is None


@pytest.mark.parametrize("name", ["mlp", "scan_rnn"])
def test_auto_chooses_per_example_for_independent_models(name):
    f, params, x1, x2 = jax_models.make(name)
    assert batch_independence.auto_vmap_axes(f, x1, x2, params, {}, {}) == VmapAxes(0, 0, {})
    kernel = jax.jit(entk.empirical_ntk_fn(f, trace_axes=(), vmap_axes="auto", implementation="jc"))(
        x1, x2, params)
    assert_close(kernel, reference(f, x1, x2, params))


@pytest.mark.parametrize("name", ["batch_norm", "minus_last", "fixed_key_dropout"])
def test_auto_falls_back_to_the_whole_batch_for_coupled_models(name):
    f = COUPLED[name][0]
    assert batch_independence.auto_vmap_axes(f, X, None, W, {}, {}) is None
    expected = reference(f, X, None, W)
    for strategy in ("jc", "ntvp"):
        fn = entk.empirical_ntk_fn(f, trace_axes=(), vmap_axes="auto", implementation=strategy)
        assert_close(jax.jit(fn)(X, None, W), expected, what=f"{name}/{strategy}")


def test_auto_with_undeclared_kwarg_falls_back():
    assert batch_independence.auto_vmap_axes(per_example_scale, X, None, W, {"s": S}, {"s": S}) is None
    fn = entk.empirical_ntk_fn(per_example_scale, trace_axes=(), vmap_axes="auto", implementation="jc")
    assert_close(jax.jit(fn)(X, None, W, s=S), reference(per_example_scale, X, None, W, s=S))


@pytest.mark.parametrize("name", ["mlp", "batch_norm"])
def test_entk_ntk_defaults_to_auto(name):
    """entk.ntk: vmap_axes defaults to "auto" (decided under jit, by the proof alone), exact both ways."""
    f, params, x1, x2 = (jax_models.make("mlp") if name == "mlp"
                         else (batch_norm, W, X, X[:3] * 0.5))
    kernel = entk.ntk(f, x1, x2, params=params, trace_axes=())
    assert_close(kernel, reference(f, x1, x2, params), what=name)


def test_vmap_axes_rejects_unknown_strings():
    with pytest.raises(TypeError, match="must be None, \"auto\", an int"):
        entk.empirical_ntk_fn(mean_center, vmap_axes="per-example")


def _callback_model(host_fn):
    def f(p, x):
        h = x @ p
        return jax.pure_callback(host_fn, jax.ShapeDtypeStruct(h.shape, h.dtype), h,
                                 vmap_method="sequential")
    return f


def test_opaque_primitive_is_probed_eagerly_and_warned_under_jit():
    """A call the proof cannot see into: the numerical probe decides when values are concrete."""
    independent = _callback_model(np.tanh)
    coupled = _callback_model(lambda h: h - h.mean(0))
    vmap = VmapAxes.create(0)
    batch_independence.check(independent, X, W, {}, vmap)
    with pytest.raises(ValueError, match="one example at a time differs .*`pure_callback` at .* has "
                                         "no batch-independence rule"):
        batch_independence.check(coupled, X, W, {}, vmap)
    with pytest.warns(batch_independence.UnverifiedVmapAxesWarning, match="pure_callback"):
        jax.jit(lambda x, p: batch_independence.check(coupled, x, p, {}, vmap) or x)(X, W)
    assert batch_independence.auto_vmap_axes(independent, X, None, W, {}, {}) is None


def _verdict(f, x=X, params=W):
    return batch_independence.analyse(f, x, params, {}, 0, {}, lambda *_: "")


# Structural rules, one line each: (f(p, x) with x (5, 4), p (4, 3), the coupling primitive or None).
RULE_CASES = {
    "gram": (lambda p, x: x @ x.T @ jnp.ones((5, 3)), "dot_general"),
    "gather_rows": (lambda p, x: jnp.tanh(x @ p)[jnp.array([1, 0, 2, 3, 4])], "gather"),
    "concat_batch": (lambda p, x: jnp.concatenate([x, x]) @ p, "concatenate"),
    "sort_batch": (lambda p, x: jnp.sort(x @ p, axis=0), "sort"),
    "roll_batch": (lambda p, x: jnp.roll(x @ p, 1, axis=0), "slice"),
    "stack_mismatched": (lambda p, x: jnp.stack([x @ p @ jnp.ones((3, 5)), (x @ p @ jnp.ones((3, 5))).T],
                                                 axis=1)[:, 0, :3], "stack"),
    "conv_over_batch": (lambda p, x: lax.conv_general_dilated(
        (x @ p)[None], jnp.ones((3, 3, 2)), (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))[0],
        "conv_general_dilated"),
    "while_any": (lambda p, x: lax.while_loop(lambda h: jnp.any(h < 10.0), lambda h: h * 2.0,
                                              jnp.abs(x @ p) + 1.0), "reduce_or"),
    "arange": (lambda p, x: (x @ p) * jnp.arange(5.0)[:, None], "mul"),
    "captured_varying": (lambda p, x: x @ p + np.arange(15.0).reshape(5, 3), "add"),
    # independent
    "gather_features": (lambda p, x: (x @ p)[:, jnp.array([2, 0])], None),
    "take_along": (lambda p, x: jnp.take_along_axis(x @ p, jnp.argsort(x @ p, axis=1), axis=1), None),
    "scatter_features": (lambda p, x: (x @ p).at[:, 0].set(0.0), None),
    "one_hot": (lambda p, x: jax.nn.one_hot(jnp.argmax(x @ p, -1), 3) * (x @ p), None),
    "merge_reshape": (lambda p, x: (x.reshape(10, 2) @ p[:2]).reshape(5, 6)[:, :3], None),
    "cond": (lambda p, x: lax.cond(True, lambda h: h * 2.0, jnp.sin, x @ p), None),
    "while_fixed": (lambda p, x: lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h) + i, x @ p), None),
    "per_example_keys": (lambda p, x: jax.vmap(lambda k, h: jax.random.bernoulli(k, 0.5, h.shape) * h)(
        jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(0), x[:, 0].astype(jnp.int32)),
        x @ p), None),
    "stack_features": (lambda p, x: jnp.stack([x @ p, jnp.sin(x @ p)], axis=2).reshape(5, 6), None),
    "stack_leading": (lambda p, x: jnp.stack([x @ p, 2.0 * x @ p, jnp.ones((5, 3))]).sum(0), None),
    "pad_features": (lambda p, x: jnp.pad(x @ p, ((0, 0), (1, 1))), None),
    "cumsum_features": (lambda p, x: jnp.cumsum(x @ p, axis=1), None),
    # a baked-in constant that is the same for every example (a translated RNN's zero state)
    "captured_uniform": (lambda p, x: x @ p + np.zeros((5, 3)), None),
    # rows looked up with ids broadcast over the batch (BERT's token-type embeddings)
    "broadcast_ids_lookup": (lambda p, x: x @ p + p[jnp.broadcast_to(jnp.array([1]), (x.shape[0],))],
                             None),
}


@pytest.mark.parametrize("name", sorted(RULE_CASES))
def test_structural_rules(name):
    f, coupling = RULE_CASES[name]
    verdict = _verdict(f)
    if coupling is None:
        assert verdict.independent, verdict.reason
        assert verdict.out_axes == (frozenset({0}),)
    else:
        assert not verdict.independent and not verdict.opaque
        assert verdict.reason.startswith(f"`{coupling}` at "), verdict.reason
