"""Brute-force references for kernel tests, written independently of entk's own axis machinery.

The NTK is the full Jacobian of the flattened parameters, contracted by hand; trace and diagonal axes
are applied with an einsum whose subscripts encode neural-tangents' semantics directly.
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def reduce_axes(full: jax.Array, ndim: int, trace_axes, diagonal_axes) -> jax.Array:
    """`full` has shape `S1 + S2` (ndim each); applies trace (mean) and diagonal axes by einsum.

    NumPy in, NumPy out (no compilation: cheap for references built in NumPy); JAX otherwise.
    """
    trace = {a % ndim for a in trace_axes}
    diag = {a % ndim for a in diagonal_axes}
    left, right, out = [], [], []
    letters = iter(string.ascii_letters)
    for i in range(ndim):
        a = next(letters)
        if i in trace or i in diag:
            left.append(a), right.append(a)
            if i in diag:
                out.append(a)
        else:
            b = next(letters)
            left.append(a), right.append(b)
            out.extend([a, b])
    spec = "".join(left) + "".join(right) + "->" + "".join(out)
    size = 1
    for t in trace:
        size *= full.shape[t]
    einsum = np.einsum if isinstance(full, np.ndarray) else jnp.einsum
    return einsum(spec, full) / size


def brute_force_ntk(f, x1, x2, params, trace_axes=(-1,), diagonal_axes=(), **kwargs):
    """Θ(x1, x2) from `jax.jacrev` of the flattened parameters, per output leaf."""
    flat, unravel = ravel_pytree(params)
    x2 = x1 if x2 is None else x2
    j1 = jax.jacrev(lambda v: f(unravel(v), x1, **kwargs))(flat)
    j2 = jax.jacrev(lambda v: f(unravel(v), x2, **kwargs))(flat)

    def leaf(a, b):
        full = jnp.tensordot(a, b, axes=([-1], [-1]))
        return reduce_axes(full, a.ndim - 1, trace_axes, diagonal_axes)

    return jax.tree_util.tree_map(leaf, j1, j2)


def brute_force_nngp(f, x1, x2, params, trace_axes=(-1,), diagonal_axes=(), **kwargs):
    """f(x1) f(x2)ᵀ per output leaf, reduced like `brute_force_ntk`."""
    x2 = x1 if x2 is None else x2

    def leaf(a, b):
        return reduce_axes(jnp.tensordot(a, b, axes=0), a.ndim, trace_axes, diagonal_axes)

    return jax.tree_util.tree_map(leaf, f(params, x1, **kwargs), f(params, x2, **kwargs))


def assert_close(actual, expected, rtol=1e-10, what=""):
    """Relative error ‖a − e‖_max / ‖e‖_max ≤ rtol on every leaf, with the same structure and shapes."""
    la, ta = jax.tree_util.tree_flatten(actual)
    le, te = jax.tree_util.tree_flatten(expected)
    assert ta == te, f"{what}: structure {ta} != {te}"
    for a, e in zip(la, le):
        assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
        scale = float(jnp.max(jnp.abs(e))) or 1.0
        err = float(jnp.max(jnp.abs(a - e))) / scale
        assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"
