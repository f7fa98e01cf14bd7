"""Applying a model to one input batch, or to one example at a time: helpers shared by strategies.

With `vmap_axes`, a strategy evaluates `f` on single examples (batch axis kept, of size 1, so the model
sees the shapes it expects) and `jax.vmap`s over the batch; `per_example` builds that mapping.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from entk.algorithms.axes import VmapAxes

PyTree = Any


def bind_input(f: Callable[..., PyTree], x: PyTree, kwargs: dict) -> Callable[[PyTree], PyTree]:
    """`params ↦ f(params, x, **kwargs)`."""
    return lambda params: f(params, x, **kwargs)


def output_shapes(f: Callable[..., PyTree], x: PyTree, kwargs: dict, params: PyTree) -> PyTree:
    """`f`'s output as a pytree of `jax.ShapeDtypeStruct`s, without computing it."""
    return jax.eval_shape(bind_input(f, x, kwargs), params)


def per_example(f: Callable[..., PyTree], x: PyTree, kwargs: dict, params: PyTree,
                vmap_axes: VmapAxes,
                fn: Callable[[Callable[[PyTree], PyTree]], PyTree]) -> PyTree:
    """`fn(g_n)` for every example `n`, stacked along each output leaf's batch axis.

    `g_n(params)` is `f` on example `n` alone with the batch axis removed from its output. `fn` must
    return a pytree whose top-level structure matches `f`'s output (e.g. `jax.jacrev(g_n)(params)`),
    so every leaf below an output leaf gets the batch axis back at that output leaf's batch position.
    """
    fx = output_shapes(f, x, kwargs, params)
    in_axes = vmap_axes.input_axes(x)
    kw_axes = vmap_axes.kwarg_axes(kwargs)
    out_axes = vmap_axes.output_axes(fx)

    def one(x_n: PyTree, kw_n: dict) -> PyTree:
        x_n = jax.tree_util.tree_map(jnp.expand_dims, x_n, in_axes)
        kw_n = {k: (v if kw_axes[k] is None
                    else jax.tree_util.tree_map(jnp.expand_dims, v, kw_axes[k]))
                for k, v in kw_n.items()}

        def g(p: PyTree) -> PyTree:
            return jax.tree_util.tree_map(lambda y, a: jnp.squeeze(y, a), f(p, x_n, **kw_n), out_axes)

        return fn(g)

    return jax.vmap(one, in_axes=(in_axes, kw_axes), out_axes=out_axes)(x, kwargs)


def batch_axes_of_output(fx: PyTree, vmap_axes: VmapAxes) -> list[int]:
    """The (non-negative) batch axis of every output leaf of `fx` (`output_shapes`' result), in
    `tree_leaves` order."""
    return jax.tree_util.tree_leaves(vmap_axes.output_axes(fx))


def param_count(params: PyTree) -> int:
    return sum(int(jnp.size(p)) for p in jax.tree_util.tree_leaves(params))


def param_bytes(params: PyTree) -> int:
    """The bytes of one parameter-shaped vector (every leaf at its own dtype)."""
    return sum(int(jnp.size(p)) * jnp.dtype(jnp.result_type(p)).itemsize
               for p in jax.tree_util.tree_leaves(params))


def split_kwargs(kwargs: dict, x1: PyTree, x2: PyTree | None) -> tuple[dict, dict]:
    """`(kwargs for f(x1), kwargs for f(x2))`, neural-tangents' rules: an `rng` key is shared when x2 is
    None or equals x1, else x2 gets `random.fold_in(rng, 1)`; a 2-tuple gives one value to each side."""
    kwargs1, kwargs2 = {}, {}
    for k, v in kwargs.items():
        if k == "rng" and v is not None:
            kwargs1[k] = v
            kwargs2[k] = v if x2 is None or equal_inputs(x1, x2) else jax.random.fold_in(v, 1)
        elif isinstance(v, tuple) and len(v) == 2:
            kwargs1[k], kwargs2[k] = v
        else:
            kwargs1[k] = kwargs2[k] = v
    return kwargs1, kwargs2


def is_concrete(tree: PyTree) -> bool:
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


def equal_inputs(x1: PyTree, x2: PyTree) -> bool:
    """x1 == x2 by value, when that can be known without tracing (then they share an rng key)."""
    if not (is_concrete(x1) and is_concrete(x2)):
        return False
    l1, l2 = jax.tree_util.tree_leaves(x1), jax.tree_util.tree_leaves(x2)
    return len(l1) == len(l2) and all(
        np.shape(a) == np.shape(b) and np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(l1, l2))
