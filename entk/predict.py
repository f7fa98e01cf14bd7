"""Predictions from kernels: gradient-flow training in closed form or by ODE, and GP posteriors.

Signatures, normalisations and array layouts follow neural-tangents 0.6.5, so its users get the same
numbers:

- Kernels are laid out `(N1, N2, A1, A2, ...)` for outputs `(N, A, ..., C)` whose `trace_axes` (default:
  the last, the logits) are absent: the kernel is `Θ ⊗ I` along them.
- The MSE loss is `0.5 · mean((f − y)²)` over *all* entries of `y`, so gradient flow is
  `df/dt = −(η / y.size) Θ (f − y)`; time `t` is in steps of size `learning_rate` (`η t`).
- `diag_reg` adds `diag_reg · mean(diag K)` to the train kernel's diagonal (`diag_reg_absolute_scale=
  True`: `diag_reg` itself), for both the eigendecomposition (finite `t`) and the Cholesky solve
  (`t=None`, i.e. infinite time).

All functions accept kernels as arrays or as objects with `nngp` / `ntk` attributes (an
`entk.stax.Kernel`, the namedtuples `kernel_fn(..., get=("nngp", "ntk"))` returns).
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Axes = int | Sequence[int]


class _Pair(NamedTuple):
    """Kernels by name; a missing one is `None`."""

    nngp: Array | None = None
    ntk: Array | None = None


class Gaussian(NamedTuple):
    """Mean and covariance of a predictive distribution; `covariance` is laid out like a kernel."""

    mean: Array
    covariance: Array


# ----------------------------------------------------------------------------------------------
# Layout helpers


class _Targets:
    """`y_train` with its trace axes: flattening to `(n, c)` matrices and back.

    `n` is the product of the non-traced axes (matching the kernel's 2-D form), `c` of the traced.
    """

    def __init__(self, y: Any, trace_axes: Axes, name: str = "y_train"):
        y = jnp.asarray(y)
        if y.ndim == 0:
            raise ValueError(f"{name} is a scalar; it needs a batch axis, e.g. shape (N, outputs).")
        axes = (trace_axes,) if isinstance(trace_axes, int) else tuple(trace_axes)
        for a in axes:
            if not -y.ndim <= a < y.ndim:
                raise ValueError(f"trace_axes={trace_axes} has axis {a}, out of range for {name} "
                                 f"of shape {y.shape}.")
        self.trace = tuple(sorted({a % y.ndim for a in axes}))
        self.free = tuple(a for a in range(y.ndim) if a not in self.trace)
        if not self.free:
            raise ValueError(f"trace_axes={trace_axes} covers every axis of {name} {y.shape}; the "
                             f"batch axis cannot be traced.")
        self.y = y
        self.ndim = y.ndim
        self.trace_shape = tuple(y.shape[a] for a in self.trace)
        self.free_shape = tuple(y.shape[a] for a in self.free)
        self.size = y.size

    def kernel_shape(self, test_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """Interleaved shape of a kernel between (test or train) outputs and train outputs."""
        first = self.free_shape if test_shape is None else test_shape
        return tuple(d for pair in zip(first, self.free_shape) for d in pair)

    def flat(self, f: Array) -> Array:
        """`(…free, …trace)` in `y`'s order → `(n, c)`."""
        f = jnp.moveaxis(f, self.trace, range(self.ndim - len(self.trace), self.ndim))
        return f.reshape(math.prod(f.shape[:len(self.free)]), -1)

    def unflat(self, z: Array, free_shape: tuple[int, ...], leading: tuple[int, ...] = ()) -> Array:
        """`(*leading, n, c)` → `(*leading, …)` with the trace axes back at their positions."""
        z = z.reshape(leading + free_shape + self.trace_shape)
        n_t = len(self.trace)
        dest = [len(leading) + a for a in self.trace]
        return jnp.moveaxis(z, range(z.ndim - n_t, z.ndim), dest)


def _make_2d(k: Array) -> Array:
    """`(A1, B1, A2, B2, …)` → `(A1·A2·…, B1·B2·…)`."""
    even, odd = tuple(range(0, k.ndim, 2)), tuple(range(1, k.ndim, 2))
    rows = math.prod(k.shape[i] for i in even)
    return jnp.transpose(k, even + odd).reshape(rows, -1)


def _zip_2d(mat: Array, shape1: tuple[int, ...], shape2: tuple[int, ...],
            leading: tuple[int, ...] = ()) -> Array:
    """Inverse of `_make_2d` (with optional leading axes): `(*lead, Π s1, Π s2)` → interleaved."""
    n = len(shape1)
    mat = mat.reshape(leading + shape1 + shape2)
    lead = tuple(range(len(leading)))
    order = lead + tuple(len(leading) + i + j * n for i in range(n) for j in (0, 1))
    return jnp.transpose(mat, order)


def _kernel_entry(k: Any, name: str, what: str) -> Array:
    """`k` itself if it is an array, else its `nngp` / `ntk` attribute."""
    if hasattr(k, "nngp") or hasattr(k, "ntk"):
        value = getattr(k, name, None)
        if value is None:
            raise ValueError(f"{what} has no {name!r} kernel; compute it with get=(..., {name!r}).")
        return jnp.asarray(value)
    return jnp.asarray(k)


def _check_kernel_shape(k: Array, expected: tuple[int, ...], what: str, targets: _Targets) -> None:
    if tuple(k.shape) != tuple(expected):
        raise ValueError(
            f"{what} has shape {tuple(k.shape)}, but y_train of shape {tuple(targets.y.shape)} with "
            f"trace_axes={targets.trace} needs {tuple(expected)} (each non-traced output axis twice, "
            f"interleaved: (N1, N2, ...)).")


def _test_free_shape(k_test_train: Array, targets: _Targets) -> tuple[int, ...]:
    n = len(targets.free)
    if k_test_train.ndim != 2 * n or tuple(k_test_train.shape[1::2]) != targets.free_shape:
        raise ValueError(
            f"k_test_train has shape {tuple(k_test_train.shape)}, but y_train of shape "
            f"{tuple(targets.y.shape)} with trace_axes={targets.trace} needs "
            f"(N_test, {targets.free_shape[0]}, ...) interleaved: {2 * n} axes whose odd ones are "
            f"{targets.free_shape}.")
    return tuple(k_test_train.shape[0::2])


def _is_concrete(*arrays: Any) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def _regularize(k2d: Array, diag_reg: float, absolute: bool) -> Array:
    scale = diag_reg if absolute else diag_reg * jnp.trace(k2d) / k2d.shape[0]
    return k2d + scale * jnp.eye(k2d.shape[0], dtype=k2d.dtype)


class _Cholesky:
    """Cached Cholesky factor of a regularised train kernel (2-D), with a clear failure message."""

    def __init__(self, k2d: Array, diag_reg: float, absolute: bool, what: str):
        a = _regularize(k2d, diag_reg, absolute)
        self.factor = jax.scipy.linalg.cho_factor(a, lower=True)
        if _is_concrete(a) and not bool(jnp.all(jnp.isfinite(self.factor[0]))):
            hint = ("diag_reg=0, so a singular or indefinite kernel cannot be inverted; pass e.g. "
                    "diag_reg=1e-4 (relative to the mean diagonal)" if diag_reg == 0 else
                    f"diag_reg={diag_reg} is too small; increase it")
            raise ValueError(f"{what} (+ diag_reg·I) is not positive definite: its Cholesky "
                             f"factorisation failed. {hint}.")

    def solve(self, b: Array) -> Array:
        return jax.scipy.linalg.cho_solve(self.factor, b)


class _Eigen:
    """Cached eigendecomposition of a regularised train kernel (2-D)."""

    def __init__(self, k2d: Array, diag_reg: float, absolute: bool, what: str):
        a = _regularize(k2d, diag_reg, absolute)
        self.evals, self.evecs = jnp.linalg.eigh(a)
        if _is_concrete(a):
            lo, hi = float(self.evals[0]), float(jnp.max(jnp.abs(self.evals)))
            if not np.isfinite(lo) or lo < -1e-6 * max(hi, 1e-300):
                raise ValueError(f"{what} is not positive semi-definite (eigenvalues from {lo:.3g} "
                                 f"to {float(self.evals[-1]):.3g}); is it the kernel of x_train with "
                                 f"itself? A tiny negative part from round-off is fine; add "
                                 f"diag_reg if needed.")

    def apply(self, fn_of_evals: Array, b: Array) -> Array:
        """`V diag(g) Vᵀ b` for `g` of shape `(*lead, n)` and `b` `(n, c)` → `(*lead, n, c)`."""
        proj = self.evecs.T @ b
        return jnp.einsum("ji,...i,ic->...jc", self.evecs, fn_of_evals, proj)


def _expm1(evals: Array, t: Array, normalization: float) -> Array:
    """`exp(−max(λ, 0)·t/n) − 1` (negative round-off eigenvalues count as zero), shape `t.shape + λ`."""
    return jnp.expm1(-jnp.maximum(evals, 0) * t[..., None] / normalization)


def _inv_expm1(evals: Array, t: Array, normalization: float) -> Array:
    """`(exp(−λ t/n) − 1)/λ`, continued by its limit `−t/n` at `λ = 0`."""
    num = _expm1(evals, t, normalization)
    abs_evals = jnp.abs(evals)
    zero = abs_evals == 0
    limit = -jnp.broadcast_to(t[..., None], num.shape) / normalization
    return jnp.where(zero, limit, num / jnp.where(zero, 1.0, abs_evals))


# ----------------------------------------------------------------------------------------------
# Gradient descent on MSE, closed form


def _check_predict_inputs(fx_train_0: Any, fx_test_0: Any, k_test_train: Any) -> None:
    if fx_train_0 is None and fx_test_0 is None:
        raise ValueError("fx_train_0 and fx_test_0 are both None: nothing to predict. Pass the "
                         "network's outputs at t=0 (or 0.) for the sets you want.")
    if fx_test_0 is not None and k_test_train is None:
        raise ValueError("fx_test_0 is given but k_test_train is None; pass the test-train kernel "
                         "to predict on the test set.")


def gradient_descent_mse(k_train_train: Any, y_train: Any, learning_rate: float = 1.0,
                         diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False,
                         trace_axes: Axes = (-1,)) -> Callable[..., Any]:
    """Outputs of gradient flow on `0.5·mean((f − y)²)` with a constant kernel, in closed form.

    `f_train(t) = y + e^{−η t Θ/n}(f_train(0) − y)` and
    `f_test(t) = f_test(0) + Θ_test,train Θ⁻¹ (e^{−η t Θ/n} − I)(f_train(0) − y)` with `n = y.size`.

    Args:
      k_train_train: `(N, N, ...)` NTK (or NNGP) of the training inputs, traced along `trace_axes`.
      y_train: targets `(N, ...)`.
      learning_rate: step size `η`; `t` counts steps.
      diag_reg: diagonal regularisation (relative to the mean diagonal unless
        `diag_reg_absolute_scale`).
      trace_axes: output axes the kernel is traced over.

    Returns:
      `predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)` returning `fx_train_t`,
      `fx_test_t` (if `fx_train_0=None`) or both; `t` may be an array (leading axes of the outputs);
      `t=None` is infinite time, computed with a linear solve.
    """
    targets = _Targets(y_train, trace_axes)
    k = _kernel_entry(k_train_train, "ntk", "k_train_train")
    _check_kernel_shape(k, targets.kernel_shape(), "k_train_train", targets)
    k2d = _make_2d(k)
    y_flat = targets.flat(targets.y).astype(k2d.dtype)

    cholesky = functools.lru_cache(1)(
        lambda: _Cholesky(k2d, diag_reg, diag_reg_absolute_scale, "k_train_train"))
    eigen = functools.lru_cache(1)(
        lambda: _Eigen(k2d, diag_reg, diag_reg_absolute_scale, "k_train_train"))

    def predict_fn(t: Any = None, fx_train_0: Any = 0.0, fx_test_0: Any = None,
                   k_test_train: Any = None) -> Any:
        _check_predict_inputs(fx_train_0, fx_test_0, k_test_train)
        k_tt = None
        if fx_test_0 is not None:
            k_tt = _kernel_entry(k_test_train, "ntk", "k_test_train")
            test_shape = _test_free_shape(k_tt, targets)
            fx_test_0 = jnp.broadcast_to(fx_test_0, _test_output_shape(targets, test_shape))

        if t is None:
            fx_train = None if fx_train_0 is None else targets.y.astype(k2d.dtype)
            fx_test = None
            if fx_test_0 is not None:
                rhs = y_flat if fx_train_0 is None else y_flat - targets.flat(
                    jnp.broadcast_to(fx_train_0, targets.y.shape))
                delta = _make_2d(k_tt) @ cholesky().solve(rhs)
                fx_test = fx_test_0 + targets.unflat(delta, test_shape)
        else:
            t = jnp.asarray(t, k2d.dtype) * learning_rate
            eig = eigen()
            diff = -y_flat if fx_train_0 is None else targets.flat(
                jnp.broadcast_to(fx_train_0, targets.y.shape)) - y_flat
            fx_train = fx_test = None
            if fx_train_0 is not None:
                delta = eig.apply(_expm1(eig.evals, t, targets.size), diff)
                fx_train = fx_train_0 + targets.unflat(delta, targets.free_shape, t.shape)
            if fx_test_0 is not None:
                inner = eig.apply(_inv_expm1(eig.evals, t, targets.size), diff)
                delta = jnp.einsum("mn,...nc->...mc", _make_2d(k_tt), inner)
                fx_test = fx_test_0 + targets.unflat(delta, test_shape, t.shape)

        if fx_test is None:
            return fx_train
        if fx_train is None:
            return fx_test
        return fx_train, fx_test

    return predict_fn


def _test_output_shape(targets: _Targets, test_free: tuple[int, ...]) -> tuple[int, ...]:
    shape = [0] * targets.ndim
    for a, s in zip(targets.free, test_free):
        shape[a] = s
    for a, s in zip(targets.trace, targets.trace_shape):
        shape[a] = s
    return tuple(shape)


# ----------------------------------------------------------------------------------------------
# Gaussian process inference


def _gaussians(names: tuple[str, ...], single: bool, out: dict) -> Any:
    if single:
        return out[names[0]]
    return collections.namedtuple("Gaussians", names)(*(out[n] for n in names))


def _canonical_gp_get(get: Any, allowed: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
    if get is None:
        return ("nngp", "ntk"), False
    single = isinstance(get, str)
    names = (get,) if single else tuple(get)
    for n in names:
        if n not in allowed:
            raise ValueError(f"get={get!r}: unknown {n!r}; use {', '.join(map(repr, allowed))} or a "
                             f"tuple of them.")
    return names, single


def gp_inference(k_train_train: Any, y_train: Any, diag_reg: float = 0.0,
                 diag_reg_absolute_scale: bool = False,
                 trace_axes: Axes = (-1,)) -> Callable[..., Any]:
    """Posterior of the NNGP, of the NTK ensemble trained to convergence, or of the NTK-GP.

    - `"nngp"`: Bayesian posterior, mean `K_*d K⁻¹ y`, covariance `K_** − K_*d K⁻¹ K_d*`;
    - `"ntk"`: infinite ensemble of infinitely wide networks trained to `t = ∞` on MSE, mean
      `Θ_*d Θ⁻¹ y`, covariance `K_** + Θ_*d Θ⁻¹ K Θ⁻¹ Θ_d* − (Θ_*d Θ⁻¹ K_d* + transpose)`;
    - `"ntkgp"`: the GP with the NTK as covariance.

    `k_train_train` (and the test kernels later) are arrays or objects with `nngp` / `ntk`; the NTK
    covariance needs both. Returns `predict_fn(get=None, k_test_train=None, k_test_test=None)`:
    the means (or `Gaussian(mean, covariance)`s when `k_test_test` is given) for `get` — one value
    for a string, a `Gaussians` namedtuple for a tuple. `k_test_train=None` predicts on the training
    set (`N(y_train, 0)`).
    """
    targets = _Targets(y_train, trace_axes)
    y_flat_cache: dict = {}

    @functools.lru_cache(maxsize=3)
    def train(name: str) -> tuple[Array, _Cholesky]:
        k = _kernel_entry(k_train_train, name, "k_train_train")
        _check_kernel_shape(k, targets.kernel_shape(), f"k_train_train ({name})", targets)
        k2d = _make_2d(k)
        return k2d, _Cholesky(k2d, diag_reg, diag_reg_absolute_scale, f"k_train_train ({name})")

    def k_inv_y(name: str) -> Array:
        if name not in y_flat_cache:
            k2d, chol = train(name)
            y_flat_cache[name] = chol.solve(targets.flat(targets.y).astype(k2d.dtype))
        return y_flat_cache[name]

    def predict_fn(get: Any = None, k_test_train: Any = None, k_test_test: Any = None) -> Any:
        names, single = _canonical_gp_get(get, ("nngp", "ntk", "ntkgp"))
        out = {}
        for g in names:
            kname = "ntk" if g == "ntkgp" else g
            k_dd, chol = train(kname)
            if k_test_train is None:
                mean = targets.y.astype(k_dd.dtype)
                out[g] = mean if k_test_test is None else Gaussian(
                    mean, _zip_2d(jnp.zeros_like(k_dd), targets.free_shape, targets.free_shape))
                continue
            k_td = _kernel_entry(k_test_train, kname, "k_test_train")
            test_shape = _test_free_shape(k_td, targets)
            k_td2 = _make_2d(k_td)
            mean = targets.unflat(k_td2 @ k_inv_y(kname), test_shape)
            if k_test_test is None:
                out[g] = mean
                continue
            init = "ntk" if g == "ntkgp" else "nngp"
            k_ss = _make_2d(_kernel_entry(k_test_test, init, "k_test_test"))
            k_init_td = _make_2d(_kernel_entry(k_test_train, init, "k_test_train"))
            if g in ("nngp", "ntkgp"):
                cov = k_ss - k_td2 @ chol.solve(k_init_td.T)
            else:
                nngp_dd = _make_2d(_kernel_entry(k_train_train, "nngp", "k_train_train"))
                term_1 = chol.solve(k_td2.T)                      # Θ⁻¹ Θ_d*
                term_2 = k_td2 @ chol.solve(k_init_td.T)          # Θ_*d Θ⁻¹ K_d*
                cov = k_ss + term_1.T @ nngp_dd @ term_1 - term_2 - term_2.T
            out[g] = Gaussian(mean, _zip_2d(cov, test_shape, test_shape))
        return _gaussians(names, single, out)

    return predict_fn


# ----------------------------------------------------------------------------------------------
# Infinite ensembles trained for finite time


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
                                  diag_reg_absolute_scale: bool = False, trace_axes: Axes = (-1,),
                                  **kernel_fn_train_train_kwargs: Any) -> Callable[..., Any]:
    """Mean (and covariance) of an infinite ensemble of infinitely wide networks trained by gradient
    flow on MSE for time `t`, marginalised over initialisation (Lee et al. 2019, eq. 16).

    With `Θ` the NTK, `K` the NNGP, `E(t) = I − e^{−η t Θ/n}` (`n = y.size`):
    mean `Θ_*d Θ⁻¹ E y`, covariance
    `K_** + Θ_*d Θ⁻¹ E K E Θ⁻¹ Θ_d* − (Θ_*d Θ⁻¹ E K_d* + transpose)`. `get="nngp"` puts `K` in place of
    `Θ` (training only the readout).

    `kernel_fn(x1, x2, get, **kw)` must return objects with `nngp` / `ntk` (e.g. an `entk.stax`
    kernel_fn, a Monte Carlo or empirical kernel_fn). Returns
    `predict_fn(t=None, x_test=None, get=None, compute_cov=False, **kernel_fn_test_test_kwargs)`:
    means or `Gaussian`s on `x_test` (the training set if `None`) at time(s) `t` (`None`: infinity).
    """
    targets = _Targets(y_train, trace_axes)
    train_kw = dict(kernel_fn_train_train_kwargs)

    train_entries: dict[str, Array] = {}

    def train_kernels(names: tuple[str, ...]) -> dict[str, Array]:
        """Train-train kernels by name, each computed once (missing ones in a single call)."""
        missing = tuple(n for n in names if n not in train_entries)
        if missing:
            k = kernel_fn(x_train, None, missing, **train_kw)
            for name in missing:
                value = _kernel_entry(k, name, "kernel_fn(x_train, None)")
                _check_kernel_shape(value, targets.kernel_shape(),
                                    f"kernel_fn(x_train, None, {name!r})", targets)
                train_entries[name] = value
        return {n: train_entries[n] for n in names}

    @functools.lru_cache(maxsize=2)
    def eigen(name: str) -> _Eigen:
        k = train_kernels((name,))[name]
        return _Eigen(_make_2d(k), diag_reg, diag_reg_absolute_scale, f"train {name}")

    def predict_fn(t: Any = None, x_test: Any = None, get: Any = None, compute_cov: bool = False,
                   **kernel_fn_test_test_kwargs: Any) -> Any:
        names, single = _canonical_gp_get(get, ("nngp", "ntk"))
        needed = tuple(n for n in ("nngp", "ntk")
                       if n in names or (n == "nngp" and compute_cov))
        k_dd = _Pair(**train_kernels(needed))
        if x_test is None:
            k_td, k_ss, test_shape = None, None, targets.free_shape
            if compute_cov:
                k_ss = k_dd.nngp
        else:
            k_td = kernel_fn(x_test, x_train, needed,
                             **_test_train_kwargs(train_kw, kernel_fn_test_test_kwargs))
            k_td = _Pair(**{n: _kernel_entry(k_td, n, "kernel_fn(x_test, x_train)")
                            for n in needed})
            test_shape = _test_free_shape(getattr(k_td, needed[0]), targets)
            k_ss = None
            if compute_cov:
                k_ss = _kernel_entry(
                    kernel_fn(x_test, None, "nngp", **{**train_kw, **kernel_fn_test_test_kwargs}),
                    "nngp", "kernel_fn(x_test, None)")

        if t is None:
            gp = gp_inference(k_dd, targets.y, diag_reg, diag_reg_absolute_scale, targets.trace)
            return gp(names if not single else names[0], k_td,
                      (k_ss if k_ss is not None else True) if compute_cov else None)

        y_flat = targets.flat(targets.y)
        out = {}
        for g in names:
            eig = eigen(g)
            dtype = eig.evals.dtype
            t_arr = jnp.asarray(t, dtype) * learning_rate
            if k_td is None:
                mean_flat = eig.apply(-_expm1(eig.evals, t_arr, targets.size), y_flat.astype(dtype))
                g_td = _make_2d(_kernel_entry(k_dd, g, "kernel_fn(x_train, None)"))
            else:
                g_td = _make_2d(_kernel_entry(k_td, g, "kernel_fn(x_test, x_train)"))
                inner = eig.apply(-_inv_expm1(eig.evals, t_arr, targets.size), y_flat.astype(dtype))
                mean_flat = jnp.einsum("mn,...nc->...mc", g_td, inner)
            mean = targets.unflat(mean_flat, test_shape, t_arr.shape)
            if not compute_cov:
                out[g] = mean
                continue
            k_ss2 = _make_2d(_kernel_entry(k_ss, "nngp", "kernel_fn(x_test, None)"))
            nngp_td = g_td if g == "nngp" else _make_2d(
                _kernel_entry(k_dd if k_td is None else k_td, "nngp", "test-train kernel"))
            # op = Θ_*d Θ⁻¹ E(t) as a (…t, m, n) matrix, in the eigenbasis of the regularised Θ.
            op = jnp.einsum("mn,ni,...i,ki->...mk", g_td, eig.evecs,
                            -_inv_expm1(eig.evals, t_arr, targets.size), eig.evecs)
            if g == "nngp":
                cov = k_ss2 + jnp.einsum("mn,ni,...i,ki,lk->...ml", g_td, eig.evecs,
                                         _inv_expm1(eig.evals, 2 * t_arr, targets.size), eig.evecs,
                                         g_td)
            else:
                nngp_dd = _make_2d(_kernel_entry(k_dd, "nngp", "kernel_fn(x_train, None)"))
                cross = op @ nngp_td.T
                cov = (k_ss2 + op @ nngp_dd @ jnp.swapaxes(op, -1, -2) - cross
                       - jnp.swapaxes(cross, -1, -2))
            out[g] = Gaussian(mean, _zip_2d(cov, test_shape, test_shape, t_arr.shape))
        return _gaussians(names, single, out)

    return predict_fn


# ----------------------------------------------------------------------------------------------
# Any loss, by ODE


class ODEState(NamedTuple):
    """State of `gradient_descent`'s ODE: outputs and (with momentum) their velocities."""

    fx_train: Array | None = None
    fx_test: Array | None = None
    qx_train: Array | None = None
    qx_test: Array | None = None


def gradient_descent(loss: Callable[[Array, Array], Array], k_train_train: Any, y_train: Any,
                     learning_rate: float = 1.0, momentum: float | None = None,
                     trace_axes: Axes = (-1,)) -> Callable[..., Any]:
    """Outputs of function-space gradient flow on any `loss(fx_train, y_train)`, by ODE integration.

    `df/dt = −Θ ∇_f loss` in steps of `learning_rate`. With `momentum`, the continuous-time heavy-ball
    method is solved in units of `√learning_rate`: `df/dt = q`, `dq/dt = −Θ ∇_f loss +
    (momentum − 1)/√learning_rate · q`. For `loss = 0.5·mean((f − y)²)` this matches
    `gradient_descent_mse`.

    Returns `predict_fn(t, fx_train_0=0., fx_test_0=None, k_test_train=None)` like
    `gradient_descent_mse`'s (`t` must be finite; times of any shape, in any order).
    """
    from jax.experimental import ode

    targets = _Targets(y_train, trace_axes)
    k = _kernel_entry(k_train_train, "ntk", "k_train_train")
    _check_kernel_shape(k, targets.kernel_shape(), "k_train_train", targets)
    k2d = _make_2d(k)
    y = targets.y.astype(k2d.dtype)
    grad_loss = jax.grad(lambda fx: loss(fx, y))

    def apply_kernel(k_any2d: Array, grad: Array, free_shape: tuple[int, ...]) -> Array:
        return targets.unflat(k_any2d @ targets.flat(grad), free_shape)

    def predict_fn(t: Any = None, fx_train_0: Any = 0.0, fx_test_0: Any = None,
                   k_test_train: Any = None) -> Any:
        _check_predict_inputs(fx_train_0, fx_test_0, k_test_train)
        if t is None:
            raise ValueError("gradient_descent integrates an ODE and needs finite times t; for MSE "
                             "at t=∞ use gradient_descent_mse(...)(None, ...).")
        t_np = np.asarray(t, dtype=np.float64)
        scale = learning_rate if momentum is None else learning_rate ** 0.5
        flat_t = t_np.reshape(-1) * scale
        order = np.argsort(flat_t, kind="stable")
        times = jnp.asarray(np.concatenate([[0.0], flat_t[order]]), k2d.dtype)

        fx_train = jnp.broadcast_to(jnp.asarray(0.0 if fx_train_0 is None else fx_train_0,
                                                k2d.dtype), y.shape)
        k_td2, test_shape, fx_test = None, None, None
        if fx_test_0 is not None:
            k_td = _kernel_entry(k_test_train, "ntk", "k_test_train")
            test_shape = _test_free_shape(k_td, targets)
            k_td2 = _make_2d(k_td)
            fx_test = jnp.broadcast_to(jnp.asarray(fx_test_0, k2d.dtype),
                                       _test_output_shape(targets, test_shape))

        def dstate_dt(state: ODEState, _t) -> ODEState:
            g = grad_loss(state.fx_train)
            dtrain = -apply_kernel(k2d, g, targets.free_shape)
            dtest = None if k_td2 is None else -apply_kernel(k_td2, g, test_shape)
            if momentum is None:
                return ODEState(dtrain, dtest)
            friction = (momentum - 1.0) / learning_rate ** 0.5
            dtrain = dtrain + friction * state.qx_train
            if dtest is not None:
                dtest = dtest + friction * state.qx_test
            return ODEState(state.qx_train, state.qx_test, dtrain, dtest)

        state0 = ODEState(fx_train, fx_test)
        if momentum is not None:
            state0 = state0._replace(qx_train=jnp.zeros_like(fx_train),
                                     qx_test=None if fx_test is None else jnp.zeros_like(fx_test))
        states = ode.odeint(dstate_dt, state0, times)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)

        def at_requested(traj: Array | None) -> Array | None:
            if traj is None:
                return None
            picked = traj[1:][jnp.asarray(inverse)]
            return picked.reshape(t_np.shape + traj.shape[1:])

        out_train = at_requested(states.fx_train) if fx_train_0 is not None else None
        out_test = at_requested(states.fx_test)
        if out_test is None:
            return out_train
        if out_train is None:
            return out_test
        return out_train, out_test

    return predict_fn


# ----------------------------------------------------------------------------------------------
# Learning rate


def max_learning_rate(ntk_train_train: Any, y_train_size: int | None = None,
                      momentum: float = 0.0, eps: float = 1e-12) -> float:
    """Largest stable learning rate of (momentum) gradient descent on `0.5·mean((f − y)²)`:
    `2 (1 + momentum) · y_train_size / (λ_max(Θ) + eps)`.

    `y_train_size` defaults to the kernel's 2-D size (i.e. `trace_axes=()`). Uses SciPy's
    `eigh(..., subset_by_index=...)` for the top eigenvalue only.
    """
    import scipy.linalg

    k2d = np.asarray(_make_2d(_kernel_entry(ntk_train_train, "ntk", "ntk_train_train")))
    n = k2d.shape[0]
    factor = n if y_train_size is None else y_train_size
    top = scipy.linalg.eigh(k2d, eigvals_only=True, subset_by_index=[n - 1, n - 1])[-1]
    return float(2 * (1 + momentum) * factor / (top + eps))
