"""Every strategy against a brute-force float64 Jacobian, on every architecture of the zoo."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import entk
from entk import algorithms
from tests import jax_models
from tests.reference import assert_close, brute_force_nngp, brute_force_ntk

STRATEGIES = [s for s in ("jc", "ntvp", "sd") if algorithms.is_available(s)]


@functools.lru_cache(maxsize=None)
def case(name, n2=2):
    return jax_models.make(name, n2=n2)


@functools.lru_cache(maxsize=None)
def reference(name, n2, trace_axes, diagonal_axes, same):
    f, params, x1, x2 = case(name, n2)
    compute = jax.jit(lambda p, a, b: brute_force_ntk(f, a, b, p, trace_axes, diagonal_axes))
    return compute(params, x1, None if same else x2)


def jitted(f, *args, **kwargs):
    """`jax.jit(entk.empirical_ntk_fn(f, *args, **kwargs))`: one compile beats eager op-by-op here."""
    return jax.jit(entk.empirical_ntk_fn(f, *args, **kwargs))


@pytest.mark.parametrize("trace_axes", [(), (-1,)], ids=["full", "traced"])
@pytest.mark.parametrize("name", sorted(jax_models.ZOO))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_architecture(strategy, name, trace_axes):
    f, params, x1, x2 = case(name)
    kernel = jitted(f, trace_axes=trace_axes, implementation=strategy)(x1, x2, params)
    assert_close(kernel, reference(name, 2, trace_axes, (), False), what=f"{strategy}/{name}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_eager(strategy):
    f, params, x1, x2 = case("mlp")
    kernel = entk.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation=strategy)(x1, x2, params)
    assert_close(kernel, reference("mlp", 2, (), (), False))


@pytest.mark.parametrize("vmap_axes", [None, 0], ids=["novmap", "vmap0"])
@pytest.mark.parametrize("diagonal_axes", [(), (0,)], ids=["nodiag", "diag0"])
@pytest.mark.parametrize("trace_axes", [(), (-1,)], ids=["full", "traced"])
@pytest.mark.parametrize("name", ["mlp", "conv_nhwc", "embedding"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_axis_grid(strategy, name, trace_axes, diagonal_axes, vmap_axes):
    n2 = 3 if diagonal_axes else 2
    f, params, x1, x2 = case(name, n2)
    fn = jitted(f, trace_axes, diagonal_axes, vmap_axes, strategy)
    assert_close(fn(x1, x2, params), reference(name, n2, trace_axes, diagonal_axes, False),
                 what="x1 vs x2")
    assert_close(fn(x1, None, params), reference(name, n2, trace_axes, diagonal_axes, True),
                 what="x1 vs itself")


@pytest.mark.parametrize("trace_axes, diagonal_axes", [
    ((1,), (2,)), ((2,), (1,)), ((), (0, 1)), ((1, 2), ()), ((), (1,)), ((-1,), (0,)), ((1,), (0,)),
])
@pytest.mark.parametrize("vmap_axes", [None, 0], ids=["novmap", "vmap0"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_multi_axis_outputs(strategy, vmap_axes, trace_axes, diagonal_axes):
    """Outputs of shape (N, A, B) with traced and diagonal inner axes."""
    n2 = 3 if 0 in diagonal_axes else 2
    f, params, x1, x2 = case("multi_axis", n2)
    fn = jitted(f, trace_axes, diagonal_axes, vmap_axes, strategy)
    assert_close(fn(x1, x2, params), reference("multi_axis", n2, trace_axes, diagonal_axes, False))


@pytest.mark.parametrize("trace_axes, diagonal_axes", [((), ()), ((), (0,)), ((-1,), ())],
                         ids=["full", "diag0", "traced"])
@pytest.mark.parametrize("strategy, blocks", [pytest.param(s, True, id=s) for s in STRATEGIES]
                         + [pytest.param("ntvp", False, id="ntvp-columns")])
def test_output_leaves_with_the_batch_elsewhere(strategy, blocks, trace_axes, diagonal_axes,
                                                monkeypatch):
    """`vmap_axes` with a batch axis at another place in each output leaf: free in both leaves (NTVP's
    per-pair path), diagonal in one and free in the other (NTVP's column path). `columns`: NTVP's
    per-example kernels built by columns, as for outputs too large for whole blocks."""
    from entk.algorithms import ntk_vector_products

    if not blocks:
        monkeypatch.setattr(ntk_vector_products, "BLOCK_ENTRIES", 0)
    f0, params, x1, x2 = case("dict_outputs", 3)

    def f(p, x):
        out = f0(p, x)
        return {"logits": out["logits"], "pair": jnp.moveaxis(out["pair"], 0, 1)}   # (2, N, 2)

    fn = jitted(f, trace_axes, diagonal_axes, (0, {"logits": 0, "pair": 1}, {}), strategy)
    expected = brute_force_ntk(f, x1, x2, params, trace_axes, diagonal_axes)
    assert_close(fn(x1, x2, params), expected, what=f"{strategy} x1 vs x2")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_under_jit(strategy):
    f, params, x1, x2 = case("conv_nhwc")
    fn = jitted(f, trace_axes=(), vmap_axes=0, implementation=strategy)
    assert_close(fn(x1, x2, params), reference("conv_nhwc", 2, (), (), False))
    assert_close(fn(x1, None, params), reference("conv_nhwc", 2, (), (), True))


@pytest.mark.parametrize("strategy", STRATEGIES + ["auto"])
def test_float32(strategy):
    f, params, x1, x2 = case("layer_norm")
    to32 = functools.partial(jax.tree_util.tree_map, lambda a: a.astype(jnp.float32))
    kernel = jitted(f, trace_axes=(), implementation=strategy)(to32(x1), to32(x2), to32(params))
    assert kernel.dtype == jnp.float32
    assert_close(kernel, reference("layer_norm", 2, (), (), False), rtol=1e-4)


def test_strategies_parse():
    assert entk.Strategy.parse("jc") is entk.Strategy.JACOBIAN_CONTRACTION
    assert entk.Strategy.parse(2) is entk.Strategy.NTK_VECTOR_PRODUCTS
    assert entk.Strategy.parse("STRUCTURED_DERIVATIVES") is entk.Strategy.STRUCTURED_DERIVATIVES
    assert [int(s) for s in entk.Strategy] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="implementation='fast'"):
        entk.empirical_ntk_fn(lambda p, x: x, implementation="fast")


@pytest.mark.parametrize("implementation", [0, 1, 2, entk.Strategy.NTK_VECTOR_PRODUCTS, "auto"])
def test_implementation_spellings(implementation):
    f, params, x1, x2 = case("mlp")
    kernel = jitted(f, implementation=implementation)(x1, x2, params)
    assert_close(kernel, reference("mlp", 2, (-1,), (), False))


# --- rng and keyword arguments -------------------------------------------------------------------


def _dropout_model():
    f0, params, x1, x2 = case("mlp")

    def f(p, x, rng, rate=0.5):
        keep = jax.random.bernoulli(rng, 1 - rate, (x.shape[0], 5)) / (1 - rate)
        return f0(p, x * keep)

    return f, params, x1, x2


def test_rng_is_split_between_x1_and_x2():
    f, params, x1, x2 = _dropout_model()
    key = jax.random.PRNGKey(3)
    fn = entk.empirical_ntk_fn(f, trace_axes=())
    got = fn(x1, x2, params, rng=key)
    # neural-tangents: x1 keeps the key, x2 gets fold_in(key, 1).
    flat_ref1 = brute_force_ntk(lambda p, x: f(p, x, key), x1, x1, params, ())
    f1 = lambda p, x: f(p, x, key)
    f2 = lambda p, x: f(p, x, jax.random.fold_in(key, 1))
    from jax.flatten_util import ravel_pytree
    flat, unravel = ravel_pytree(params)
    j1 = jax.jacrev(lambda v: f1(unravel(v), x1))(flat)
    j2 = jax.jacrev(lambda v: f2(unravel(v), x2))(flat)
    expected = jnp.einsum("aop,bqp->aboq", j1, j2)
    assert_close(got, expected)
    assert_close(fn(x1, None, params, rng=key), flat_ref1)


def test_tuple_kwargs_go_to_x1_and_x2_separately():
    f, params, x1, x2 = _dropout_model()
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    got = entk.empirical_ntk_fn(lambda p, x, key: f(p, x, key))(x1, x2, params, key=(k1, k2))
    from jax.flatten_util import ravel_pytree
    flat, unravel = ravel_pytree(params)
    j1 = jax.jacrev(lambda v: f(unravel(v), x1, k1))(flat)
    j2 = jax.jacrev(lambda v: f(unravel(v), x2, k2))(flat)
    assert_close(got, jnp.einsum("aop,bop->ab", j1, j2) / 3)


# --- NNGP, kernel_fn, NTK-vector products --------------------------------------------------------


@pytest.mark.parametrize("trace_axes, diagonal_axes", [((-1,), ()), ((), ()), ((), (0,)), ((1,), (2,))])
@pytest.mark.parametrize("name", ["mlp", "dict_outputs", "multi_axis"])
def test_nngp(name, trace_axes, diagonal_axes):
    if name != "multi_axis" and 2 in diagonal_axes:
        pytest.skip("axis 2 exists only for the (N, A, B) model")
    n2 = 3 if diagonal_axes else 2
    f, params, x1, x2 = case(name, n2)
    if name == "dict_outputs" and trace_axes == (1,):
        pytest.skip("dict leaves differ in rank")
    got = entk.empirical_nngp_fn(f, trace_axes, diagonal_axes)(x1, x2, params)
    assert_close(got, brute_force_nngp(f, x1, x2, params, trace_axes, diagonal_axes))


def test_kernel_fn_get():
    f, params, x1, x2 = case("mlp")
    kernel_fn = entk.empirical_kernel_fn(f, implementation="jc")
    both = kernel_fn(x1, x2, None, params)
    assert both._fields == ("nngp", "ntk")
    assert_close(both.ntk, reference("mlp", 2, (-1,), (), False))
    assert_close(both.nngp, brute_force_nngp(f, x1, x2, params))
    assert_close(kernel_fn(x1, x2, "ntk", params), both.ntk)
    reversed_ = kernel_fn(x1, x2, ("ntk", "nngp"), params=params)
    assert reversed_._fields == ("ntk", "nngp")
    with pytest.raises(ValueError, match="unknown kernel 'cov'"):
        kernel_fn(x1, x2, "cov", params)


def test_ntk_vp_fn():
    f, params, x1, x2 = case("multi_axis")
    full = reference("multi_axis", 2, (), (), False)          # (N1, N2, A1, A2, B1, B2)
    v = jax.random.normal(jax.random.PRNGKey(9), f(params, x2).shape, jnp.float64)
    expected = jnp.einsum("mnabcd,nbd->mac", full, v)
    assert_close(entk.empirical_ntk_vp_fn(f, x1, x2, params)(v), expected)


# --- linearize and taylor_expand -----------------------------------------------------------------


def _perturbed(params, scale=0.1, seed=4):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return tree.unflatten([p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


def test_linearize_matches_first_order_formula():
    f, params0, x1, _ = case("layer_norm")
    params = _perturbed(params0)
    from jax.flatten_util import ravel_pytree
    flat0, unravel = ravel_pytree(params0)
    flat, _ = ravel_pytree(params)
    jac = jax.jacrev(lambda v: f(unravel(v), x1))(flat0)
    expected = f(params0, x1) + jac @ (flat - flat0)
    f_lin = entk.linearize(f, params0)
    assert_close(f_lin(params, x1), expected)
    assert_close(f_lin(params0, x1), f(params0, x1))


def test_taylor_expand_degree_two():
    f, params0, x1, _ = case("layer_norm")
    params = _perturbed(params0)
    from jax.flatten_util import ravel_pytree
    flat0, unravel = ravel_pytree(params0)
    flat, _ = ravel_pytree(params)
    d = flat - flat0
    g = lambda v: f(unravel(v), x1)
    expected = g(flat0) + jax.jacfwd(g)(flat0) @ d + 0.5 * jnp.einsum("nopq,p,q->no",
                                                                      jax.hessian(g)(flat0), d, d)
    assert_close(entk.taylor_expand(f, params0, 2)(params, x1), expected)
    assert_close(entk.taylor_expand(f, params0, 1)(params, x1), entk.linearize(f, params0)(params, x1))


def test_taylor_expand_is_exact_for_a_quadratic():
    def f(p, x):  # bilinear in (a, b): degree 2 in the parameters
        return (x @ p["a"]) @ p["b"]

    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    params0 = {"a": jax.random.normal(keys[0], (4, 5)), "b": jax.random.normal(keys[1], (5, 2))}
    params = {"a": jax.random.normal(keys[2], (4, 5)), "b": jax.random.normal(keys[3], (5, 2))}
    x = jnp.arange(12.0).reshape(3, 4) / 10
    assert_close(entk.taylor_expand(f, params0, 2)(params, x), f(params, x))


def test_prepared_call_holds_what_strategies_take_for_granted():
    """`entk.algorithms.call.prepare`: x2 is x1 collapses to None, kwargs split per side, "auto"
    resolved by the batch-independence analysis, output shapes traced once; and the strategies run
    on it agree with brute force."""
    from entk.algorithms.axes import KernelAxes
    from entk.algorithms.call import prepare

    def f(p, x, scale=1.0):
        return scale * jnp.tanh(x @ p["w"])

    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (3, 5))}
    x1, x2 = jnp.ones((4, 3)), jnp.arange(6.0).reshape(2, 3)
    same = prepare(f, x1, x1, params, {"scale": 2.0}, KernelAxes.create((-1,), ()), "auto")
    assert same.x2 is None and same.out2 is same.out1 and same.kwargs1 == {"scale": 2.0}
    assert same.vmap is not None and same.vmap.input_axes(x1) == 0  # independent: per example
    call = prepare(f, x1, x2, params, {"scale": (1.0, 3.0)}, KernelAxes.create((), ()), None)
    assert (call.kwargs1, call.kwargs2) == ({"scale": 1.0}, {"scale": 3.0})
    assert (call.out1.shape, call.out2.shape) == ((4, 5), (2, 5)) and call.vmap is None
    j1 = jax.jacobian(lambda p: f(p, x1, 1.0))(params)["w"].reshape(4, 5, -1)  # brute force
    j2 = jax.jacobian(lambda p: f(p, x2, 3.0))(params)["w"].reshape(2, 5, -1)
    for strategy in ("jc", "ntvp", "sd"):
        kernel = call.run(strategy)
        assert kernel.shape == (4, 2, 5, 5)
        assert_close(kernel, jnp.einsum("nap,mbp->nmab", j1, j2))


@pytest.mark.parametrize("blocks", ["entries", "halves", "entries-looped"])
@pytest.mark.parametrize("name, trace_axes, diagonal_axes", [
    ("mlp", (-1,), ()), ("multi_axis", (1,), (2,)), ("multi_axis", (2,), (1,)),
    ("multi_axis", (1, 2), ()), ("multi_axis", (-1,), (0,)), ("multi_axis", (1,), (0,)),
])
def test_jacobian_contraction_by_traced_blocks(name, trace_axes, diagonal_axes, blocks,
                                               monkeypatch):
    """JC's loop over blocks of traced entries (for Jacobians too large for the cache) gives the
    kernel of the whole Jacobian: forced at every size, one entry per block or half of them, the
    blocks unrolled or in a loop, with the whole-Jacobian path made unavailable."""
    from entk.algorithms import jacobian_contraction

    n2 = 3 if 0 in diagonal_axes else 2
    f, params, x1, x2 = case(name, n2)
    out = jax.eval_shape(f, params, x1)
    traced = np.prod([out.shape[a] for a in trace_axes])
    whole = out.size * sum(p.size for p in jax.tree_util.tree_leaves(params)) * 8
    monkeypatch.setattr(jacobian_contraction, "TRACE_CHUNK_BYTES", 0)
    monkeypatch.setattr(jacobian_contraction, "BLOCK_BYTES", 0 if blocks.startswith("entries")
                        else int(np.ceil(whole / traced * (traced // 2))))
    if blocks.endswith("looped"):
        monkeypatch.setattr(jacobian_contraction, "MAX_UNROLLED_STEPS", 0)

    def whole_jacobian(*args, **kwargs):
        raise AssertionError("the whole Jacobian was built")

    monkeypatch.setattr(jacobian_contraction, "jacobian", whole_jacobian)
    fn = jitted(f, trace_axes, diagonal_axes, 0, "jc")
    assert_close(fn(x1, x2, params), reference(name, n2, trace_axes, diagonal_axes, False),
                 what="x1 vs x2")
    assert_close(fn(x1, None, params), reference(name, n2, trace_axes, diagonal_axes, True),
                 what="x1 vs itself")
