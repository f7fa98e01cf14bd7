"""Linearisation and Taylor expansion of `f(params, x)` in its parameters around `params0`."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax

PyTree = Any


def _difference(params: PyTree, params0: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda p, q: p - q, params, params0)


def linearize(f: Callable[..., PyTree], params0: PyTree) -> Callable[..., PyTree]:
    """Returns `f_lin(params, x, **kw) = f(params0, x) + J(params0, x) (params - params0)`.

    The JVP is evaluated at `params0` (one forward and one forward-mode pass per call), so training
    `f_lin` is training the network's linearisation ("lazy" / NTK regime).
    """

    def f_lin(params: PyTree, *args: Any, **kwargs: Any) -> PyTree:
        f0, df = jax.jvp(lambda p: f(p, *args, **kwargs), (params0,), (_difference(params, params0),))
        return jax.tree_util.tree_map(lambda a, b: a + b, f0, df)

    return f_lin


def taylor_expand(f: Callable[..., PyTree], params0: PyTree, degree: int) -> Callable[..., PyTree]:
    """Returns `f_tayl(params, x, **kw) = Σ_{k=0}^{degree} (1/k!) D^k f(params0)[Δ, …, Δ]`, Δ = params − params0.

    The k-th directional derivative along Δ comes from k nested JVPs (cost grows like 2^k, fine for the
    small degrees this is used with). `degree=1` is `linearize`.
    """
    if not isinstance(degree, int) or degree < 0:
        raise ValueError(f"degree must be a non-negative int, got {degree!r}.")

    def f_tayl(params: PyTree, *args: Any, **kwargs: Any) -> PyTree:
        delta = _difference(params, params0)

        def directional(k: int) -> Callable[[PyTree], PyTree]:
            if k == 0:
                return lambda p: f(p, *args, **kwargs)
            lower = directional(k - 1)
            return lambda p: jax.jvp(lower, (p,), (delta,))[1]

        terms = [jax.tree_util.tree_map(lambda t, k=k: t / math.factorial(k), directional(k)(params0))
                 for k in range(degree + 1)]
        return jax.tree_util.tree_map(lambda *ts: sum(ts[1:], ts[0]), *terms)

    return f_tayl
