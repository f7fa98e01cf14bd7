"""Shared machinery of `entk.predict`: output layouts, regularised factorisations, input checks.

Kernels are laid out `(N1, N2, A1, A2, ...)` for outputs `(N, A, ..., C)` whose `trace_axes` are
absent; a `_Layout` turns outputs into `(n, c)` matrices (`n` the product of the untraced axes,
matching the kernel's 2-D form `(n1, n2)`, `c` that of the traced ones) and back.

The array math runs in a few module-level jitted functions keyed on the (static) layout, so a
prediction compiles once per shape instead of dispatching dozens of small operations one by one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Axes = int | Sequence[int]


class Gaussian(NamedTuple):
    """Mean and covariance of a predictive distribution; `covariance` is laid out like a kernel."""

    mean: Array
    covariance: Array


class Kernels(NamedTuple):
    """Kernels by name; a missing one is `None`."""

    nngp: Array | None = None
    ntk: Array | None = None


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the traced axes of the outputs are, and the untraced (kernel) shape of the train set."""

    ndim: int
    trace: tuple[int, ...]
    trace_shape: tuple[int, ...]
    free_shape: tuple[int, ...]

    @property
    def free(self) -> tuple[int, ...]:
        return tuple(a for a in range(self.ndim) if a not in self.trace)

    @property
    def size(self) -> int:
        """Number of entries of the training targets: the MSE's normalisation."""
        return math.prod(self.free_shape) * math.prod(self.trace_shape)

    def kernel_shape(self, first: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """Interleaved shape of a kernel between outputs of untraced shape `first` and the train set."""
        first = self.free_shape if first is None else first
        return tuple(d for pair in zip(first, self.free_shape) for d in pair)

    def output_shape(self, free_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = [0] * self.ndim
        for a, s in zip(self.free, free_shape):
            shape[a] = s
        for a, s in zip(self.trace, self.trace_shape):
            shape[a] = s
        return tuple(shape)

    def flat(self, f: Array) -> Array:
        """Outputs (`y`'s axis order) → `(n, c)`."""
        n_free = self.ndim - len(self.trace)
        f = jnp.moveaxis(f, self.trace, range(n_free, self.ndim))
        return f.reshape(math.prod(f.shape[:n_free]), -1)

    def unflat(self, z: Array, free_shape: tuple[int, ...], leading: tuple[int, ...] = ()) -> Array:
        """`(*leading, n, c)` → `(*leading, outputs)` with the traced axes back in place."""
        z = z.reshape(leading + free_shape + self.trace_shape)
        n_t = len(self.trace)
        return jnp.moveaxis(z, range(z.ndim - n_t, z.ndim), [len(leading) + a for a in self.trace])


def make_layout(y: Any, trace_axes: Axes, name: str = "y_train") -> tuple[Layout, Array]:
    """The layout of targets `y` with `trace_axes`, and `y` as an array."""
    y = jnp.asarray(y)
    if y.ndim == 0:
        raise ValueError(f"{name} is a scalar; it needs a batch axis, e.g. shape (N, outputs).")
    axes = (trace_axes,) if isinstance(trace_axes, int) else tuple(trace_axes)
    for a in axes:
        if not -y.ndim <= a < y.ndim:
            raise ValueError(f"trace_axes={trace_axes} has axis {a}, out of range for {name} of "
                             f"shape {y.shape}.")
    trace = tuple(sorted({a % y.ndim for a in axes}))
    free = tuple(a for a in range(y.ndim) if a not in trace)
    if not free:
        raise ValueError(f"trace_axes={trace_axes} covers every axis of {name} {y.shape}; the "
                         f"batch axis cannot be traced.")
    layout = Layout(y.ndim, trace, tuple(y.shape[a] for a in trace),
                    tuple(y.shape[a] for a in free))
    return layout, y


def make_2d(k: Array) -> Array:
    """`(A1, B1, A2, B2, …)` → `(A1·A2·…, B1·B2·…)`."""
    even, odd = tuple(range(0, k.ndim, 2)), tuple(range(1, k.ndim, 2))
    rows = math.prod(k.shape[i] for i in even)
    return jnp.transpose(k, even + odd).reshape(rows, -1)


def zip_2d(mat: Array, shape1: tuple[int, ...], shape2: tuple[int, ...],
           leading: tuple[int, ...] = ()) -> Array:
    """Inverse of `make_2d`, with optional leading axes: `(*lead, Π s1, Π s2)` → interleaved."""
    n = len(shape1)
    mat = mat.reshape(leading + shape1 + shape2)
    lead = tuple(range(len(leading)))
    return jnp.transpose(mat, lead + tuple(len(leading) + i + j * n
                                           for i in range(n) for j in (0, 1)))


def kernel_entry(k: Any, name: str, what: str) -> Array:
    """`k` itself if it is an array, else its `nngp` / `ntk` attribute."""
    if hasattr(k, "nngp") or hasattr(k, "ntk"):
        value = getattr(k, name, None)
        if value is None:
            raise ValueError(f"{what} has no {name!r} kernel; compute it with get=(..., {name!r}).")
        return jnp.asarray(value)
    return jnp.asarray(k)


def check_train_kernel(k: Array, layout: Layout, what: str, y_shape: tuple) -> None:
    if tuple(k.shape) != layout.kernel_shape():
        raise ValueError(
            f"{what} has shape {tuple(k.shape)}, but y_train of shape {tuple(y_shape)} with "
            f"trace_axes={layout.trace} needs {layout.kernel_shape()} (each non-traced output axis "
            f"twice, interleaved: (N1, N2, ...)).")


def test_free_shape(k_test_train: Array, layout: Layout, what: str = "k_test_train") -> tuple:
    """The untraced output shape of the test set, from a test-train kernel (checked)."""
    n = len(layout.free_shape)
    if k_test_train.ndim != 2 * n or tuple(k_test_train.shape[1::2]) != layout.free_shape:
        raise ValueError(
            f"{what} has shape {tuple(k_test_train.shape)}, but the training outputs need "
            f"{2 * n} interleaved axes (N_test, {layout.free_shape[0]}, ...) whose odd ones are "
            f"{layout.free_shape}.")
    return tuple(k_test_train.shape[0::2])


def is_concrete(*arrays: Any) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(arrays))


def _regularize(k2d: Array, diag_reg: Array, absolute: bool) -> Array:
    scale = diag_reg if absolute else diag_reg * jnp.trace(k2d) / k2d.shape[0]
    return k2d + scale * jnp.eye(k2d.shape[0], dtype=k2d.dtype)


@functools.partial(jax.jit, static_argnames="absolute")
def _cholesky(k: Array, diag_reg: Array, absolute: bool) -> tuple[Array, Array]:
    factor = jnp.linalg.cholesky(_regularize(make_2d(k), diag_reg, absolute))
    return factor, jnp.all(jnp.isfinite(factor))


@functools.partial(jax.jit, static_argnames="absolute")
def _eigh(k: Array, diag_reg: Array, absolute: bool) -> tuple[Array, Array]:
    return jnp.linalg.eigh(_regularize(make_2d(k), diag_reg, absolute))


def cholesky(k: Array, diag_reg: float, absolute: bool, what: str) -> Array:
    """Lower Cholesky factor of the 2-D form of kernel `k` plus `reg·I`, or a clear error when that
    is not positive definite."""
    factor, ok = _cholesky(k, jnp.asarray(diag_reg, k.dtype), absolute)
    if is_concrete(ok) and not bool(ok):
        hint = ("diag_reg=0, so a singular or indefinite kernel cannot be inverted; pass e.g. "
                "diag_reg=1e-4 (relative to the mean diagonal)" if diag_reg == 0 else
                f"diag_reg={diag_reg} is too small; increase it")
        raise ValueError(f"{what} (+ diag_reg·I) is not positive definite: its Cholesky "
                         f"factorisation failed. {hint}.")
    return factor


def eigh(k: Array, diag_reg: float, absolute: bool, what: str) -> tuple[Array, Array]:
    """Eigendecomposition of the 2-D form of kernel `k` plus `reg·I`; refuses kernels with a clearly
    negative spectrum."""
    evals, evecs = _eigh(k, jnp.asarray(diag_reg, k.dtype), absolute)
    if is_concrete(evals):
        spectrum = np.asarray(evals)
        lo, hi = spectrum[0], np.max(np.abs(spectrum))
        if not np.isfinite(lo) or lo < -1e-6 * max(hi, 1e-300):
            raise ValueError(f"{what} is not positive semi-definite (eigenvalues from {lo:.3g} to "
                             f"{spectrum[-1]:.3g}); is it the kernel of x_train with itself? A "
                             f"tiny negative part from round-off is fine; add diag_reg if needed.")
    return evals, evecs


def cho_solve(factor: Array, b: Array) -> Array:
    return jax.scipy.linalg.cho_solve((factor, True), b)


def expm1_evals(evals: Array, t: Array, normalization: float) -> Array:
    """`exp(−max(λ, 0)·t/n) − 1` (round-off negative eigenvalues count as zero): `t.shape + λ`."""
    return jnp.expm1(-jnp.maximum(evals, 0) * t[..., None] / normalization)


def inv_expm1_evals(evals: Array, t: Array, normalization: float) -> Array:
    """`(exp(−λ t/n) − 1)/λ`, continued by its limit `−t/n` at `λ = 0`."""
    num = expm1_evals(evals, t, normalization)
    abs_evals = jnp.abs(evals)
    zero = abs_evals == 0
    limit = -jnp.broadcast_to(t[..., None], num.shape) / normalization
    return jnp.where(zero, limit, num / jnp.where(zero, 1.0, abs_evals))


def in_eigenbasis(evecs: Array, fn_of_evals: Array, b: Array) -> Array:
    """`V diag(g) Vᵀ b` for `g` `(*lead, n)` and `b` `(n, c)` → `(*lead, n, c)`."""
    return jnp.einsum("ji,...i,ic->...jc", evecs, fn_of_evals, evecs.T @ b)


@functools.lru_cache(maxsize=None)
def _gaussians_type(names: tuple[str, ...]) -> type:
    return NamedTuple("Gaussians", [(n, Any) for n in names])


def gaussians(names: tuple[str, ...], single: bool, out: dict) -> Any:
    """One value for a single name, else a `Gaussians` namedtuple in the order asked."""
    if single:
        return out[names[0]]
    return _gaussians_type(names)(*(out[n] for n in names))


def check_broadcast(value: Any, shape: tuple, what: str) -> None:
    """`value` must broadcast to `shape` (e.g. initial outputs against the targets' shape)."""
    if value is None:
        return
    try:
        ok = np.broadcast_shapes(np.shape(value), shape) == tuple(shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{what} has shape {np.shape(value)} but the predictions have shape "
                         f"{tuple(shape)}; pass outputs of that shape (or a scalar such as 0.).")


def check_predict_inputs(fx_train_0: Any, fx_test_0: Any, k_test_train: Any) -> None:
    if fx_train_0 is None and fx_test_0 is None:
        raise ValueError("fx_train_0 and fx_test_0 are both None: nothing to predict. Pass the "
                         "network's outputs at t=0 (or 0.) for the sets you want.")
    if fx_test_0 is not None and k_test_train is None:
        raise ValueError("fx_test_0 is given but k_test_train is None; pass the test-train kernel "
                         "to predict on the test set.")
