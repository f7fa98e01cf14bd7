"""The `Kernel` that analytic stax layers pass to each other, and the helpers they all share.

Layout (neural-tangents'): for inputs of shape `(N, S_1, ..., S_d, C)` (channels last),

- `nngp`, `ntk`: `(N1, N2, S_1, S_1', ..., S_d, S_d')` — the covariance of the layer's
  pre-activations between example `n1` of `x1` at spatial position `(s_1, ..., s_d)` and example
  `n2` of `x2` at `(s_1', ..., s_d')`, averaged over channels (every channel is an independent draw
  in the infinite-width limit). Vectors (`d = 0`) give `(N1, N2)`.
- `cov1`: `(N1, S_1, S_1', ..., S_d, S_d')` — the same quantity between `x1` and itself, kept only for
  equal examples (the "batch diagonal"); nonlinearities need these variances. `cov2` likewise for
  `x2`, and `None` when `x2` is `x1`.

The full spatial covariance is kept (not only its diagonal) so that every layer, global pooling
included, is exact; its size is `N1 N2 Π S_i²`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import string
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from entk._get import canonical_get

Array = jax.Array

# Every field of `Kernel`, in order: the valid names for `get`.
KERNEL_FIELDS = ("nngp", "ntk", "cov1", "cov2", "x1_is_x2", "is_gaussian", "is_input", "shape1",
                 "shape2", "mask1", "mask2")


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class Kernel:
    """Infinite-width kernels of one layer's outputs plus the bookkeeping the next layer needs.

    Attributes:
      nngp: `(N1, N2, S_1, S_1', ...)`, the NNGP covariance (see the module docstring).
      ntk: same shape, the neural tangent kernel; `None` when it was not asked for.
      cov1: `(N1, S_1, S_1', ...)`, covariance of `x1` with itself (batch diagonal).
      cov2: `(N2, S_1, S_1', ...)` for `x2`, `None` when `x2` is `x1`.
      x1_is_x2: `x2` is `x1` (static); `Dropout` and the `x2=None` shortcut depend on it.
      is_gaussian: the outputs are a Gaussian process (true after `Dense` / `Conv`); elementwise
        nonlinearities need it, since their kernels are Gaussian expectations.
      is_input: the kernel is still that of the raw inputs.
      shape1, shape2: the shapes a finite network's layer would output for `x1` / `x2` (channel
        counts matter for the standard parameterization and for `FanInConcat`).
      mask1, mask2: boolean masks (true = masked) broadcastable to `shape1` / `shape2` when the
        inputs were masked with `mask_constant` (`entk.stax.masking`), else `None`; `mask2` is
        `None` when `x2` is `x1`.
    """

    nngp: Array
    ntk: Array | None
    cov1: Array
    cov2: Array | None
    x1_is_x2: bool
    is_gaussian: bool
    is_input: bool
    shape1: tuple[int, ...]
    shape2: tuple[int, ...]
    mask1: Array | None = None
    mask2: Array | None = None

    def tree_flatten(self):
        return ((self.nngp, self.ntk, self.cov1, self.cov2, self.mask1, self.mask2),
                (self.x1_is_x2, self.is_gaussian, self.is_input, self.shape1, self.shape2))

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children[:4], *aux, *children[4:])

    def replace(self, **changes: Any) -> "Kernel":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def n_spatial(self) -> int:
        """Number of spatial dimensions `d` (0 for vectors)."""
        return len(self.shape1) - 2

    def map_matrices(self, fn: Callable[[Array, int], Array]) -> "Kernel":
        """Applies a linear map to `nngp`, `ntk`, `cov1`, `cov2`.

        `fn(matrix, n_batch_axes)` gets `n_batch_axes = 2` for `nngp`/`ntk` and `1` for the covs,
        i.e. the index of the first spatial axis.
        """
        return self.replace(
            nngp=fn(self.nngp, 2),
            ntk=None if self.ntk is None else fn(self.ntk, 2),
            cov1=fn(self.cov1, 1),
            cov2=None if self.cov2 is None else fn(self.cov2, 1))


# ----------------------------------------------------------------------------------------------
# Kernel of the inputs


def _as_float_array(x: Any, name: str) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    if x.ndim < 2:
        raise ValueError(f"{name} has shape {x.shape}; stax inputs are (batch, [spatial...,] "
                         f"channels), e.g. (N, features) or NHWC images (N, H, W, C).")
    return x


def _same_values(x1: Any, x2: Any) -> bool:
    """Equal by value, when that can be known without tracing (concrete arrays)."""
    if isinstance(x1, jax.core.Tracer) or isinstance(x2, jax.core.Tracer):
        return False
    a, b = np.asarray(x1), np.asarray(x2)
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _gram(a: Array, b: Array, same_example: bool) -> Array:
    """Channel-averaged products of `a` `(Na, S..., C)` and `b` `(Nb, S..., C)` in kernel layout."""
    d = a.ndim - 2
    letters = iter(string.ascii_letters)
    n, m, c = next(letters), next(letters), next(letters)
    s1 = [next(letters) for _ in range(d)]
    s2 = [next(letters) for _ in range(d)]
    pairs = "".join(p + q for p, q in zip(s1, s2))
    if same_example:
        spec = f"{n}{''.join(s1)}{c},{n}{''.join(s2)}{c}->{n}{pairs}"
    else:
        spec = f"{n}{''.join(s1)}{c},{m}{''.join(s2)}{c}->{n}{m}{pairs}"
    return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST) / a.shape[-1]


def kernel_from_inputs(x1: Any, x2: Any = None, compute_ntk: bool = True,
                       mask_constant: Any = None) -> Kernel:
    """The kernel of the raw inputs: channel-averaged Gram matrices, NTK zero (no parameters yet).

    Entries equal to `mask_constant` are zeroed and recorded in `mask1`/`mask2` (same shapes as
    the inputs), see `entk.stax.masking`.
    """
    from entk.stax import masking

    x1 = _as_float_array(x1, "x1")
    x1_is_x2 = x2 is None or x2 is x1
    if not x1_is_x2:
        x2 = _as_float_array(x2, "x2")
        if x2.shape[1:] != x1.shape[1:]:
            raise ValueError(f"x1 has shape {x1.shape} and x2 has shape {x2.shape}: they may differ "
                             f"only in the batch (first) axis.")
    x2_ = x1 if x1_is_x2 else x2
    mask1 = mask2 = None
    if mask_constant is not None:
        x1, mask1 = masking.split(x1, mask_constant)
        if not x1_is_x2:
            x2, mask2 = masking.split(x2, mask_constant)
        x2_ = x1 if x1_is_x2 else x2
    nngp = _gram(x1, x2_, same_example=False)
    cov1 = _gram(x1, x1, same_example=True)
    cov2 = None if x1_is_x2 else _gram(x2_, x2_, same_example=True)
    ntk = jnp.zeros_like(nngp) if compute_ntk else None
    return Kernel(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, x1_is_x2=x1_is_x2, is_gaussian=False,
                  is_input=True, shape1=tuple(x1.shape), shape2=tuple(x2_.shape), mask1=mask1,
                  mask2=mask2)


# ----------------------------------------------------------------------------------------------
# `get`


@functools.lru_cache(maxsize=None)
def _namedtuple(names: tuple[str, ...]) -> type:
    return collections.namedtuple("Kernel", names)


def select(kernel: Kernel, names: tuple[str, ...] | None, single: bool) -> Any:
    """`kernel` itself (`names=None`), one entry (`single`), or a namedtuple in the order asked."""
    if names is None:
        return kernel
    values = [getattr(kernel, n) for n in names]
    return values[0] if single else _namedtuple(names)(*values)


def needs_ntk(names: tuple[str, ...] | None) -> bool:
    return names is None or "ntk" in names


# ----------------------------------------------------------------------------------------------
# Layers


Transform = Callable[..., Any]


class AnalyticKernelFn:
    """`kernel_fn(x1, x2=None, get=None, **kwargs)` of an entk.stax layer or network.

    `x1` (and `x2`) are arrays — or lists of arrays for a network that starts with several inputs —
    or a `Kernel` (list of `Kernel`s) to compose with an earlier network. `get=None` returns the
    `Kernel`; a name from `KERNEL_FIELDS` returns that entry; a tuple returns a namedtuple of them.
    The NTK is only computed when it is asked for. Works under `jax.jit(kernel_fn,
    static_argnames="get")`.
    """

    def __init__(self, transform: Transform, name: str):
        self.transform = transform
        self.name = name
        self._jitted = jax.jit(self._compute, static_argnames=("compute_ntk",))

    def _compute(self, x1: Any, x2: Any, kwargs: dict, compute_ntk: bool) -> Any:
        kwargs = dict(kwargs)
        mask_constant = kwargs.pop("mask_constant", None)
        return self.transform(_to_kernels(x1, x2, compute_ntk, mask_constant), **kwargs)

    def __call__(self, x1: Any, x2: Any = None, get: str | Sequence[str] | None = None,
                 **kwargs: Any) -> Any:
        names, single = canonical_get(get, KERNEL_FIELDS, default=None, noun="kernel entry")
        x2 = _drop_if_same(x1, x2)
        if kwargs.get("mask_constant") is not None:  # traced, so one compilation for all values
            kwargs = {**kwargs, "mask_constant": jnp.asarray(kwargs["mask_constant"], float)}
        args = (x1, x2, kwargs, needs_ntk(names))
        # One compiled program per network and input shapes: much faster than op-by-op dispatch.
        # Non-array keyword arguments cannot be traced, so those calls run eagerly.
        traceable = all(isinstance(leaf, (jax.Array, np.ndarray))
                        for leaf in jax.tree_util.tree_leaves(kwargs))
        out = self._jitted(*args) if traceable else self._compute(*args)
        if isinstance(out, list):
            return [select(o, names, single) for o in out]
        return select(out, names, single)

    def __repr__(self) -> str:
        return f"<entk.stax kernel_fn of {self.name}>"


def _drop_if_same(x1: Any, x2: Any) -> Any:
    """`None` when `x2` is `x1` (same object or, for concrete arrays, same values), else `x2`."""
    if x2 is None or x2 is x1:
        return None
    if isinstance(x1, (list, tuple)) and isinstance(x2, (list, tuple)) and len(x1) == len(x2):
        if all(_drop_if_same(a, b) is None for a, b in zip(x1, x2)):
            return None
        return x2
    if isinstance(x1, (Kernel, list, tuple)) or isinstance(x2, (Kernel, list, tuple)):
        return x2
    return None if _same_values(x1, x2) else x2


def _to_kernels(x1: Any, x2: Any, compute_ntk: bool,
                mask_constant: Any = None) -> Kernel | list[Kernel]:
    if isinstance(x1, Kernel):
        if x2 is not None:
            raise ValueError("kernel_fn(kernel, x2): pass x2 only with arrays; a Kernel already "
                             "holds both inputs.")
        return x1
    if isinstance(x1, (list, tuple)):
        if x2 is not None and (not isinstance(x2, (list, tuple)) or len(x2) != len(x1)):
            raise ValueError(f"x1 is a list of {len(x1)} inputs, so x2 must be None or a list of "
                             f"as many, got {type(x2).__name__}.")
        x2s = [None] * len(x1) if x2 is None else list(x2)
        return [_to_kernels(a, b, compute_ntk, mask_constant) for a, b in zip(x1, x2s)]
    return kernel_from_inputs(x1, x2, compute_ntk, mask_constant)


class Layer(NamedTuple):
    """`(init_fn, apply_fn, kernel_fn)` of an entk.stax layer, unpackable like neural-tangents'.

    - `init_fn(rng, input_shape) -> (output_shape, params)`;
    - `apply_fn(params, x, **kw) -> y`, pure JAX, usable by `entk.empirical_ntk_fn`;
    - `kernel_fn(x1, x2=None, get=None, **kw)`, an `AnalyticKernelFn`.
    """

    init_fn: Callable[..., Any]
    apply_fn: Callable[..., Any]
    kernel_fn: AnalyticKernelFn


def layer(name: str, init_fn: Callable, apply_fn: Callable, transform: Transform,
          mask_fn: Any = "unsupported", remask: bool = False,
          apply_uses_mask: bool = False) -> Layer:
    """Bundles a layer; `transform(kernel, **kw) -> kernel` is its analytic kernel map.

    Masked inputs (`entk.stax.masking`): `mask_fn(mask, input_shape) -> mask` maps the layer's
    input mask to its output mask (`"pass"` for combinators whose inner layers handle masks; the
    default `"unsupported"` raises `NotImplementedError` when a mask reaches the layer); `remask`
    zeroes kernel entries of masked positions after the layer; `apply_uses_mask` passes the mask
    to `apply_fn(..., mask=...)` (layers that reduce over positions).
    """
    from entk.stax import masking

    return Layer(init_fn, masking.wrap_apply(name, apply_fn, mask_fn, apply_uses_mask),
                 AnalyticKernelFn(masking.wrap_transform(name, transform, mask_fn, remask), name))


def transform_of(item: Any, where: str) -> Transform:
    """The kernel map of a layer triple, or a clear error for something that is not one."""
    if not (isinstance(item, tuple) and len(item) == 3):
        raise TypeError(f"{where} is {item!r}, not an entk.stax layer (init_fn, apply_fn, "
                        f"kernel_fn).")
    kernel_fn = item[2]
    if not isinstance(kernel_fn, AnalyticKernelFn):
        raise TypeError(f"{where} has a kernel_fn that is not an entk.stax kernel function "
                        f"({kernel_fn!r}); build the network from entk.stax layers only.")
    return kernel_fn.transform


def expect_single(k: Any, layer_name: str) -> Kernel:
    if isinstance(k, list):
        raise ValueError(f"{layer_name} takes one input but got {len(k)} branches; merge them "
                         f"first with FanInSum or FanInConcat.")
    return k


def require_gaussian(k: Kernel, layer_name: str) -> None:
    if not k.is_gaussian:
        raise ValueError(
            f"{layer_name} needs Gaussian inputs, i.e. a Dense or Conv layer right before it (its "
            f"kernel is a Gaussian expectation). Got "
            f"{'the raw inputs' if k.is_input else 'the outputs of a non-Gaussian layer'}.")


def check_default_axes(layer_name: str, batch_axis: int = 0, channel_axis: int = -1) -> None:
    if batch_axis != 0 or channel_axis not in (-1,):
        raise NotImplementedError(
            f"{layer_name}: only batch_axis=0 and channel_axis=-1 (channels last, NHWC) are "
            f"supported, got batch_axis={batch_axis}, channel_axis={channel_axis}; transpose the "
            f"inputs instead.")


def check_parameterization(layer_name: str, parameterization: str) -> str:
    p = parameterization.lower()
    if p not in ("ntk", "standard"):
        raise ValueError(f"{layer_name}: parameterization={parameterization!r}; use 'ntk' or "
                         f"'standard'.")
    return p


# ----------------------------------------------------------------------------------------------
# Spatial bookkeeping


def spatial_diagonal(cov: Array, n_batch_axes: int = 1) -> Array:
    """`(N, S_1, S_1', ..., S_d, S_d')` → `(N, S_1, ..., S_d)`: each position's variance."""
    d = (cov.ndim - n_batch_axes) // 2
    for _ in range(d):
        cov = jnp.diagonal(cov, axis1=n_batch_axes, axis2=n_batch_axes + 1)
    return cov


def diagonal_mask(shape: Sequence[int], n_batch_axes: int, batch_diagonal: bool) -> Array:
    """Boolean mask of a kernel layout that is true where every spatial pair (and, if
    `batch_diagonal`, the two batch axes) have equal indices."""
    mask = np.ones((1,) * len(shape), dtype=bool)
    if batch_diagonal:
        eye = np.eye(shape[0], shape[1], dtype=bool)
        mask = mask & eye.reshape(eye.shape + (1,) * (len(shape) - 2))
    for i in range(n_batch_axes, len(shape), 2):
        eye = np.eye(shape[i], shape[i + 1], dtype=bool)
        full = [1] * len(shape)
        full[i], full[i + 1] = shape[i], shape[i + 1]
        mask = mask & eye.reshape(full)
    return jnp.asarray(mask)


def safe_sqrt(x: Array) -> Array:
    return jnp.sqrt(jnp.maximum(x, 0.0))
