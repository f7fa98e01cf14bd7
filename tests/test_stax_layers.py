"""entk.stax layers beyond the basic set (issue 16): more nonlinearities, `Elementwise`,
`FanInProd`, `repeat`, `Index`, `Aggregate`, `ConvLocal`, `ConvTranspose`, `ImageResize`,
`GlobalSelfAttention`, `DotGeneral`.

- against neural-tangents 0.6.5 (tests/data/stax_layers_nt065.*, written by
  tests/data/stax_layers_generate.py with the neural-tangents virtualenv), float64, ≤ 1e-6
  relative, with `x2` given and `x2=None`;
- closed forms against NumPy Gauss–Hermite / polar quadrature of the nonlinearity itself
  (independent of both libraries);
- `repeat` against the unrolled `serial`; `Index`, `Aggregate`, `ConvLocal`, `ConvTranspose`,
  `ImageResize`, `DotGeneral` against the empirical NTK of a network with one parameterised
  layer (exact at any width); finite networks (`apply_fn`) against the analytic kernels with
  `entk.monte_carlo_kernel_fn`;
- errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import entk
from entk import stax
from tests.data import stax_spec
from tests.data.stax_spec import _erf_nngp
from tests.gaussian_quadrature import first_layer_cov, gauss_hermite, polar, rel_err

DATA = Path(__file__).resolve().parent / "data"
SPEC = json.loads((DATA / "stax_layers_nt065.json").read_text())
ARRAYS = dict(np.load(DATA / "stax_layers_nt065.npz"))


# ----------------------------------------------------------------------------------------------
# neural-tangents 0.6.5


@pytest.mark.parametrize("case", sorted(SPEC))
def test_matches_neural_tangents(case):
    _, _, kernel_fn = stax_spec.build(stax, SPEC[case]["net"])
    x1, x2 = ARRAYS[f"{case}/x1"], ARRAYS[f"{case}/x2"]
    assert x1.dtype == np.float64
    kw_pair = kw_self = {}
    if "pattern" in SPEC[case]:  # graph networks: Aggregate's adjacency per example
        p1, p2 = ARRAYS[f"{case}/pattern1"], ARRAYS[f"{case}/pattern2"]
        kw_pair, kw_self = {"pattern": (p1, p2)}, {"pattern": (p1, None)}
    runs = [("", x2, kw_pair)]
    if not SPEC[case].get("pair_only"):
        runs.append(("_self", None, kw_self))
    for suffix, second, kwargs in runs:
        k = kernel_fn(x1, second, ("nngp", "ntk"), **kwargs)
        for name in ("nngp", "ntk"):
            expected = ARRAYS[f"{case}/{name}{suffix}"]
            got = getattr(k, name)
            assert got.shape == expected.shape and got.dtype == jnp.float64, (case, name, suffix)
            assert rel_err(got, expected) <= 1e-6, (case, name, suffix, rel_err(got, expected))


def test_reference_covers_every_new_layer():
    def names(net):
        for name, arg in net:
            yield name
            if name == "parallel":
                for branch in arg:
                    yield from names(branch)
            elif name == "repeat":
                yield from names(arg["net"])

    used = {n for case in SPEC.values() for n in names(case["net"])}
    new = {"Sign", "Exp", "ExpNormalized", "Gaussian", "Cos", "Rbf", "Sigmoid_like", "Monomial",
           "RectifiedMonomial", "Polynomial", "Hermite", "Gabor", "Elementwise", "FanInProd",
           "repeat", "Index", "Aggregate", "ConvLocal", "ConvTranspose",
           "ImageResize", "GlobalSelfAttention", "DotGeneral"}
    assert new <= used, new - used


# ----------------------------------------------------------------------------------------------
# Closed forms against quadrature of φ itself
#
# After `Dense(W_STD, B_STD)` the pre-activations have covariance q (computed here by hand); the
# layer maps it to nngp = E[φ(u)φ(v)] and ntk = q12·E[φ'(u)φ'(v)].

RNG = np.random.RandomState(1)
X1 = RNG.normal(size=(4, 5))
X2 = RNG.normal(size=(3, 5))
W_STD, B_STD = 1.1, 0.3


def _sigmoid_like(x):
    return 0.5 * scipy.special.erf(x / 2.4020563531719796) + 0.5


def _step(x):
    return (x >= 0).astype(float)


# name: (layer, φ, φ', quadrature: "hermite" or the polar degree of φφ / φ'φ')
CLOSED_FORMS = {
    "exp": (stax.Exp(0.7, 0.5), lambda x: 0.7 * np.exp(0.5 * x),
            lambda x: 0.35 * np.exp(0.5 * x), "hermite"),
    "gaussian": (stax.Gaussian(1.2, -0.6), lambda x: 1.2 * np.exp(-0.6 * x ** 2),
                 lambda x: -1.44 * x * np.exp(-0.6 * x ** 2), "hermite"),
    "cos": (stax.Cos(0.8, 1.1, 0.2), lambda x: 0.8 * np.cos(1.1 * x + 0.2),
            lambda x: -0.88 * np.sin(1.1 * x + 0.2), "hermite"),
    "rbf": (stax.Rbf(0.7), lambda x: np.sqrt(2) * np.sin(np.sqrt(1.4) * x + np.pi / 4),
            lambda x: np.sqrt(2.8) * np.cos(np.sqrt(1.4) * x + np.pi / 4), "hermite"),
    "gabor": (stax.Gabor(), lambda x: np.exp(-x ** 2) * np.sin(x),
              lambda x: np.exp(-x ** 2) * (np.cos(x) - 2 * x * np.sin(x)), "hermite"),
    "sigmoid_like": (stax.Sigmoid_like(), _sigmoid_like,
                     lambda x: np.exp(-(x / 2.4020563531719796) ** 2) / (2.4020563531719796
                                                                          * np.sqrt(np.pi)),
                     "hermite"),
    "polynomial": (stax.Polynomial([0.3, -0.5, 0.2, 0.1]),
                   lambda x: 0.3 - 0.5 * x + 0.2 * x ** 2 + 0.1 * x ** 3,
                   lambda x: -0.5 + 0.4 * x + 0.3 * x ** 2, "hermite"),
    "monomial_6": (stax.Monomial(6), lambda x: x ** 6, lambda x: 6 * x ** 5, "hermite"),
    "elementwise_fn_nngp_fn": (  # NTK by autodiff of nngp_fn
        stax.Elementwise(jax.scipy.special.erf, _erf_nngp), scipy.special.erf,
        lambda x: 2 / np.sqrt(np.pi) * np.exp(-x ** 2), "hermite"),
    "rectified_monomial_2": (stax.RectifiedMonomial(2), lambda x: _step(x) * x ** 2,
                             lambda x: _step(x) * 2 * x, (4, 2)),
    "rectified_monomial_3": (stax.RectifiedMonomial(3), lambda x: _step(x) * x ** 3,
                             lambda x: _step(x) * 3 * x ** 2, (6, 4)),
    "rectified_monomial_0": (stax.RectifiedMonomial(0), _step, None, (0, None)),
    "sign": (stax.Sign(), np.sign, None, (0, None)),
}


@pytest.fixture(scope="module")
def closed_form_kernels():
    """Every layer of CLOSED_FORMS after one Dense layer, in one compiled network."""
    names = sorted(CLOSED_FORMS)
    _, _, kernel_fn = stax.serial(stax.Dense(8, W_std=W_STD, b_std=B_STD), stax.FanOut(len(names)),
                                  stax.parallel(*[CLOSED_FORMS[n][0] for n in names]))
    return dict(zip(names, kernel_fn(X1, X2)))


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_closed_forms_match_quadrature(name, closed_form_kernels):
    _, phi, dphi, method = CLOSED_FORMS[name]
    k = closed_form_kernels[name]
    q12, q11, q22 = np.broadcast_arrays(*first_layer_cov(X1, X2, W_STD, B_STD))
    if method == "hermite":
        nngp = gauss_hermite(phi, phi, q12, q11, q22, deg=150)
        dot = gauss_hermite(dphi, dphi, q12, q11, q22, deg=150)
        tol = 1e-10
    else:
        nngp = polar(phi, phi, q12, q11, q22, method[0], points=100_000)
        dot = (np.zeros_like(q12) if dphi is None
               else polar(dphi, dphi, q12, q11, q22, method[1], points=100_000))
        tol = 1e-4 if dphi is None or method[1] == 0 else 1e-8  # jumps limit the trapezoid rule
    assert rel_err(k.nngp, nngp) < tol
    if dphi is None:  # φ' = 0 almost everywhere: neural-tangents' zero NTK
        assert np.all(np.asarray(k.ntk) == 0)
    else:
        assert rel_err(np.asarray(k.ntk) / q12, dot) < tol


def test_hermite_is_exact_for_unit_variance():
    """Hermite's kernel q12^n holds for unit variances: inputs with mean square 1 through
    Dense(W_std² + b_std² = 1)."""
    x = X1 / np.sqrt(np.mean(X1 ** 2, -1, keepdims=True))
    q12 = 0.64 * x @ x.T / x.shape[-1] + 0.36
    ones = np.ones_like(q12)
    for degree in (0, 2, 5):
        k = stax.serial(stax.Dense(4, W_std=0.8, b_std=0.6), stax.Hermite(degree)).kernel_fn(x)
        he = (np.polynomial.hermite_e.HermiteE.basis(degree)
              / np.sqrt(scipy.special.factorial(degree)))
        assert rel_err(k.nngp, gauss_hermite(he, he, q12, ones, ones, deg=150)) < 1e-10
        assert rel_err(k.nngp, q12 ** degree) < 1e-13


def test_elementwise_with_only_fn_or_only_nngp_fn():
    fn_only = stax.Elementwise(fn=jnp.tanh)
    x = jnp.asarray(X1)
    assert np.array_equal(fn_only.apply_fn((), x), jnp.tanh(x))
    with pytest.raises(NotImplementedError, match="no kernel.*nngp_fn.*ElementwiseNumerical"):
        stax.serial(stax.Dense(3), fn_only).kernel_fn(X1)
    kernel_only = stax.Elementwise(nngp_fn=_erf_nngp)  # NTK by autodiff, as with fn given
    with_fn = stax.Erf()
    for lyr in (kernel_only, stax.ExpNormalized()):
        with pytest.raises(NotImplementedError, match="no finite-width function"):
            lyr.apply_fn((), x)
    got = stax.serial(stax.Dense(3, b_std=0.2), kernel_only).kernel_fn(X1, X2)
    want = stax.serial(stax.Dense(3, b_std=0.2), with_fn).kernel_fn(X1, X2)
    assert rel_err(got.nngp, want.nngp) < 1e-13 and rel_err(got.ntk, want.ntk) < 1e-13
    with pytest.raises(ValueError, match="neither fn nor nngp_fn"):
        stax.Elementwise()


# ----------------------------------------------------------------------------------------------
# repeat, Index, FanInProd


def test_repeat_equals_unrolled_serial_and_stacks_params():
    block = stax.serial(stax.Dense(6, W_std=1.3, b_std=0.2), stax.Gelu())
    repeated = stax.serial(stax.Dense(6), stax.repeat(block, 3), stax.Dense(1))
    unrolled = stax.serial(stax.Dense(6), block, block, block, stax.Dense(1))
    a = repeated.kernel_fn(X1, X2)
    b = unrolled.kernel_fn(X1, X2)
    assert rel_err(a.ntk, b.ntk) < 1e-13 and rel_err(a.nngp, b.nngp) < 1e-13
    shape, params = repeated.init_fn(jax.random.PRNGKey(0), X1.shape)
    assert shape == (4, 1) and params[1][0][0].shape == (3, 6, 6)  # (n, in, out)
    flat = (params[0], *[jax.tree_util.tree_map(lambda p: p[i], params[1]) for i in range(3)],
            params[2])
    assert np.allclose(repeated.apply_fn(params, X1), unrolled.apply_fn(flat, X1), atol=1e-13)
    assert repeated.kernel_fn(X1, None, "nngp").shape == (4, 4)
    with pytest.raises(ValueError, match="shape-preserving"):
        stax.repeat(stax.Dense(3), 2).init_fn(jax.random.PRNGKey(0), (2, 5))


IMG1 = RNG.normal(size=(3, 5, 4, 2))
IMG2 = RNG.normal(size=(2, 5, 4, 2))


def normal_params(init_fn, input_shape, seed):
    shapes = jax.eval_shape(lambda key: init_fn(key, input_shape)[1], jax.random.PRNGKey(0))
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)


# Slices and ints are in the neural-tangents cases; tuples (NumPy "take") only here.
@pytest.mark.parametrize("idx", [stax.Slice[(1, 0), :, 1:, :], stax.Slice[1:, 3, (2, 0, 2)]])
def test_index_equals_empirical_ntk_of_one_layer(idx):
    """One parameterised layer: the empirical NTK is the analytic NTK exactly (at any width), so
    `Conv` then `Index` checks the kernel map of the index against `x[idx]` itself."""
    init_fn, apply_fn, kernel_fn = stax.serial(stax.Conv(3, (2, 2), padding="SAME", b_std=0.3),
                                               stax.Index(idx))
    params = normal_params(init_fn, IMG1.shape, seed=3)
    analytic = kernel_fn(IMG1, IMG2, "ntk")
    # apply_fn indexes the batches of x1 and x2 itself, like the kernel's two batch axes.
    empirical = entk.empirical_ntk_fn(apply_fn, implementation="jc")(IMG1, IMG2, params)
    assert analytic.shape == empirical.shape
    assert rel_err(analytic, empirical) < 1e-12
    assert init_fn(jax.random.PRNGKey(0), IMG1.shape)[0] == apply_fn(params, IMG1).shape


# (VALID / SAME ConvLocal and more strides are in the neural-tangents cases.)
ONE_LAYER_CONVS = {
    "local_circular_strided_standard": stax.ConvLocal(
        2, (2, 3), strides=(2, 1), padding="CIRCULAR", W_std=0.8, b_std=0.3,
        parameterization="standard"),
    "transpose_valid_strided": stax.ConvTranspose(3, (2, 3), strides=(2, 1), b_std=0.2),
    "transpose_same_standard": stax.ConvTranspose(2, (3, 2), strides=(1, 2), padding="SAME",
                                                  W_std=1.4, b_std=0.5,
                                                  parameterization="standard"),
}


@pytest.mark.parametrize("name", sorted(ONE_LAYER_CONVS))
def test_conv_local_and_transpose_equal_empirical_ntk(name):
    """One parameterised layer: empirical NTK (traced over channels) = analytic NTK, exactly."""
    init_fn, apply_fn, kernel_fn = ONE_LAYER_CONVS[name]
    out_shape, _ = init_fn(jax.random.PRNGKey(0), IMG1.shape)
    params = normal_params(init_fn, IMG1.shape, seed=2)
    y = apply_fn(params, IMG1)
    assert y.shape == tuple(out_shape)
    if name.startswith("transpose"):  # output sizes of jax.lax.conv_transpose
        W = params[0]
        ref = jax.lax.conv_transpose(IMG1, W, ONE_LAYER_CONVS_STRIDES[name],
                                     "SAME" if "same" in name else "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        assert ref.shape == y.shape
    empirical = entk.empirical_ntk_fn(apply_fn, implementation="jc")(IMG1, IMG2, params)
    analytic = kernel_fn(IMG1, IMG2, "ntk")
    assert analytic.shape == empirical.shape
    assert rel_err(analytic, empirical) < 1e-12


@pytest.mark.parametrize("method,shape,antialias", [  # linear, nearest: neural-tangents cases
    ("cubic", (-1, 7, 3, -1), True), ("lanczos3", (-1, 3, 2, -1), False)])
def test_image_resize_equals_empirical_ntk(method, shape, antialias):
    """`Conv` then `ImageResize`: exact for every resize method (each is linear per axis)."""
    init_fn, apply_fn, kernel_fn = stax.serial(stax.Conv(3, (2, 2), padding="SAME", b_std=0.2),
                                               stax.ImageResize(shape, method, antialias=antialias))
    params = normal_params(init_fn, IMG1.shape, seed=6)
    empirical = entk.empirical_ntk_fn(apply_fn, implementation="jc")(IMG1, IMG2, params)
    analytic = kernel_fn(IMG1, IMG2, "ntk")
    assert analytic.shape == empirical.shape == (3, 2) + tuple(s for s in shape[1:3] for _ in "ab")
    assert rel_err(analytic, empirical) < 1e-12
    with pytest.raises(ValueError, match="channel axis has no infinite-width limit"):
        stax.serial(stax.Conv(3, (2, 2)), stax.ImageResize((-1, 2, 2, 5), method)).kernel_fn(IMG1)


def test_dot_general_equals_empirical_ntk_and_needs_batch_first_channels_last():
    rng = np.random.RandomState(8)
    x1, x2 = IMG1, IMG1[::-1] * 0.7  # equal batch sizes: the constant has a batch dimension
    init_fn, apply_fn, kernel_fn = stax.serial(
        stax.Conv(3, (2, 2), padding="SAME", b_std=0.2),
        stax.DotGeneral(lhs=rng.normal(size=(3, 2, 5)),  # (N, P, H) · (N, H, W, C) -> (N, P, W, C)
                        dimension_numbers=(((2,), (1,)), ((0,), (0,)))))
    params = normal_params(init_fn, x1.shape, seed=9)
    empirical = entk.empirical_ntk_fn(apply_fn, implementation="jc")(x1, x2, params)
    analytic = kernel_fn(x1, x2, "ntk")
    assert analytic.shape == empirical.shape == (3, 3, 2, 2, 4, 4)
    assert rel_err(analytic, empirical) < 1e-12
    spatial_mix = stax.DotGeneral(rhs=np.ones((5, 5)), dimension_numbers=(((1,), (0,)), ((), ())))
    with pytest.raises(NotImplementedError, match="batch axis first and the channel axis last"):
        stax.serial(stax.Conv(3, (2, 2)), spatial_mix).kernel_fn(IMG1)  # output (N, W, C, H')
    with pytest.raises(ValueError, match="at most one of lhs and rhs"):
        stax.DotGeneral(lhs=np.ones(2), rhs=np.ones(2))


ONE_LAYER_CONVS_STRIDES = {"transpose_valid_strided": (2, 1), "transpose_same_standard": (1, 2)}


@pytest.mark.parametrize("implementation", ["DENSE", "SPARSE"])
def test_aggregate_equals_empirical_ntk_of_one_layer(implementation):
    """`Dense` then `Aggregate`: one parameterised layer, so the empirical NTK of `apply_fn` (with
    each batch's own pattern) is the analytic NTK exactly."""
    rng = np.random.RandomState(5)
    x1, x2 = rng.normal(size=(3, 4, 2)), rng.normal(size=(2, 4, 2))
    if implementation == "DENSE":
        p1, p2 = rng.uniform(size=(3, 4, 4)), rng.uniform(size=(2, 4, 4))
    else:
        p1, p2 = rng.randint(0, 4, size=(3, 6, 2)), rng.randint(0, 4, size=(2, 6, 2))
        p1[0, 0] = -1  # padding edge
    init_fn, apply_fn, kernel_fn = stax.serial(stax.Dense(3, b_std=0.4),
                                               stax.Aggregate(implementation=implementation))
    params = normal_params(init_fn, x1.shape, seed=4)
    analytic = kernel_fn(x1, x2, "ntk", pattern=(p1, p2))
    jac1 = jax.jacobian(apply_fn)(params, x1, pattern=p1)
    jac2 = jax.jacobian(apply_fn)(params, x2, pattern=p2)
    empirical = sum(  # Σ_params J1 J2ᵀ, traced over the 3 channels: (N1, N2, V, V')
        jnp.einsum("aic...,bjc...->abij", a.reshape(a.shape[:3] + (-1,)),
                   b.reshape(b.shape[:3] + (-1,))) / 3
        for a, b in zip(jax.tree_util.tree_leaves(jac1), jax.tree_util.tree_leaves(jac2)))
    assert rel_err(analytic, empirical) < 1e-12
    same = kernel_fn(x1, None, "ntk", pattern=(p1, None))
    assert rel_err(same, kernel_fn(x1, x1 + 0.0, "ntk", pattern=(p1, p1))) < 1e-13
    with pytest.raises(ValueError, match="dense shape" if implementation == "DENSE" else
                       r"SPARSE pattern has shape \(batch, n_edges, 1, 2\)"):
        kernel_fn(x1, x2, "ntk", pattern=(p1[:, :3] if implementation == "DENSE" else p1[..., :1],
                                          p2))


def test_fan_in_prod_single_branch_and_errors():
    net = stax.serial(stax.Dense(4, b_std=0.1), stax.FanOut(1), stax.FanInProd(), stax.Relu())
    plain = stax.serial(stax.Dense(4, b_std=0.1), stax.Relu())
    assert rel_err(net.kernel_fn(X1, X2, "ntk"), plain.kernel_fn(X1, X2, "ntk")) < 1e-15
    with pytest.raises(ValueError, match="FanInProd needs a list"):
        stax.serial(stax.Dense(2), stax.FanInProd()).kernel_fn(X1)
    with pytest.raises(ValueError, match="Gaussian"):  # a product of branches is not Gaussian
        stax.serial(stax.Dense(2), stax.FanOut(2), stax.FanInProd(), stax.Relu()).kernel_fn(X1)


def test_index_errors():
    conv = stax.Conv(2, (2, 2), padding="SAME")
    with pytest.raises(NotImplementedError, match="channel axis.*cannot be indexed"):
        stax.serial(conv, stax.Index(stax.Slice[..., :1])).kernel_fn(IMG1)
    with pytest.raises(NotImplementedError, match="integer index on the batch axis"):
        stax.serial(conv, stax.Index(stax.Slice[0])).kernel_fn(IMG1)
    with pytest.raises(IndexError, match="only one '...'"):
        stax.serial(conv, stax.Index(stax.Slice[..., 0, ...])).kernel_fn(IMG1)
    with pytest.raises(IndexError, match="at most one axis"):
        stax.serial(conv, stax.Index(stax.Slice[(0, 1), (1, 2)])).kernel_fn(IMG1)


# ----------------------------------------------------------------------------------------------
# Finite networks approach the analytic kernels


@pytest.mark.parametrize("make", [
    lambda: stax.serial(stax.Dense(512, b_std=0.2), stax.Exp(a=0.8, b=0.5), stax.Dense(64)),
    lambda: stax.serial(stax.FanOut(2), stax.parallel(stax.Dense(512, b_std=0.3),
                                                      stax.serial(stax.Dense(512), stax.Gabor())),
                        stax.FanInProd(), stax.Dense(64)),
], ids=["exp", "fan_in_prod_gabor"])
def test_monte_carlo_of_apply_fn_approaches_analytic(make):
    """8 initialisations at width 512; 64 outputs (the empirical kernels average over them) keep
    the NNGP estimate's spread near 1/√(8·64) ≈ 4%."""
    init_fn, apply_fn, kernel_fn = make()
    x = X1[:3]
    mc = entk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(1), n_samples=8,
                                    implementation="jc")
    got = mc(x, None, ("nngp", "ntk"))
    want = kernel_fn(x, None, ("nngp", "ntk"))
    assert rel_err(got.nngp, want.nngp) < 0.1
    assert rel_err(got.ntk, want.ntk) < 0.1


