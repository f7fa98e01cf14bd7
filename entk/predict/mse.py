"""Gradient flow on the MSE loss in closed form: one network, infinite ensembles, and step sizes.

Normalisations are neural-tangents 0.6.5's: the loss is `0.5·mean((f − y)²)` over all `n = y.size`
target entries, so `df/dt = −(η/n) Θ (f − y)` with `t` counted in steps of size `η`; `diag_reg` adds
`diag_reg · mean(diag Θ)` (or `diag_reg` with `diag_reg_absolute_scale=True`) to the train kernel's
diagonal, for both the eigendecomposition (finite `t`) and the Cholesky solve (`t=None`, i.e. ∞).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from entk._get import canonical_get
from entk.predict import _common as c
from entk.predict.gp import gp_inference

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("layout", "test_shape"))
def _mse_finite(layout: c.Layout, test_shape: tuple | None, evals: Array, evecs: Array, t: Array,
                y: Array, fx_train_0: Array | None, fx_test_0: Array | None,
                k_test_train: Array | None) -> tuple[Array | None, Array | None]:
    y_flat = layout.flat(y)
    f0 = jnp.zeros_like(y) if fx_train_0 is None else jnp.broadcast_to(fx_train_0, y.shape)
    diff = layout.flat(f0) - y_flat
    fx_train = fx_test = None
    if fx_train_0 is not None:
        delta = c.in_eigenbasis(evecs, c.expm1_evals(evals, t, layout.size), diff)
        fx_train = fx_train_0 + layout.unflat(delta, layout.free_shape, t.shape)
    if fx_test_0 is not None:
        inner = c.in_eigenbasis(evecs, c.inv_expm1_evals(evals, t, layout.size), diff)
        delta = jnp.einsum("mn,...nc->...mc", c.make_2d(k_test_train), inner)
        fx_test = fx_test_0 + layout.unflat(delta, test_shape, t.shape)
    return fx_train, fx_test


@functools.partial(jax.jit, static_argnames=("layout", "test_shape"))
def _mse_infinite(layout: c.Layout, test_shape: tuple | None, factor: Array, y: Array,
                  fx_train_0: Array | None, fx_test_0: Array | None,
                  k_test_train: Array | None) -> tuple[Array | None, Array | None]:
    fx_train = None if fx_train_0 is None else y
    fx_test = None
    if fx_test_0 is not None:
        rhs = layout.flat(y if fx_train_0 is None else y - jnp.broadcast_to(fx_train_0, y.shape))
        delta = c.make_2d(k_test_train) @ c.cho_solve(factor, rhs)
        fx_test = fx_test_0 + layout.unflat(delta, test_shape)
    return fx_train, fx_test


def gradient_descent_mse(k_train_train: Any, y_train: Any, learning_rate: float = 1.0,
                         diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False,
                         trace_axes: c.Axes = (-1,)) -> Callable[..., Any]:
    """Outputs of gradient flow on `0.5·mean((f − y)²)` with a constant kernel, in closed form.

    `f_train(t) = y + e^{−η t Θ/n}(f_train(0) − y)` and
    `f_test(t) = f_test(0) + Θ_test,train Θ⁻¹ (e^{−η t Θ/n} − I)(f_train(0) − y)`, `n = y.size`.

    Args:
      k_train_train: `(N, N, ...)` NTK (or NNGP) of the training inputs, traced along `trace_axes`
        (an array, or an object with an `ntk` attribute such as an `entk.stax.Kernel`).
      y_train: targets `(N, ...)`.
      learning_rate: step size `η`; `t` counts steps.
      diag_reg: diagonal regularisation, relative to the mean diagonal unless
        `diag_reg_absolute_scale`.
      trace_axes: output axes the kernel is traced over (it is `Θ ⊗ I` along them).

    Returns:
      `predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)` returning `fx_train_t`,
      `fx_test_t` (if `fx_train_0=None`) or both. `t` may be an array (its shape leads the outputs'
      shapes); `t=None` is infinite time, computed by a linear solve. The eigendecomposition or
      Cholesky factor of the train kernel is computed on first use and cached.
    """
    layout, y = c.make_layout(y_train, trace_axes)
    k = c.kernel_entry(k_train_train, "ntk", "k_train_train")
    c.check_train_kernel(k, layout, "k_train_train", y.shape)
    y = y.astype(k.dtype)
    cholesky = functools.lru_cache(1)(
        lambda: c.cholesky(k, diag_reg, diag_reg_absolute_scale, "k_train_train"))
    eigh = functools.lru_cache(1)(
        lambda: c.eigh(k, diag_reg, diag_reg_absolute_scale, "k_train_train"))

    def predict_fn(t: Any = None, fx_train_0: Any = 0.0, fx_test_0: Any = None,
                   k_test_train: Any = None) -> Any:
        c.check_predict_inputs(fx_train_0, fx_test_0, k_test_train)
        c.check_broadcast(fx_train_0, y.shape, "fx_train_0")
        test_shape = k_td = None
        if fx_test_0 is not None:
            k_td = c.kernel_entry(k_test_train, "ntk", "k_test_train")
            test_shape = c.test_free_shape(k_td, layout)
            c.check_broadcast(fx_test_0, layout.output_shape(test_shape), "fx_test_0")
            fx_test_0 = jnp.broadcast_to(fx_test_0, layout.output_shape(test_shape))
        if t is None:
            fx_train, fx_test = _mse_infinite(layout, test_shape, cholesky(), y, fx_train_0,
                                              fx_test_0, k_td)
        else:
            t = jnp.asarray(t, k.dtype) * learning_rate
            fx_train, fx_test = _mse_finite(layout, test_shape, *eigh(), t, y, fx_train_0,
                                            fx_test_0, k_td)
        if fx_test is None:
            return fx_train
        if fx_train is None:
            return fx_test
        return fx_train, fx_test

    return predict_fn


# ----------------------------------------------------------------------------------------------
# Infinite ensembles trained for finite time


@functools.partial(jax.jit, static_argnames=("layout", "test_shape", "mode", "with_cov"))
def _ensemble_finite(layout: c.Layout, test_shape: tuple, mode: str, with_cov: bool,
                     evals: Array, evecs: Array, t: Array, y: Array, g_td: Array | None,
                     g_dd: Array, nngp_td: Array | None, k_ss: Array | None,
                     nngp_dd: Array | None) -> Any:
    """Mean (and covariance) for kernel `mode` ("nngp" / "ntk"); `g_td=None` is the train set."""
    y_flat = layout.flat(y)
    if g_td is None:  # the training set: (I − e^{−Θt}) y
        mean_flat = c.in_eigenbasis(evecs, -c.expm1_evals(evals, t, layout.size), y_flat)
        g_td2 = c.make_2d(g_dd)
        nngp_td2 = None if nngp_dd is None else c.make_2d(nngp_dd)
    else:
        g_td2 = c.make_2d(g_td)
        nngp_td2 = None if nngp_td is None else c.make_2d(nngp_td)
        inner = c.in_eigenbasis(evecs, -c.inv_expm1_evals(evals, t, layout.size), y_flat)
        mean_flat = jnp.einsum("mn,...nc->...mc", g_td2, inner)
    mean = layout.unflat(mean_flat, test_shape, t.shape)
    if not with_cov:
        return mean
    k_ss2 = c.make_2d(k_ss)
    if mode == "nngp":  # K_** − K_*d K⁻¹ (I − e^{−2Kt}) K_d*
        cov = k_ss2 + jnp.einsum("mn,ni,...i,ki,lk->...ml", g_td2, evecs,
                                 c.inv_expm1_evals(evals, 2 * t, layout.size), evecs, g_td2)
    else:  # op = Θ_*d Θ⁻¹ (I − e^{−Θt})
        op = jnp.einsum("mn,ni,...i,ki->...mk", g_td2, evecs,
                        -c.inv_expm1_evals(evals, t, layout.size), evecs)
        cross = op @ nngp_td2.T
        cov = (k_ss2 + op @ c.make_2d(nngp_dd) @ jnp.swapaxes(op, -1, -2) - cross
               - jnp.swapaxes(cross, -1, -2))
    return c.Gaussian(mean, c.zip_2d(cov, test_shape, test_shape, t.shape))


def _test_train_kwargs(train_kw: dict, test_kw: dict) -> dict:
    """kwargs for `kernel_fn(x_test, x_train)`: pairs combine (test first), the rest must agree."""
    merged = {}
    for key in set(train_kw) | set(test_kw):
        a, b = test_kw.get(key, train_kw.get(key)), train_kw.get(key, test_kw.get(key))
        if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) == 2:
            merged[key] = (a[0], b[1])
        elif a is b:
            merged[key] = a
        else:
            raise ValueError(f"kernel_fn keyword {key!r} differs between the train-train and "
                             f"test-test calls; pass it as a pair (x1 value, x2 value) instead.")
    return merged


def gradient_descent_mse_ensemble(kernel_fn: Callable[..., Any], x_train: Any, y_train: Any,
                                  learning_rate: float = 1.0, diag_reg: float = 0.0,
                                  diag_reg_absolute_scale: bool = False,
                                  trace_axes: c.Axes = (-1,),
                                  **kernel_fn_train_train_kwargs: Any) -> Callable[..., Any]:
    """Mean (and covariance) of an infinite ensemble of infinitely wide networks trained by gradient
    flow on MSE for time `t`, marginalised over initialisation (Lee et al. 2019, eq. 16).

    With `Θ` the NTK, `K` the NNGP and `E(t) = I − e^{−η t Θ/n}` (`n = y.size`): mean `Θ_*d Θ⁻¹ E y`,
    covariance `K_** + Θ_*d Θ⁻¹ E K E Θ⁻¹ Θ_d* − (Θ_*d Θ⁻¹ E K_d* + transpose)`. `get="nngp"` puts
    `K` in place of `Θ` (a network whose readout alone is trained).

    Args:
      kernel_fn: `kernel_fn(x1, x2, get, **kw)` returning an object with `nngp` / `ntk` (an
        `entk.stax` kernel_fn, a Monte Carlo or an empirical kernel_fn with `params=` in `kw`).
      x_train, y_train: training inputs and targets.
      learning_rate, diag_reg, diag_reg_absolute_scale, trace_axes: as `gradient_descent_mse`.
      kernel_fn_train_train_kwargs: passed to `kernel_fn` for the train-train kernel, and (unless
        overridden at prediction) for the test ones.

    Returns:
      `predict_fn(t=None, x_test=None, get=None, compute_cov=False, **kernel_fn_test_test_kwargs)`:
      means, or `Gaussian(mean, covariance)`s with `compute_cov`, on `x_test` (the training set if
      `None`) at time(s) `t` (`None`: infinity); one value for a string `get`, a `Gaussians`
      namedtuple for a tuple or `None` (both).
    """
    layout, y = c.make_layout(y_train, trace_axes)
    train_kw = dict(kernel_fn_train_train_kwargs)
    train_entries: dict[str, Array] = {}

    def train_kernels(names: tuple[str, ...]) -> c.Kernels:
        """Train-train kernels by name, each computed once (missing ones in a single call)."""
        missing = tuple(n for n in names if n not in train_entries)
        if missing:
            k = kernel_fn(x_train, None, missing, **train_kw)
            for name in missing:
                value = c.kernel_entry(k, name, "kernel_fn(x_train, None)")
                c.check_train_kernel(value, layout, f"kernel_fn(x_train, None, {name!r})", y.shape)
                train_entries[name] = value
        return c.Kernels(**{n: train_entries[n] for n in names})

    @functools.lru_cache(maxsize=2)
    def eigen(name: str) -> tuple[Array, Array]:
        k = getattr(train_kernels((name,)), name)
        return c.eigh(k, diag_reg, diag_reg_absolute_scale, f"train {name}")

    def predict_fn(t: Any = None, x_test: Any = None, get: Any = None, compute_cov: bool = False,
                   **kernel_fn_test_test_kwargs: Any) -> Any:
        names, single = canonical_get(get, ("nngp", "ntk"), default=("nngp", "ntk"))
        needed = tuple(n for n in ("nngp", "ntk") if n in names or (n == "nngp" and compute_cov))
        k_dd = train_kernels(needed)
        k_td = k_ss = None
        if x_test is None:
            test_shape = layout.free_shape
            if compute_cov:
                k_ss = k_dd.nngp
        else:
            raw = kernel_fn(x_test, x_train, needed,
                            **_test_train_kwargs(train_kw, kernel_fn_test_test_kwargs))
            k_td = c.Kernels(**{n: c.kernel_entry(raw, n, "kernel_fn(x_test, x_train)")
                                for n in needed})
            test_shape = c.test_free_shape(getattr(k_td, needed[0]), layout,
                                           "kernel_fn(x_test, x_train)")
            if compute_cov:
                k_ss = c.kernel_entry(
                    kernel_fn(x_test, None, "nngp", **{**train_kw, **kernel_fn_test_test_kwargs}),
                    "nngp", "kernel_fn(x_test, None)")

        if t is None:
            gp = gp_inference(k_dd, y, diag_reg, diag_reg_absolute_scale, layout.trace)
            k_test_test = (True if k_ss is None else k_ss) if compute_cov else None
            return gp(names[0] if single else names, k_td, k_test_test)

        out = {}
        for g in names:
            evals, evecs = eigen(g)
            t_arr = np.asarray(t, evals.dtype) * learning_rate
            out[g] = _ensemble_finite(
                layout, test_shape, g, compute_cov, evals, evecs, t_arr, y.astype(evals.dtype),
                None if k_td is None else getattr(k_td, g), getattr(k_dd, g),
                None if k_td is None else k_td.nngp, k_ss, k_dd.nngp)
        return c.gaussians(names, single, out)

    return predict_fn


# ----------------------------------------------------------------------------------------------
# Learning rate


def max_learning_rate(ntk_train_train: Any, y_train_size: int | None = None,
                      momentum: float = 0.0, eps: float = 1e-12) -> float:
    """Largest stable learning rate of (momentum) gradient descent on `0.5·mean((f − y)²)`:
    `2 (1 + momentum) · y_train_size / (λ_max(Θ) + eps)`.

    `y_train_size` defaults to the kernel's 2-D size (as if `trace_axes=()`). Only the top
    eigenvalue is computed (SciPy's `eigh(..., subset_by_index=...)`).
    """
    import scipy.linalg

    k2d = np.asarray(c.make_2d(c.kernel_entry(ntk_train_train, "ntk", "ntk_train_train")))
    n = k2d.shape[0]
    factor = n if y_train_size is None else y_train_size
    top = scipy.linalg.eigh(k2d, eigvals_only=True, subset_by_index=[n - 1, n - 1])[-1]
    return float(2 * (1 + momentum) * factor / (top + eps))
