"""Gaussian-process posteriors of infinitely wide networks: NNGP, trained NTK ensemble, NTK-GP."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from entk._get import canonical_get
from entk.predict import _common as c

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("layout", "test_shape", "mode", "with_cov"))
def _posterior(layout: c.Layout, test_shape: tuple, mode: str, with_cov: bool, factor: Array,
               y: Array, k_td: Array, k_init_td: Array | None, k_ss: Array | None,
               nngp_dd: Array | None) -> Any:
    k_td2 = c.make_2d(k_td)
    mean = layout.unflat(k_td2 @ c.cho_solve(factor, layout.flat(y)), test_shape)
    if not with_cov:
        return mean
    k_ss2, k_init_td2 = c.make_2d(k_ss), c.make_2d(k_init_td)
    if mode in ("nngp", "ntkgp"):
        cov = k_ss2 - k_td2 @ c.cho_solve(factor, k_init_td2.T)
    else:
        term_1 = c.cho_solve(factor, k_td2.T)                   # Θ⁻¹ Θ_d*
        term_2 = k_td2 @ c.cho_solve(factor, k_init_td2.T)      # Θ_*d Θ⁻¹ K_d*
        cov = k_ss2 + term_1.T @ c.make_2d(nngp_dd) @ term_1 - term_2 - term_2.T
    return c.Gaussian(mean, c.zip_2d(cov, test_shape, test_shape))


def gp_inference(k_train_train: Any, y_train: Any, diag_reg: float = 0.0,
                 diag_reg_absolute_scale: bool = False,
                 trace_axes: c.Axes = (-1,)) -> Callable[..., Any]:
    """Posterior of the NNGP, of the NTK ensemble trained to convergence, or of the NTK-GP.

    - `"nngp"`: Bayesian posterior, mean `K_*d K⁻¹ y`, covariance `K_** − K_*d K⁻¹ K_d*`;
    - `"ntk"`: infinite ensemble of infinitely wide networks trained to `t = ∞` on MSE: mean
      `Θ_*d Θ⁻¹ y`, covariance `K_** + Θ_*d Θ⁻¹ K Θ⁻¹ Θ_d* − (Θ_*d Θ⁻¹ K_d* + transpose)`;
    - `"ntkgp"`: the GP with the NTK as covariance (He et al. 2020).

    Args:
      k_train_train: train-train kernel: an array, or an object with `nngp` / `ntk` (an
        `entk.stax.Kernel`, a `kernel_fn(..., get=("nngp", "ntk"))` namedtuple). The NTK
        covariance needs both.
      y_train: targets.
      diag_reg, diag_reg_absolute_scale, trace_axes: as `gradient_descent_mse`.

    Returns:
      `predict_fn(get=None, k_test_train=None, k_test_test=None)`: the means, or
      `Gaussian(mean, covariance)`s when `k_test_test` is given, for `get` (`"nngp"`, `"ntk"`,
      `"ntkgp"`, a tuple of them, or `None` for `("nngp", "ntk")`) — one value for a string, a
      `Gaussians` namedtuple otherwise. `k_test_train=None` predicts on the training set
      (`N(y_train, 0)`; pass any non-`None` `k_test_test`, e.g. `True`, for the covariance).
    """
    layout, y = c.make_layout(y_train, trace_axes)

    @functools.lru_cache(maxsize=2)
    def train(name: str) -> tuple[Array, Array]:
        k = c.kernel_entry(k_train_train, name, "k_train_train")
        c.check_train_kernel(k, layout, f"k_train_train ({name})", y.shape)
        return k, c.cholesky(k, diag_reg, diag_reg_absolute_scale, f"k_train_train ({name})")

    def predict_fn(get: Any = None, k_test_train: Any = None, k_test_test: Any = None) -> Any:
        names, single = canonical_get(get, ("nngp", "ntk", "ntkgp"), default=("nngp", "ntk"))
        out = {}
        for g in names:
            kname = "ntk" if g == "ntkgp" else g
            k_dd, factor = train(kname)
            if k_test_train is None:
                mean = y.astype(k_dd.dtype)
                out[g] = mean if k_test_test is None else c.Gaussian(mean, jnp.zeros_like(k_dd))
                continue
            k_td = c.kernel_entry(k_test_train, kname, "k_test_train")
            test_shape = c.test_free_shape(k_td, layout)
            with_cov = k_test_test is not None
            init = "ntk" if g == "ntkgp" else "nngp"
            k_init_td = k_ss = nngp_dd = None
            if with_cov:
                k_ss = c.kernel_entry(k_test_test, init, "k_test_test")
                k_init_td = c.kernel_entry(k_test_train, init, "k_test_train")
                if g == "ntk":
                    nngp_dd = c.kernel_entry(k_train_train, "nngp", "k_train_train")
            out[g] = _posterior(layout, test_shape, g, with_cov, factor, y.astype(k_dd.dtype),
                                k_td, k_init_td, k_ss, nngp_dd)
        return c.gaussians(names, single, out)

    return predict_fn