def test_monte_carlo_of_attention_approaches_analytic_nngp():
    """Softmax attention with linear scaling: 8 finite networks (width 128, 8 heads) average to the
    analytic NNGP within Monte Carlo error (a few %); positional embeddings summed in."""
    init_fn, apply_fn, kernel_fn = stax.serial(
        stax.Dense(128, b_std=0.2),
        stax.GlobalSelfAttention(64, 128, 32, 8, b_std=0.1, pos_emb_type="SUM"))
    x = RNG.normal(size=(3, 4, 2))
    mc = entk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(2), n_samples=8,
                                    implementation="jc")
    assert rel_err(mc(x, None, "nngp"), kernel_fn(x, None, "nngp")) < 0.1


def test_attention_errors():
    seq = RNG.normal(size=(2, 4, 3))
    with pytest.raises(NotImplementedError,
                       match="no closed form.*'SOFTMAX'.*linear_scaling=False"):
        stax.serial(stax.Dense(3), stax.GlobalSelfAttention(
            3, 2, 2, 1, linear_scaling=False)).kernel_fn(seq)
    with pytest.raises(ValueError, match="at least one spatial axis"):
        stax.serial(stax.Dense(3), stax.GlobalSelfAttention(3, 2, 2, 1)).kernel_fn(X1)
    with pytest.raises(ValueError, match="attention_mechanism='tanh'"):
        stax.GlobalSelfAttention(3, 2, 2, 1, attention_mechanism="tanh")
    with pytest.raises(ValueError, match="n_chan_pos_emb=4 must be None"):
        stax.GlobalSelfAttention(3, 2, 2, 1, pos_emb_type="SUM", n_chan_pos_emb=4).init_fn(
            jax.random.PRNGKey(0), seq.shape)
