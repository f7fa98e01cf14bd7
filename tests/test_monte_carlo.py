"""entk.monte_carlo_kernel_fn and the finite-network side of entk.stax.

Averages of empirical kernels over initialisations approach the analytic kernel as samples and
width grow; for a network with one hidden layer the expectation is exact at any width except for
`LayerNorm`'s O(1/width) bias. `Conv`, `LayerNorm` over spatial axes, `Dropout` and global pooling are
checked this way.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import entk
from entk import stax

RNG = np.random.RandomState(0)
X1 = RNG.normal(size=(3, 4))
X2 = RNG.normal(size=(2, 4))
IMAGES = RNG.normal(size=(3, 3, 3, 2))
KEY = jax.random.PRNGKey(42)


def rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# Conv → LayerNorm over (H, W, C) → Relu → Dropout → GlobalAvgPool → Dense(8 outputs, traced).
NETWORK_LAYERS = (stax.Conv(128, (2, 2), padding="SAME", W_std=1.4, b_std=0.3),
                  stax.LayerNorm(axis=(1, 2, 3)), stax.Relu(), stax.Dropout(0.8),
                  stax.GlobalAvgPool(), stax.Dense(8, W_std=1.2, b_std=0.2))
NETWORK = stax.serial(*NETWORK_LAYERS)


@pytest.fixture(scope="module")
def estimates():
    init_fn, apply_fn, _ = NETWORK
    kernel_fn = entk.monte_carlo_kernel_fn(init_fn, apply_fn, KEY, (4, 256), implementation="jc")
    return list(kernel_fn(IMAGES, None, ("nngp", "ntk")))


def test_monte_carlo_approaches_the_analytic_kernel(estimates):
    analytic = NETWORK.kernel_fn(IMAGES, None, ("nngp", "ntk"))
    few, many = estimates
    assert many.ntk.shape == many.nngp.shape == (3, 3)
    # Dropout only raises the variance of an example with itself (by 1/rate before the readout).
    # After global pooling only same-position pairs of the same example are boosted (by 1/rate).
    no_dropout = stax.serial(*NETWORK_LAYERS[:3], stax.Dropout(0.8, mode="test"),
                             *NETWORK_LAYERS[4:]).kernel_fn(IMAGES, None, ("nngp", "ntk"))
    off = ~np.eye(3, dtype=bool)
    for name in ("nngp", "ntk"):
        with_d, without = np.asarray(getattr(analytic, name)), np.asarray(getattr(no_dropout, name))
        assert np.allclose(with_d[off], without[off], rtol=1e-12)
        assert np.all(np.diag(with_d) > np.diag(without) * 1.03)
    for name, tol in (("nngp", 0.04), ("ntk", 0.015)):
        err_many = rel_err(getattr(many, name), getattr(analytic, name))
        err_few = rel_err(getattr(few, name), getattr(analytic, name))
        assert err_many < tol, (name, err_many)
        assert err_many < err_few, name


def test_sample_counts_reuse_samples_and_batching_is_exact():
    init_fn, apply_fn, _ = stax.serial(stax.Dense(16, b_std=0.1), stax.Erf(), stax.Dense(2))
    x1, x2 = RNG.normal(size=(4, 4)), RNG.normal(size=(2, 4))

    def mc(n_samples, **kwargs):
        return entk.monte_carlo_kernel_fn(init_fn, apply_fn, KEY, n_samples, implementation="jc",
                                          **kwargs)

    one, two = list(mc({2, 1})(x1, x2, "ntk"))  # a generator over increasing counts
    two_direct = mc(2)(x1, x2, "ntk")
    assert np.allclose(two, two_direct, rtol=1e-12, atol=0)
    assert not np.allclose(one, two)
    batched = mc(2, batch_size=2)(x1, x2, "ntk")  # 2 × 1 blocks of 2 × 2 examples
    assert batched.shape == (4, 2)
    assert np.allclose(batched, two_direct, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="sample counts must be positive"):
        mc(0)


def test_stax_apply_fn_is_a_model_for_the_core():
    """The finite network is an `f(params, x)` that `entk.ntk` takes directly (NumPy in, NumPy out)."""
    init_fn, apply_fn, _ = stax.serial(stax.Dense(32, b_std=0.1), stax.Gelu(), stax.Dense(2))
    shapes = jax.eval_shape(lambda k: init_fn(k, X1.shape)[1], KEY)
    params = jax.tree_util.tree_map(lambda s: RNG.normal(size=s.shape), shapes)
    via_ntk = entk.ntk(apply_fn, X1, X2, params=params)
    direct = jax.jit(entk.empirical_ntk_fn(apply_fn, implementation="jc"))(X1, X2, params)
    assert isinstance(via_ntk, np.ndarray) and via_ntk.shape == (3, 2)
    assert rel_err(via_ntk, direct) < 1e-12
