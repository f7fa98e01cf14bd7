"""`stax.RNN` and `stax.BatchNorm`: exact identities, an independent recursion, and the
empirical NTK of finite networks (entk's own `empirical_ntk_fn`) approaching the analytic kernels
as width grows."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import entk
from entk import stax

RNG = np.random.default_rng(7)
X_SEQ = RNG.normal(size=(3, 3, 4))      # (N, T, D)
X_BATCH = RNG.normal(size=(6, 12))      # (B, D): D ≥ B so that G K G has full rank B − 1


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def mean_empirical_error(net_of_width, x, width, analytic, seeds=3):
    init_fn, apply_fn, _ = net_of_width(width)
    ntk_fn = jax.jit(entk.empirical_ntk_fn(apply_fn, implementation="jc"))
    return np.mean([rel_err(ntk_fn(x, None, init_fn(jax.random.PRNGKey(s), x.shape)[1]), analytic)
                    for s in range(seeds)])


# ----------------------------------------------------------------------------------------------
# RNN


@pytest.mark.parametrize("nonlinearity,layer,parameterization", [
    ("erf", stax.Erf(), "ntk"), ("relu", stax.Relu(), "standard"),
    ("tanh", stax.ElementwiseNumerical(jnp.tanh, 32), "ntk")])
def test_rnn_with_one_step_is_dense_nonlinearity(nonlinearity, layer, parameterization):
    x = X_SEQ[:, :1]
    rnn = stax.serial(stax.RNN(5, nonlinearity, W_std=1.7, U_std=1.3, b_std=0.4,
                               parameterization=parameterization),
                      stax.Dense(1, W_std=0.9, parameterization=parameterization))
    mlp = stax.serial(stax.Dense(5, W_std=1.3, b_std=0.4, parameterization=parameterization), layer,
                      stax.Dense(1, W_std=0.9, parameterization=parameterization))
    a, b = rnn.kernel_fn(x, X_SEQ[:2, :1]), mlp.kernel_fn(x[:, 0], X_SEQ[:2, 0])
    np.testing.assert_allclose(a.nngp, b.nngp, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a.ntk, b.ntk, rtol=0, atol=1e-12)
    # The finite networks agree too, with the same (U, b) as the Dense weights.
    _, (p_rnn, p_out) = rnn.init_fn(jax.random.PRNGKey(0), x.shape)
    p_mlp = ((p_rnn[1], p_rnn[2]), (), p_out)
    np.testing.assert_allclose(rnn.apply_fn((p_rnn, p_out), x), mlp.apply_fn(p_mlp, x[:, 0]),
                               atol=1e-12)


def _reference_rnn_kernels(x1, x2, w2, u2, b2, readout):
    """Σ and Θ of an erf RNN by explicit loops over every pair of steps (NTK parameterization)."""
    def e_phi(q12, q11, q22):
        return 2 / math.pi * math.asin(2 * q12 / math.sqrt((1 + 2 * q11) * (1 + 2 * q22)))

    def e_dphi(q12, q11, q22):
        return 4 / math.pi / math.sqrt((1 + 2 * q11) * (1 + 2 * q22) - 4 * q12 ** 2)

    T, D = x1.shape[1], x1.shape[2]

    def variances(a):
        v = np.zeros(T)
        for t in range(T):
            prev = w2 * e_phi(v[t - 1], v[t - 1], v[t - 1]) if t else 0.0
            v[t] = u2 * a[t] @ a[t] / D + b2 + prev
        return v

    nngp = np.zeros((len(x1), len(x2)))
    ntk = np.zeros_like(nngp)
    for i, a in enumerate(x1):
        for j, b in enumerate(x2):
            va, vb = variances(a), variances(b)
            s, th = np.zeros((T, T)), np.zeros((T, T))
            for t in range(T):
                for r in range(T):
                    s[t, r] = th[t, r] = u2 * a[t] @ b[r] / D + b2
                    if t and r:
                        s[t, r] += w2 * e_phi(s[t - 1, r - 1], va[t - 1], vb[r - 1])
                        th[t, r] = s[t, r] + w2 * e_dphi(s[t - 1, r - 1], va[t - 1], vb[r - 1]) \
                            * th[t - 1, r - 1]
            E = np.array([[e_phi(s[t, r], va[t], vb[r]) for r in range(T)] for t in range(T)])
            Ed = np.array([[e_dphi(s[t, r], va[t], vb[r]) for r in range(T)] for t in range(T)])
            pick = (lambda m: m[-1, -1]) if readout == "last" else np.mean
            nngp[i, j], ntk[i, j] = pick(E), pick(Ed * th)
    return nngp, ntk


@pytest.mark.parametrize("readout", ["last", "average"])
def test_rnn_kernel_matches_explicit_pairwise_recursion(readout):
    x2 = RNG.normal(size=(2,) + X_SEQ.shape[1:])
    k = stax.RNN(4, "erf", readout=readout, W_std=1.4, U_std=0.8, b_std=0.3).kernel_fn(X_SEQ, x2)
    nngp, ntk = _reference_rnn_kernels(X_SEQ, x2, 1.4 ** 2, 0.8 ** 2, 0.3 ** 2, readout)
    np.testing.assert_allclose(k.nngp, nngp, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(k.ntk, ntk, rtol=1e-12, atol=1e-14)


def _rnn_net(width):
    """A per-step Dense → Erf in front, so that the RNN's input has an NTK of its own."""
    return stax.serial(stax.Dense(width, W_std=1.2, b_std=0.1), stax.Erf(),
                       stax.RNN(width, "relu", W_std=1.1, U_std=1.3, b_std=0.2), stax.Dense(1))


