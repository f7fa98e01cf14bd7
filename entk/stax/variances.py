"""Per-position variances broadcast against a kernel layout (see `entk.stax.kernel` for the layouts).

Nonlinearities and normalisations divide a covariance by the variances of its two sides, and masks
are combined the same way (`entk.stax.masking`); both use these two broadcasts. Their own module so
that `kernel` and `masking` can each import them without importing each other.
"""

from __future__ import annotations

import jax

Array = jax.Array


def pair_variances(var1: Array, var2: Array) -> tuple[Array, Array]:
    """Variances `(N1, S...)`, `(N2, S...)` broadcast to the `nngp` layout `(N1, N2, S_1, S_1', ...)`."""
    d = var1.ndim - 1
    a = var1.reshape(var1.shape[:1] + (1,) + sum(((s, 1) for s in var1.shape[1:]), ()))
    b = var2.reshape((1,) + var2.shape[:1] + sum(((1, s) for s in var2.shape[1:]), ()))
    assert a.ndim == b.ndim == 2 + 2 * d
    return a, b


def self_variances(var: Array) -> tuple[Array, Array]:
    """Variances `(N, S...)` broadcast to the `cov` layout `(N, S_1, S_1', ...)` (both sides)."""
    a = var.reshape(var.shape[:1] + sum(((s, 1) for s in var.shape[1:]), ()))
    b = var.reshape(var.shape[:1] + sum(((1, s) for s in var.shape[1:]), ()))
    return a, b
