"""Monte Carlo estimates of a network's kernels: empirical kernels averaged over random initialisations.

For a finite network `(init_fn, apply_fn)` the estimate with `n` samples is

    K̂_n(x1, x2) = (1/n) Σ_{i<n} K_emp(x1, x2; params_i),   params_i = init_fn(key_i, x1.shape)

where `K_emp` is entk's empirical NNGP / NTK (`entk.empirical_kernel_fn`). As widths grow, `K̂_n`
approaches the analytic infinite-width kernel of the same `entk.stax` network; at any width it is an
unbiased estimate of the expected finite-width kernel. Sample `i` uses the key
`random.fold_in(key, i)` (split into an init key and an `rng` for stochastic layers such as
`Dropout`), so estimates for increasing `n` reuse the earlier samples.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
from jax import random

PyTree = Any


def _accepts_rng(apply_fn: Callable) -> bool:
    try:
        params = inspect.signature(apply_fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or p.name == "rng" for p in params)


def _sample_counts(n_samples: int | Iterable[int]) -> tuple[list[int], bool]:
    """Sorted distinct sample counts, and whether one estimate (an int) was asked for."""
    if isinstance(n_samples, int) and not isinstance(n_samples, bool):
        counts, single = [n_samples], True
    else:
        try:
            counts, single = sorted({int(n) for n in n_samples}), False
        except TypeError:
            raise TypeError(f"n_samples must be a positive int or an iterable of them, got "
                            f"{n_samples!r}.") from None
    if not counts or counts[0] < 1:
        raise ValueError(f"n_samples={n_samples!r}: sample counts must be positive.")
    return counts, single


def _batch_slices(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _take(x: PyTree, s: slice) -> PyTree:
    return jax.tree_util.tree_map(lambda leaf: leaf[s], x)


def _batch_size_of(x: PyTree) -> int:
    sizes = {jnp.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(x)}
    if len(sizes) != 1:
        raise ValueError(f"batch_size needs every input leaf to share its first (batch) axis; got "
                         f"sizes {sorted(sizes)}.")
    return sizes.pop()


class _Sampler:
    """One initialisation's empirical kernels for a network and kernel options.

    `init_fn` runs eagerly (JAX caches its random-number kernels per shape across all callers; they
    compile slowly), and the kernel computation is jitted with the params as arguments, so new
    samples, keys and sample counts reuse one compiled program per input shape.
    """

    def __init__(self, init_fn, apply_fn, trace_axes, diagonal_axes, vmap_axes, implementation):
        from entk.empirical import empirical_kernel_fn

        self.init_fn = init_fn
        self.kernel = jax.jit(empirical_kernel_fn(apply_fn, trace_axes, diagonal_axes, vmap_axes,
                                                  implementation), static_argnames="get")
        self.pass_rng = _accepts_rng(apply_fn)

    def params(self, sample_key: jax.Array, x1: PyTree) -> tuple[PyTree, dict]:
        """The sample's params and the extra apply_fn kwargs (its `rng`, when `apply_fn` takes one)."""
        init_key, rng_key = random.split(sample_key)
        _, params = self.init_fn(init_key, jax.tree_util.tree_map(jnp.shape, x1))
        return params, ({"rng": rng_key} if self.pass_rng else {})


_cached_sampler = functools.lru_cache(maxsize=16)(_Sampler)


def _sampler(*args) -> _Sampler:
    """Samplers are shared between kernel functions of the same network and options, so building a
    new Monte Carlo kernel_fn (e.g. with another key or sample count) does not recompile."""
    try:
        return _cached_sampler(*args)
    except TypeError:  # unhashable options, e.g. vmap_axes given as a dict
        return _Sampler(*args)