def test_rnn_empirical_ntk_approaches_analytic():
    analytic = _rnn_net(1).kernel_fn(X_SEQ, None, "ntk")
    errors = [mean_empirical_error(_rnn_net, X_SEQ, w, analytic) for w in (64, 1024)]
    assert errors[1] < errors[0] and errors[1] < 0.1, errors


def test_rnn_rejects_non_sequence_inputs():
    with pytest.raises(ValueError, match=r"\(N, T, D\)"):
        stax.RNN(3).kernel_fn(X_BATCH)
    with pytest.raises(ValueError, match="readout"):
        stax.RNN(3, readout="first")


# ----------------------------------------------------------------------------------------------
# BatchNorm


def _bn_net(width):
    return stax.serial(stax.Dense(width, W_std=1.2, b_std=0.2), stax.BatchNorm(n_samples=2 ** 15),
                       stax.Dense(1))


def test_batch_norm_kernel_is_centred_and_unit_variance():
    net = stax.serial(stax.Dense(3, b_std=0.5), stax.BatchNorm(eps=0.0, n_samples=2 ** 14))
    k = net.kernel_fn(X_BATCH)
    ones = np.ones(len(X_BATCH))
    np.testing.assert_allclose(k.nngp @ ones, 0, atol=1e-12)     # every sample is centred
    np.testing.assert_allclose(k.ntk @ ones, 0, atol=1e-12)
    assert abs(np.trace(k.nngp) / len(X_BATCH) - 1) < 1e-12     # and has batch variance 1


def test_batch_norm_empirical_ntk_approaches_analytic():
    analytic = _bn_net(1).kernel_fn(X_BATCH, None, "ntk")
    errors = [mean_empirical_error(_bn_net, X_BATCH, w, analytic) for w in (64, 1024)]
    assert errors[1] < errors[0] and errors[1] < 0.15, errors


def test_batch_norm_refuses_a_different_second_batch():
    with pytest.raises(ValueError, match="couples the examples"):
        _bn_net(1).kernel_fn(X_BATCH, X_BATCH[:4] + 1)
