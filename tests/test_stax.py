"""entk.stax: analytic infinite-width kernels.

- against neural-tangents 0.6.5 (stored reference values, float64, ≤ 1e-6 relative);
- closed-form nonlinearities against Gauss–Hermite quadrature (`ElementwiseNumerical`);
- linear layers (Dense, Conv with every padding / stride, pooling, Flatten, FanIn*) against the
  empirical NTK of networks with one parameterised layer, where the two are equal exactly;
- the empirical NTK of a finite stax MLP approaching the analytic NTK like 1/√width;
- the `kernel_fn` interface (`get`, composition, errors).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import entk
from entk import stax
from tests.data import stax_spec
from tests.gaussian_quadrature import first_layer_cov, gauss_hermite, polar, rel_err


def reference_dir() -> Path:
    env = os.environ.get("ENTK_REFERENCE_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "reference"


def _load_reference():
    d = reference_dir()
    spec_path, arrays_path = d / "stax_nt065.json", d / "stax_nt065.npz"
    if not (spec_path.exists() and arrays_path.exists()):
        return None, None
    return json.loads(spec_path.read_text()), dict(np.load(arrays_path))


REF_SPEC, REF_ARRAYS = _load_reference()
NO_REFERENCE = (f"neural-tangents reference values not found in {reference_dir()} (set "
                f"ENTK_REFERENCE_DIR to the folder holding stax_nt065.json/.npz)")


# ----------------------------------------------------------------------------------------------
# neural-tangents 0.6.5


@pytest.mark.parametrize("case", sorted(REF_SPEC) if REF_SPEC else ["<missing>"])
def test_matches_neural_tangents(case):
    if REF_SPEC is None:
        pytest.skip(NO_REFERENCE)
    _, _, kernel_fn = stax_spec.build(stax, REF_SPEC[case])
    x1, x2 = REF_ARRAYS[f"{case}/x1"], REF_ARRAYS[f"{case}/x2"]
    assert x1.dtype == np.float64
    k = kernel_fn(x1, x2, ("nngp", "ntk"))
    for name in ("nngp", "ntk"):
        expected = REF_ARRAYS[f"{case}/{name}"]
        got = getattr(k, name)
        assert got.shape == expected.shape and got.dtype == jnp.float64
        assert rel_err(got, expected) <= 1e-6, (case, name)


# ----------------------------------------------------------------------------------------------
# Nonlinearities: closed forms vs quadrature
#
# `serial(Dense, φ)` maps inputs to E[φ(u)φ(v)] (nngp) and q12·E[φ'(u)φ'(v)] (ntk), where
# q = W_std²·x1·x2/d + b_std² is the Dense layer's covariance, computed here by hand.

RNG = np.random.RandomState(0)  # NumPy draws: no JAX random-number kernels to compile
X_VEC = RNG.normal(size=(4, 5))
X_VEC2 = RNG.normal(size=(3, 5))
W_STD, B_STD = 1.3, 0.2


def _abrelu_np(a, b):
    return (lambda x: np.where(x > 0, b * x, a * x)), (lambda x: np.where(x > 0, b, a))


def _gelu_np(x):
    return x * scipy.special.ndtr(x)


def _gelu_np_prime(x):
    return scipy.special.ndtr(x) + x * np.exp(-x ** 2 / 2) / np.sqrt(2 * np.pi)


# name: (layer, quadrature for the reference, φ, φ')
NONLINEARITIES = {
    "relu": (stax.Relu(), "angular", *_abrelu_np(0.0, 1.0)),
    "leaky": (stax.LeakyRelu(0.2), "angular", *_abrelu_np(0.2, 1.0)),
    "abs": (stax.Abs(), "angular", *_abrelu_np(-1.0, 1.0)),
    "abrelu": (stax.ABRelu(-0.4, 1.5), "angular", *_abrelu_np(-0.4, 1.5)),
    "erf": (stax.Erf(a=1.3, b=0.7, c=0.2), "hermite",
            lambda x: 1.3 * scipy.special.erf(0.7 * x) + 0.2,
            lambda x: 1.3 * 0.7 * 2 / np.sqrt(np.pi) * np.exp(-(0.7 * x) ** 2)),
    "sin": (stax.Sin(a=0.9, b=1.2, c=0.3), "hermite", lambda x: 0.9 * np.sin(1.2 * x + 0.3),
            lambda x: 0.9 * 1.2 * np.cos(1.2 * x + 0.3)),
    "gelu": (stax.Gelu(), "hermite", _gelu_np, _gelu_np_prime),
}


@pytest.fixture(scope="module")
def nonlinearity_kernels():
    """All closed-form nonlinearities after one Dense layer, in one compiled network."""
    names = sorted(NONLINEARITIES)
    _, _, kernel_fn = stax.serial(
        stax.Dense(8, W_std=W_STD, b_std=B_STD), stax.FanOut(len(names)),
        stax.parallel(*[NONLINEARITIES[n][0] for n in names]))
    return dict(zip(names, kernel_fn(X_VEC, X_VEC2)))


@pytest.mark.parametrize("name", sorted(NONLINEARITIES))
def test_nonlinearity_closed_forms_match_quadrature(name, nonlinearity_kernels):
    _, method, phi, dphi = NONLINEARITIES[name]
    k = nonlinearity_kernels[name]
    q12, q11, q22 = np.broadcast_arrays(*first_layer_cov(X_VEC, X_VEC2, W_STD, B_STD))
    var1 = first_layer_cov(X_VEC, X_VEC, W_STD, B_STD)[1][:, 0]
    if method == "hermite":
        expected_nngp = gauss_hermite(phi, phi, q12, q11, q22)
        expected_dot = gauss_hermite(dphi, dphi, q12, q11, q22)
        expected_var = gauss_hermite(phi, phi, var1, var1, var1)
        nngp_tol = dot_tol = 1e-10
    else:
        expected_nngp = polar(phi, phi, q12, q11, q22, 2)
        expected_dot = polar(dphi, dphi, q12, q11, q22, 0)
        expected_var = polar(phi, phi, var1, var1, var1, 2)
        nngp_tol, dot_tol = 1e-8, 1e-4  # φ' jumps, which limits the trapezoid rule
    assert rel_err(k.nngp, expected_nngp) < nngp_tol
    assert rel_err(np.asarray(k.ntk) / q12, expected_dot) < dot_tol
    assert rel_err(k.cov1, expected_var) < nngp_tol  # x1 with itself


def test_elementwise_numerical_matches_closed_form():
    fn = lambda x: 1.3 * jax.scipy.special.erf(0.7 * x) + 0.2  # noqa: E731
    _, _, kernel_fn = stax.serial(
        stax.Dense(8, W_std=W_STD, b_std=B_STD), stax.FanOut(2),
        stax.parallel(stax.Erf(a=1.3, b=0.7, c=0.2), stax.ElementwiseNumerical(fn, deg=96)),
        stax.parallel(stax.Dense(1), stax.Dense(1)))
    closed, numeric = kernel_fn(X_VEC, X_VEC2)
    for entry in ("nngp", "ntk", "cov1", "cov2"):  # NTK via autodiff of fn (df=None)
        assert rel_err(getattr(numeric, entry), getattr(closed, entry)) < 1e-9, entry


def test_identity_keeps_kernel_and_numerical_needs_gaussian_inputs():
    base = stax.serial(stax.Dense(4, b_std=0.3), stax.Dense(1))
    with_id = stax.serial(stax.Dense(4, b_std=0.3), stax.Identity(), stax.Dense(1))
    assert rel_err(with_id.kernel_fn(X_VEC).ntk, base.kernel_fn(X_VEC).ntk) < 1e-15
    with pytest.raises(ValueError, match="Relu needs Gaussian inputs.*Dense or Conv"):
        stax.serial(stax.Relu(), stax.Dense(1)).kernel_fn(X_VEC)
    with pytest.raises(ValueError, match="Gaussian"):
        stax.serial(stax.Dense(3), stax.Relu(), stax.Erf()).kernel_fn(X_VEC)


# ----------------------------------------------------------------------------------------------
# Linear layers: exact against the empirical NTK
#
# With a single parameterised layer, the network is linear in its parameters and its Jacobian does
# not depend on them, so the empirical NTK (traced over channels) *is* the analytic NTK, at any width.

IMG = RNG.normal(size=(3, 5, 6, 2))
IMG2 = RNG.normal(size=(2, 5, 6, 2))
SEQ = RNG.normal(size=(3, 7, 2))
SEQ2 = RNG.normal(size=(2, 7, 2))


def normal_params(init_fn, input_shape, seed):
    """`(output_shape, params)` with the structure `init_fn` gives, params drawn N(0, 1) by NumPy
    (the NTK parameterization's distribution)."""
    out = {}

    def shapes_only(key):
        out["shape"], params = init_fn(key, input_shape)
        return params

    shapes = jax.eval_shape(shapes_only, jax.random.PRNGKey(0))
    rng = np.random.RandomState(seed)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
    return out["shape"], params

LINEAR = {
    # No pooling at the end: checks the (N1, N2, H1, H2, W1, W2) layout too.
    "avgpool_edges_conv_same_strided": (IMG, IMG2, stax.serial(
        stax.AvgPool((2, 2), strides=(1, 2), padding="SAME", normalize_edges=True),
        stax.Conv(3, (3, 2), strides=(2, 1), padding="SAME", W_std=1.3, b_std=0.4))),
    "sumpool_conv_circular_gap": (IMG, IMG2, stax.serial(
        stax.SumPool((2, 1), padding="CIRCULAR"),
        stax.Conv(2, (2, 3), strides=(1, 2), padding="CIRCULAR", W_std=0.8, b_std=0.2),
        stax.GlobalAvgPool())),
    "avgpool_standard_conv_valid_sumpool": (IMG, IMG2, stax.serial(
        stax.AvgPool((3, 2), padding="SAME"),
        stax.Conv(2, (2, 3), W_std=1.7, b_std=0.5, parameterization="standard"),
        stax.SumPool((2, 2), strides=(2, 1)), stax.GlobalSumPool())),
    "conv1d_strided_pool_flatten": (SEQ, SEQ2, stax.serial(
        stax.Conv(4, (3,), strides=(2,), padding="SAME", b_std=0.1), stax.AvgPool((2,)),
        stax.Flatten())),
    "concat_branches": (IMG, IMG2, stax.serial(
        stax.FanOut(2),
        stax.parallel(stax.Conv(2, (2, 2), padding="SAME"),
                      stax.Conv(5, (1, 1), padding="SAME", W_std=2.0, b_std=0.7)),
        stax.FanInConcat(), stax.GlobalAvgPool())),
    "sum_branches_dense_standard": (X_VEC, X_VEC2, stax.serial(
        stax.FanOut(3),
        stax.parallel(stax.Dense(2), stax.Dense(2, W_std=2.0, b_std=0.5),
                      stax.Dense(2, W_std=0.7, parameterization="standard")),
        stax.FanInSum())),
}


@pytest.mark.parametrize("case", sorted(LINEAR))
def test_linear_layers_equal_empirical_ntk(case):
    x1, x2, (init_fn, apply_fn, kernel_fn) = LINEAR[case]
    out_shape, params = normal_params(init_fn, x1.shape, seed=7)
    assert jax.eval_shape(apply_fn, params, x1).shape == tuple(out_shape)
    empirical = jax.jit(entk.empirical_ntk_fn(apply_fn, implementation="jc"))(x1, x2, params)
    analytic = kernel_fn(x1, x2, ("nngp", "ntk"))
    assert analytic.ntk.shape == empirical.shape
    assert rel_err(analytic.ntk, empirical) < 1e-10
    if "standard" not in case:  # NTK parameterization: one layer's NTK is its NNGP
        assert rel_err(analytic.nngp, analytic.ntk) < 1e-12


# ----------------------------------------------------------------------------------------------
# Finite width → infinite width


def test_empirical_ntk_approaches_analytic_like_inverse_sqrt_width():
    x = RNG.normal(size=(4, 3))
    widths, seeds = (64, 256, 1024), 3
    errors = []
    analytic = None
    for width in widths:
        init_fn, apply_fn, kernel_fn = stax.serial(
            stax.Dense(width, W_std=1.5, b_std=0.1), stax.Relu(),
            stax.Dense(width, W_std=1.5, b_std=0.1), stax.Relu(), stax.Dense(1, W_std=1.5))
        if analytic is None:
            analytic = np.asarray(kernel_fn(x, None, "ntk"))
        ntk_fn = jax.jit(entk.empirical_ntk_fn(apply_fn, implementation="jc"))
        errs = [np.linalg.norm(ntk_fn(x, None, normal_params(init_fn, x.shape, seed)[1]) - analytic)
                / np.linalg.norm(analytic) for seed in range(seeds)]
        errors.append(np.mean(errs))
    slope = np.polyfit(np.log(widths), np.log(errors), 1)[0]
    assert errors[0] > errors[1] > errors[2]
    assert -0.8 < slope < -0.3, (errors, slope)  # ~ -1/2
    assert errors[-1] < 0.15


# ----------------------------------------------------------------------------------------------
# kernel_fn interface


def test_get_returns_entries_in_order_and_rejects_unknown_names():
    _, _, kernel_fn = stax.serial(stax.Dense(3, b_std=0.1), stax.Relu(), stax.Dense(1))
    full = kernel_fn(X_VEC, X_VEC2)
    assert isinstance(full, stax.Kernel)
    assert np.array_equal(kernel_fn(X_VEC, X_VEC2, "ntk"), full.ntk)
    pair = kernel_fn(X_VEC, X_VEC2, ("ntk", "nngp"))
    assert pair._fields == ("ntk", "nngp")
    assert np.array_equal(pair.nngp, full.nngp) and np.array_equal(pair.ntk, full.ntk)
    assert kernel_fn(X_VEC, X_VEC2, "nngp").shape == (4, 3)
    assert kernel_fn(X_VEC, X_VEC2, "cov1").shape == (4,)
    assert kernel_fn(X_VEC, None, ("nngp",)).nngp.shape == (4, 4)
    assert kernel_fn(X_VEC, None, "cov2") is None
    with pytest.raises(ValueError, match=r"unknown kernel entry 'ntkk'.*valid names.*'nngp'"):
        kernel_fn(X_VEC, X_VEC2, "ntkk")
    with pytest.raises(ValueError, match="unknown kernel entry"):
        kernel_fn(X_VEC, X_VEC2, ("nngp", "NTK"))


def test_kernel_fn_composes_and_x2_none_means_x1():
    first = stax.serial(stax.Dense(3, b_std=0.2), stax.Erf())
    second = stax.serial(stax.Dense(5, W_std=1.2), stax.Relu(), stax.Dense(1))
    whole = stax.serial(first, second)
    direct = whole.kernel_fn(X_VEC, X_VEC2)
    composed = second.kernel_fn(first.kernel_fn(X_VEC, X_VEC2))
    assert rel_err(composed.ntk, direct.ntk) < 1e-14
    assert rel_err(composed.nngp, direct.nngp) < 1e-14
    same = whole.kernel_fn(X_VEC, None, ("nngp", "ntk"))
    explicit = whole.kernel_fn(X_VEC, X_VEC + 0.0, ("nngp", "ntk"))  # equal values count as x1
    assert explicit.nngp is not None and rel_err(same.ntk, explicit.ntk) < 1e-14
    both = whole.kernel_fn(np.concatenate([X_VEC, X_VEC2]), None, "ntk")
    assert rel_err(both[:4, 4:], direct.ntk) < 1e-13  # the x2=None kernel's off-diagonal block
    jitted = jax.jit(whole.kernel_fn, static_argnames="get")(X_VEC, X_VEC2, "ntk")
    assert rel_err(jitted, direct.ntk) < 1e-14
    with pytest.raises(ValueError, match="may differ only in the batch"):
        whole.kernel_fn(X_VEC, X_VEC[:, :4])


def test_layer_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"parameterization='mean_field'"):
        stax.Dense(3, parameterization="mean_field")
    with pytest.raises(ValueError, match="padding='REFLECT'"):
        stax.Conv(3, (2, 2), padding="REFLECT")
    with pytest.raises(ValueError, match=r"Conv\(3, \(2, 2\)\) expects inputs with 2 spatial"):
        stax.serial(stax.Conv(3, (2, 2))).kernel_fn(X_VEC)
    with pytest.raises(ValueError, match="FanInSum needs a list"):
        stax.serial(stax.Dense(2), stax.FanInSum()).kernel_fn(X_VEC)
    with pytest.raises(TypeError, match="not an entk.stax layer"):
        stax.serial(stax.Dense(2), "relu")
    with pytest.raises(ValueError, match="channel axis"):
        stax.serial(stax.Conv(2, (2, 2)), stax.LayerNorm(axis=(1, 2))).kernel_fn(IMG)
