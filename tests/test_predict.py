"""entk.predict: closed-form and ODE predictions from kernels.

- every prediction stored from neural-tangents 0.6.5 (float64, ≤ 1e-6 relative);
- closed forms against an independent ODE / matrix-exponential solution;
- a width-1024 MLP trained by gradient descent tracked by `gradient_descent_mse` with its empirical NTK;
- errors for bad inputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import entk
from entk import predict, stax


def reference_dir() -> Path:
    env = os.environ.get("ENTK_REFERENCE_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "reference"


def rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def ref():
    d = reference_dir()
    if not ((d / "predict_nt065.json").exists() and (d / "predict_nt065.npz").exists()):
        pytest.skip(f"neural-tangents reference values not found in {d} (set ENTK_REFERENCE_DIR to "
                    f"the folder holding predict_nt065.json/.npz)")
    return json.loads((d / "predict_nt065.json").read_text()), dict(np.load(d / "predict_nt065.npz"))


# ----------------------------------------------------------------------------------------------
# neural-tangents 0.6.5


@pytest.mark.parametrize("t", [0.5, 3.0, None])
def test_gradient_descent_mse_matches_neural_tangents(ref, t):
    spec, d = ref
    predict_fn = predict.gradient_descent_mse(d["k_tt"], d["y"], spec["learning_rate"],
                                              spec["diag_reg"])
    fx_train, fx_test = predict_fn(t, d["f0_train"], d["f0_test"], d["k_st"])
    assert rel_err(fx_train, d[f"gd_mse_t={t}_train"]) <= 1e-6
    assert rel_err(fx_test, d[f"gd_mse_t={t}_test"]) <= 1e-6


def test_gp_inference_matches_neural_tangents(ref):
    spec, d = ref
    out = predict.gp_inference(d["g_tt"], d["y"], spec["diag_reg"])("nngp", d["g_st"], d["g_ss"])
    assert rel_err(out.mean, d["gp_nngp_mean"]) <= 1e-6
    assert rel_err(out.covariance, d["gp_nngp_cov"]) <= 1e-6


def test_ensemble_matches_neural_tangents(ref):
    spec, d = ref
    _, _, kernel_fn = stax.serial(*[getattr(stax, name)(**kw) for name, kw in spec["network"]])
    # The stored kernels are this network's: check them too.
    k = kernel_fn(d["x_train"], None, ("nngp", "ntk"))
    assert rel_err(k.ntk, d["k_tt"]) <= 1e-6 and rel_err(k.nngp, d["g_tt"]) <= 1e-6
    predict_fn = predict.gradient_descent_mse_ensemble(kernel_fn, d["x_train"], d["y"],
                                                       spec["learning_rate"], spec["diag_reg"])
    for t in (1.0, None):
        for get in ("nngp", "ntk"):
            out = predict_fn(t, d["x_test"], get, compute_cov=True)
            assert rel_err(out.mean, d[f"ens_t={t}_{get}_mean"]) <= 1e-6, (t, get)
            assert rel_err(out.covariance, d[f"ens_t={t}_{get}_cov"]) <= 1e-6, (t, get)


# ----------------------------------------------------------------------------------------------
# Self-consistency on a synthetic problem

RNG = np.random.RandomState(0)
N_TRAIN, N_TEST, N_OUT = 6, 3, 2
_FEATURES = RNG.normal(size=(N_TRAIN + N_TEST, 10))
_K = _FEATURES @ _FEATURES.T / 10 + 0.1
K_DD, K_TD, K_TT = _K[:N_TRAIN, :N_TRAIN], _K[N_TRAIN:, :N_TRAIN], _K[N_TRAIN:, N_TRAIN:]
Y = RNG.normal(size=(N_TRAIN, N_OUT))
F0_TRAIN, F0_TEST = 0.1 * RNG.normal(size=(N_TRAIN, N_OUT)), 0.1 * RNG.normal(size=(N_TEST, N_OUT))


def _mse(fx, y):
    return 0.5 * jnp.mean((fx - y) ** 2)


def test_closed_form_matches_ode_and_handles_time_arrays():
    lr = 0.8
    closed = predict.gradient_descent_mse(K_DD, Y, lr)
    ode = predict.gradient_descent(_mse, K_DD, Y, lr)
    ts = np.array([[3.0, 0.5], [10.0, 0.0]])  # any shape, any order
    c_train, c_test = closed(ts, F0_TRAIN, F0_TEST, K_TD)
    o_train, o_test = ode(ts, F0_TRAIN, F0_TEST, K_TD)
    assert c_train.shape == (2, 2, N_TRAIN, N_OUT) and c_test.shape == (2, 2, N_TEST, N_OUT)
    assert rel_err(o_train, c_train) < 1e-6 and rel_err(o_test, c_test) < 1e-6
    assert np.allclose(c_train[1, 1], F0_TRAIN) and np.allclose(c_test[1, 1], F0_TEST)
    # t = None is t = ∞: training targets reached, test outputs from the linear solve.
    inf_train, inf_test = closed(None, F0_TRAIN, F0_TEST, K_TD)
    late_train, late_test = closed(1e7, F0_TRAIN, F0_TEST, K_TD)
    assert np.allclose(inf_train, Y) and rel_err(late_test, inf_test) < 1e-6
    expected = F0_TEST + K_TD @ np.linalg.solve(K_DD, Y - F0_TRAIN)
    assert rel_err(inf_test, expected) < 1e-10
    # Only the requested sets come back.
    assert closed(2.0, None, F0_TEST, K_TD).shape == (N_TEST, N_OUT)
    assert closed(2.0, F0_TRAIN).shape == (N_TRAIN, N_OUT)


def test_momentum_ode_matches_matrix_exponential():
    lr, momentum, t = 0.5, 0.7, 4.0
    fx_train = predict.gradient_descent(_mse, K_DD, Y, lr, momentum)(t, F0_TRAIN)
    # d/dτ [f − y; q] = [[0, I], [−Θ/n, −(1 − μ)/√η·I]] [f − y; q],  τ = √η·t,  n = y.size.
    n = N_TRAIN
    system = np.block([[np.zeros((n, n)), np.eye(n)],
                       [-K_DD / Y.size, -(1 - momentum) / np.sqrt(lr) * np.eye(n)]])
    state = scipy.linalg.expm(system * np.sqrt(lr) * t) @ np.vstack(
        [F0_TRAIN - Y, np.zeros_like(Y)])
    assert rel_err(fx_train, Y + state[:n]) < 1e-6


def test_untraced_outputs_give_the_same_predictions():
    k_full = np.einsum("ij,ab->iajb", K_DD, np.eye(N_OUT))  # Θ ⊗ I, layout (N1, N2, C1, C2)
    k_full = k_full.transpose(0, 2, 1, 3)
    ktd_full = np.einsum("ij,ab->iajb", K_TD, np.eye(N_OUT)).transpose(0, 2, 1, 3)
    for t in (2.0, None):
        traced = predict.gradient_descent_mse(K_DD, Y, diag_reg=1e-3)(t, F0_TRAIN, F0_TEST, K_TD)
        full = predict.gradient_descent_mse(k_full, Y, diag_reg=1e-3, trace_axes=())(
            t, F0_TRAIN, F0_TEST, ktd_full)
        for a, b in zip(traced, full):
            assert rel_err(b, a) < 1e-10
    # Traced over the batch-like first axis instead: the kernel is over outputs.
    k_out = np.eye(N_OUT) * 2.0 + 0.5
    out = predict.gradient_descent_mse(k_out, Y, trace_axes=(0,))(None, F0_TRAIN, 0.0,
                                                                   k_out[:1])
    assert out[1].shape == (N_TRAIN, 1)


def test_gp_inference_ntk_and_ntkgp_posteriors():
    nngp_dd, nngp_td, nngp_tt = 0.7 * K_DD + 0.05, 0.7 * K_TD + 0.05, 0.7 * K_TT + 0.05
    k_dd = stax.Kernel(nngp=nngp_dd, ntk=K_DD, cov1=None, cov2=None, x1_is_x2=True,
                       is_gaussian=True, is_input=False, shape1=(N_TRAIN, 1), shape2=(N_TRAIN, 1))
    k_td = k_dd.replace(nngp=nngp_td, ntk=K_TD)
    k_tt = k_dd.replace(nngp=nngp_tt, ntk=K_TT)
    out = predict.gp_inference(k_dd, Y)(("ntk", "ntkgp", "nngp"), k_td, k_tt)
    assert out._fields == ("ntk", "ntkgp", "nngp")
    solve = np.linalg.solve
    mean = K_TD @ solve(K_DD, Y)
    op = K_TD @ np.linalg.inv(K_DD)
    cov = nngp_tt + op @ nngp_dd @ op.T - op @ nngp_td.T - nngp_td @ op.T
    assert rel_err(out.ntk.mean, mean) < 1e-10 and rel_err(out.ntk.covariance, cov) < 1e-10
    assert rel_err(out.ntkgp.mean, mean) < 1e-10
    assert rel_err(out.ntkgp.covariance, K_TT - K_TD @ solve(K_DD, K_TD.T)) < 1e-10
    assert rel_err(out.nngp.covariance, nngp_tt - nngp_td @ solve(nngp_dd, nngp_td.T)) < 1e-10
    # Means only without k_test_test; the training set without k_test_train.
    assert rel_err(predict.gp_inference(K_DD, Y)("ntk", K_TD), mean) < 1e-10
    train = predict.gp_inference(K_DD, Y)("ntk", None, True)
    assert np.allclose(train.mean, Y) and np.all(train.covariance == 0)


def test_max_learning_rate():
    top = np.linalg.eigvalsh(K_DD)[-1]
    assert np.isclose(predict.max_learning_rate(K_DD), 2 * N_TRAIN / top, rtol=1e-12)
    assert np.isclose(predict.max_learning_rate(K_DD, y_train_size=Y.size, momentum=0.9),
                      2 * 1.9 * Y.size / top, rtol=1e-12)
    # Discrete gradient descent on 0.5·mean((f − y)²) is stable just below the bound, not above.
    lr = predict.max_learning_rate(K_DD, y_train_size=Y.size)
    for factor, stable in ((0.98, True), (1.02, False)):
        step = np.eye(N_TRAIN) - factor * lr * K_DD / Y.size
        assert (np.max(np.abs(np.linalg.eigvalsh(step))) < 1) == stable


# ----------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"k_train_train has shape \(6, 6\).*needs \(5, 5\)"):
        predict.gradient_descent_mse(K_DD, Y[:5])
    with pytest.raises(ValueError, match=r"k_test_train has shape \(3, 5\)"):
        predict.gradient_descent_mse(K_DD, Y)(1.0, F0_TRAIN, F0_TEST, K_TD[:, :5])
    with pytest.raises(ValueError, match=r"fx_train_0 has shape \(6, 3\)"):
        predict.gradient_descent_mse(K_DD, Y)(1.0, np.zeros((6, 3)))
    with pytest.raises(ValueError, match="k_test_train is None"):
        predict.gradient_descent_mse(K_DD, Y)(1.0, F0_TRAIN, F0_TEST)
    with pytest.raises(ValueError, match="trace_axes=.*out of range"):
        predict.gradient_descent_mse(K_DD, Y, trace_axes=(3,))
    indefinite = np.array([[1.0, 2.0], [2.0, 1.0]])
    y2 = np.ones((2, 1))
    with pytest.raises(ValueError, match="not positive definite.*diag_reg=0.*diag_reg=1e-4"):
        predict.gradient_descent_mse(indefinite, y2)(None, 0.0, 0.0, indefinite)
    with pytest.raises(ValueError, match="not positive definite"):
        predict.gp_inference(indefinite, y2)("nngp", indefinite)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        predict.gradient_descent_mse(indefinite, y2)(1.0, 0.0)
    with pytest.raises(ValueError, match="unknown 'ntkk'"):
        predict.gp_inference(K_DD, Y)("ntkk", K_TD)
    with pytest.raises(ValueError, match="needs finite times"):
        predict.gradient_descent(_mse, K_DD, Y)(None, F0_TRAIN)


# ----------------------------------------------------------------------------------------------
# A trained finite network follows the kernel prediction


def test_gradient_descent_mse_tracks_a_trained_width_1024_mlp():
    width, lr, steps = 1024, 0.1, 300
    init_fn, apply_fn, _ = stax.serial(stax.Dense(width, W_std=1.5, b_std=0.1), stax.Relu(),
                                       stax.Dense(1, W_std=1.5, b_std=0.1))
    rng = np.random.RandomState(0)
    x = rng.normal(size=(12, 4))
    x *= 2 / np.linalg.norm(x, axis=1, keepdims=True)
    x_train, x_test = x[:8], x[8:]
    y_train = np.sin(x_train @ np.array([[1.0], [-0.5], [0.8], [0.3]]))
    shapes = jax.eval_shape(lambda k: init_fn(k, x_train.shape)[1], jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape)), shapes)

    @jax.jit
    def train(p):
        def step(_, p):
            grads = jax.grad(lambda q: _mse(apply_fn(q, x_train), y_train))(p)
            return jax.tree_util.tree_map(lambda a, g: a - lr * g, p, grads)
        return jax.lax.fori_loop(0, steps, step, p)

    trained = train(params)
    ntk_fn = jax.jit(entk.empirical_ntk_fn(apply_fn, implementation="jc"))
    k_dd, k_td = ntk_fn(x_train, None, params), ntk_fn(x_test, x_train, params)
    assert lr < 0.2 * predict.max_learning_rate(k_dd, y_train.size)  # a small step
    f0_train, f0_test = apply_fn(params, x_train), apply_fn(params, x_test)
    pred_train, pred_test = predict.gradient_descent_mse(k_dd, y_train, lr)(
        steps, f0_train, f0_test, k_td)
    out_train, out_test = apply_fn(trained, x_train), apply_fn(trained, x_test)
    rmse = lambda a, b: float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))  # noqa: E731
    assert rmse(out_train, y_train) < 0.1 * rmse(f0_train, y_train)  # it did learn
    assert rmse(pred_train, out_train) < 0.05
    assert rmse(pred_test, out_test) < 0.05
