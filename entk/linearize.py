"""Linearisation and Taylor expansion of a model in its parameters around `params0`.

`linearize` takes every model kind entk takes elsewhere (see `entk.adapters`): a torch module gives a
trainable torch module (`entk.adapters.torch.linearize`), an `entk.Model` or a `(flax_module,
variables)` pair a JAX function around their own parameters, and `f(params, x)` with `params0` a
JAX function. This module is imported by `import entk`, so frameworks are looked up lazily.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax

PyTree = Any


def _function_and_params0(f: Any, params0: PyTree, call: str) -> tuple[Callable[..., PyTree], PyTree]:
    """`(f(params, x), params0)` for an `entk.Model`, a Flax pair or a plain function.

    Raises:
      TypeError: a plain function without `params0`, or a framework model this call has no form for
        (`call` names the entry point in the message).
    """
    from entk import adapters
    from entk.model import Model

    if isinstance(f, Model) or adapters.is_flax_pair(f):
        model = adapters.to_model(f, params=params0)
        return model.apply, model.params
    framework = adapters.framework_of(f)
    if framework is not None:
        convert = "entk.from_torch(module, x)" if framework == "torch" else "entk.from_tf(model, x)"
        raise TypeError(
            f"{call} has no {framework} form for a {type(f).__module__}.{type(f).__name__}: convert it "
            f"to JAX first, model = {convert}, then {call}(model) expands around the model's current "
            f"weights (model.params) and returns a JAX function f(params, x).")
    if not callable(f):
        raise TypeError(f"{call} needs a model: f(params, x) with params0, an entk.Model, a "
                        f"(flax_module, variables) pair or a torch.nn.Module; got {type(f).__name__}.")
    if params0 is None:
        raise TypeError(f"{call}(f, params0): params0, the parameters to expand around, is missing "
                        f"(f is a plain function f(params, x), which holds no weights of its own). "
                        f"Pass them, {call}(f, params0), or pass a model that holds its weights (a "
                        f"torch.nn.Module, an entk.Model, a (flax_module, variables) pair).")
    adapters.check_params(params0, what="params0")
    return f, params0


def _difference(params: PyTree, params0: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda p, q: p - q, params, params0)


def linearize(f: Any, params0: PyTree = None) -> Any:
    """Returns `f_lin(params, x, **kw) = f(params0, x) + J(params0, x) (params - params0)`.

    The JVP is evaluated at `params0` (one forward and one forward-mode pass per call), so training
    `f_lin` is training the network's linearisation ("lazy" / NTK regime).

    Args:
      f: `f(params, x, **kw)` (pure JAX) with `params0`; an `entk.Model` or a `(flax_module,
        variables)` pair (`params0` defaults to its own parameters); or a `torch.nn.Module`, for which
        the result is a trainable torch module (see below). Keras / TF models have no linearized
        Keras form: convert them, `entk.linearize(entk.from_tf(model, x))`.
      params0: the parameters to expand around (required for a plain function).

    Returns:
      `f_lin(params, x, **kw)` for JAX models; for a torch module, the
      `entk.adapters.torch.LinearizedModule` `lin` with `lin(x) = f(θ₀, x) + J(θ₀, x)(θ − θ₀)`,
      θ₀ the module's current weights and θ its trainable parameters (train it with any torch
      optimizer).

    Raises:
      TypeError: `params0` missing for a plain function, given for a torch module, or a model kind
        with no linearization (the message names the call to make).
    """
    from entk import adapters

    if adapters.framework_of(f) == "torch":
        if params0 is not None:
            raise TypeError("entk.linearize(module) linearizes a torch module around its current "
                            "weights, so params0 must be omitted; to expand around other weights, load "
                            "them first (module.load_state_dict(...)), then entk.linearize(module).")
        from entk.adapters.torch import linearize as linearize_torch

        return linearize_torch(f)
    f, params0 = _function_and_params0(f, params0, "entk.linearize")

    def f_lin(params: PyTree, *args: Any, **kwargs: Any) -> PyTree:
        f0, df = jax.jvp(lambda p: f(p, *args, **kwargs), (params0,), (_difference(params, params0),))
        return jax.tree_util.tree_map(lambda a, b: a + b, f0, df)

    return f_lin


def taylor_expand(f: Any, params0: PyTree = None, degree: int = 1) -> Callable[..., PyTree]:
    """Returns `f_tayl(params, x, **kw) = Σ_{k=0}^{degree} (1/k!) D^k f(params0)[Δ, …, Δ]`, Δ = params − params0.

    The k-th directional derivative along Δ comes from k nested JVPs (cost grows like 2^k, fine for the
    small degrees this is used with). `degree=1` is `linearize`.

    `f` is `f(params, x, **kw)` with `params0`, or an `entk.Model` / `(flax_module, variables)` pair
    (`params0` defaults to its parameters). Torch and Keras models: convert them first,
    `entk.taylor_expand(entk.from_torch(module, x), degree=2)`.
    """
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 0:
        raise ValueError(f"degree must be a non-negative int, got {degree!r}.")
    f, params0 = _function_and_params0(f, params0, "entk.taylor_expand")

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