def monte_carlo_kernel_fn(init_fn: Callable, apply_fn: Callable, key: jax.Array,
                          n_samples: int | Iterable[int], batch_size: int = 0,
                          device_count: int = -1, store_on_device: bool = True,
                          trace_axes: int | Sequence[int] = (-1,),
                          diagonal_axes: int | Sequence[int] = (), vmap_axes: Any = None,
                          implementation: Any = "auto") -> Callable[..., Any]:
    """Returns `kernel_fn(x1, x2=None, get=None, **apply_fn_kwargs)`: the Monte Carlo kernel estimate.

    Args:
      init_fn: `init_fn(key, input_shape) -> (output_shape, params)` (e.g. from `entk.stax`).
      apply_fn: `apply_fn(params, x, **kw)`; if it takes `rng` (or `**kwargs`) each sample passes
        its own `rng` key, so `Dropout` masks are resampled too.
      key: a `jax.random` key.
      n_samples: number of initialisations, or an iterable of counts: `kernel_fn` then returns a
        generator yielding the estimate after each count (in increasing order), reusing samples.
      batch_size: if positive, kernels are computed in blocks of `batch_size` examples of `x1` and
        `x2` (to bound memory) and assembled; needs the batch axis to be the first axis of every
        input and output, not traced.
      device_count, store_on_device: accepted for neural-tangents compatibility and ignored: the
        computation runs on JAX's default device (`entk.batch` handles multi-device sharding).
      trace_axes, diagonal_axes, vmap_axes, implementation: those of `entk.empirical_kernel_fn`.

    Returns:
      `kernel_fn(x1, x2=None, get=None, **apply_fn_kwargs)` with `get` `"nngp"`, `"ntk"`, a tuple of
      them (a namedtuple in that order) or `None` (both): the average of the empirical kernels.
    """
    del device_count, store_on_device
    counts, single = _sample_counts(n_samples)
    if batch_size < 0:
        raise ValueError(f"batch_size={batch_size} must be ≥ 0 (0: no batching).")
    diag = (diagonal_axes,) if isinstance(diagonal_axes, int) else tuple(diagonal_axes)
    trace = (trace_axes,) if isinstance(trace_axes, int) else tuple(trace_axes)
    if batch_size and 0 in trace:
        raise ValueError("batch_size needs an untraced batch axis 0; drop 0 from trace_axes or use "
                         "batch_size=0.")
    batch_diagonal = 0 in diag
    sampler = _sampler(init_fn, apply_fn, trace_axes, diagonal_axes, vmap_axes, implementation)

    def sample(x1, x2, sample_key, get, kwargs):
        params, extra = sampler.params(sample_key, x1)
        kwargs = {**extra, **kwargs}  # an explicit rng from the caller wins

        def block(a, b):
            return sampler.kernel(a, b, get, params, **kwargs)

        if not batch_size:
            return block(x1, x2)
        n1 = _batch_size_of(x1)
        x2_ = x1 if x2 is None else x2
        n2 = _batch_size_of(x2_)
        rows1, rows2 = _batch_slices(n1, batch_size), _batch_slices(n2, batch_size)
        if batch_diagonal:
            if n1 != n2:
                raise ValueError(f"diagonal_axes includes the batch axis, so x1 and x2 need the same "
                                 f"batch size, got {n1} and {n2}.")
            blocks = [block(_take(x1, s), None if x2 is None else _take(x2, s)) for s in rows1]
            return jax.tree_util.tree_map(lambda *b: jnp.concatenate(b, 0), *blocks)
        rows = []
        for i, s1 in enumerate(rows1):
            row = [block(_take(x1, s1), None if (x2 is None and i == j) else _take(x2_, s2))
                   for j, s2 in enumerate(rows2)]
            rows.append(jax.tree_util.tree_map(lambda *b: jnp.concatenate(b, 1), *row))
        return jax.tree_util.tree_map(lambda *b: jnp.concatenate(b, 0), *rows)

    def estimates(x1, x2, get, kwargs) -> Iterator[Any]:
        total, done = None, 0
        for target in counts:
            for i in range(done, target):
                k = sample(x1, x2, random.fold_in(key, i), get, kwargs)
                total = k if total is None else jax.tree_util.tree_map(jnp.add, total, k)
            done = target
            yield jax.tree_util.tree_map(lambda s: s / target, total)

    def kernel_fn(x1: PyTree, x2: PyTree | None = None, get: str | Sequence[str] | None = None,
                  **apply_fn_kwargs: Any) -> Any:
        get_key = get if get is None or isinstance(get, str) else tuple(get)
        gen = estimates(x1, x2, get_key, apply_fn_kwargs)
        return next(gen) if single else gen

    return kernel_fn
