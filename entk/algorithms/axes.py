"""Output-axis conventions shared by every strategy (neural-tangents' semantics).

For one output leaf of shape `S = (s_0, ..., s_{d-1})` (usually `s_0` is the batch `N`), the kernel
`Θ[a, b] = Σ_p ∂f(x1)_a/∂p · ∂f(x2)_b/∂p` is reduced axis by axis:

- a *traced* axis `t` keeps only `a_t == b_t` and sums over it, divided by `s_t` (a mean);
- a *diagonal* axis keeps only `a_t == b_t` and appears once;
- every other (*free*) axis appears twice, its x1 side directly followed by its x2 side.

Output axes keep the order of `S`: e.g. `S = (N, A, B)`, trace `(2,)`, diagonal `()` gives
`(N1, N2, A1, A2)`; diagonal `(0,)` and trace `()` gives `(N, A1, A2, B1, B2)`.

Strategies compute in the *canonical* order `(diagonal axes..., free axes of x1..., free axes of x2...)`
(what `lax.dot_general` yields with diagonal axes as batch dimensions) and call
`LeafAxes.to_output_layout` once at the end.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any


def _as_axis_tuple(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    try:
        axes = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of ints, got {value!r}.") from None
    for a in axes:
        if not isinstance(a, int) or isinstance(a, bool):
            raise TypeError(f"{name} must contain only ints, got {value!r}.")
    return axes


def _normalize(axes: tuple[int, ...], ndim: int, name: str, where: str) -> tuple[int, ...]:
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"{name}={axes} has axis {a}, out of range for {where} with {ndim} "
                             f"dimension(s); use axes in [{-ndim}, {ndim - 1}].")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={axes} names the same axis of {where} twice.")
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class LeafAxes:
    """Trace / diagonal / free axes resolved for one output leaf of `ndim` dimensions (all sorted, ≥ 0)."""

    ndim: int
    trace: tuple[int, ...]
    diagonal: tuple[int, ...]

    @property
    def free(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.ndim) if i not in self.trace and i not in self.diagonal)

    def trace_size(self, shape: Sequence[int]) -> int:
        """Product of the traced axes' sizes: the divisor that turns the trace into a mean."""
        return math.prod(shape[t] for t in self.trace)

    def canonical_shape(self, shape1: Sequence[int], shape2: Sequence[int]) -> tuple[int, ...]:
        """Shape in canonical order `(diagonal..., free of x1..., free of x2...)`."""
        return (tuple(shape1[d] for d in self.diagonal) + tuple(shape1[i] for i in self.free)
                + tuple(shape2[i] for i in self.free))

    def output_shape(self, shape1: Sequence[int], shape2: Sequence[int]) -> tuple[int, ...]:
        """Shape of the kernel in neural-tangents' layout (see module docstring)."""
        out: list[int] = []
        for i in range(self.ndim):
            if i in self.trace:
                continue
            out.extend((shape1[i],) if i in self.diagonal else (shape1[i], shape2[i]))
        return tuple(out)

    def output_position(self, axis: int) -> int:
        """Where a diagonal or free axis (its x1 side, for a free one) lands in the output layout."""
        if axis in self.trace:
            raise ValueError(f"Axis {axis} is traced; it does not appear in the kernel.")
        return sum(0 if a in self.trace else 1 if a in self.diagonal else 2 for a in range(axis))

    def _output_permutation(self) -> tuple[int, ...]:
        n_diag, n_free = len(self.diagonal), len(self.free)
        perm: list[int] = []
        for i in range(self.ndim):
            if i in self.diagonal:
                perm.append(self.diagonal.index(i))
            elif i not in self.trace:
                j = self.free.index(i)
                perm.extend((n_diag + j, n_diag + n_free + j))
        return tuple(perm)

    def to_output_layout(self, canonical: jax.Array) -> jax.Array:
        """Transposes a kernel from canonical order to the output layout."""
        perm = self._output_permutation()
        return canonical if perm == tuple(range(len(perm))) else jnp.transpose(canonical, perm)

    def finish(self, summed: jax.Array, shape1: Sequence[int], dtype: Any = None) -> jax.Array:
        """The leaf's kernel from its canonical-order sum: divided by the trace size (the trace
        becomes a mean; `shape1` is the x1 output leaf's shape), cast to `dtype` if given, and
        transposed to the output layout. The one ending every strategy shares."""
        kernel = summed / self.trace_size(shape1)
        return self.to_output_layout(kernel if dtype is None else kernel.astype(dtype))

    def contract(self, a: jax.Array, b: jax.Array, n_out: int | None = None,
                 precision: Any = lax.Precision.HIGHEST) -> jax.Array:
        """Σ over trailing dims and traced axes of `a ⊗ b`, diagonal axes batched, in canonical order.

        `a` has shape `S1 + R` and `b` shape `S2 + R`, where the first `n_out` (default: `ndim`) dims are
        output dims and `R` (e.g. one parameter leaf's shape in a Jacobian) is summed over. The result is
        NOT divided by the trace size; the caller divides once after summing all contributions.

        Both sides are brought to `(D, F, K)` (diagonal, free and summed dims each merged into one; a
        transpose only when the summed dims are not already trailing) for a single matrix product per
        diagonal entry: XLA:CPU runs a `dot_general` with several contracting dims (a `(N, O, H, W)`
        Jacobian leaf against another, say) up to 2x slower than the same product on merged dims.
        """
        n_out = self.ndim if n_out is None else n_out
        summed = self.trace + tuple(range(n_out, a.ndim))
        free = self.free

        def merged(t: jax.Array) -> jax.Array:
            order = self.diagonal + free + summed
            t = t if order == tuple(range(t.ndim)) else jnp.transpose(t, order)
            d, f = len(self.diagonal), len(free)
            return t.reshape(math.prod(t.shape[:d]), math.prod(t.shape[d:d + f]),
                             math.prod(t.shape[d + f:]))

        out = lax.dot_general(merged(a), merged(b), (((2,), (2,)), ((0,), (0,))),
                              precision=precision)
        return out.reshape(self.canonical_shape(a.shape, b.shape))


@dataclasses.dataclass(frozen=True)
class KernelAxes:
    """The user's `trace_axes` and `diagonal_axes`, resolved per output leaf with `for_leaf`."""

    trace_axes: tuple[int, ...] = (-1,)
    diagonal_axes: tuple[int, ...] = ()

    @classmethod
    def create(cls, trace_axes: Any = (-1,), diagonal_axes: Any = ()) -> "KernelAxes":
        trace = _as_axis_tuple(trace_axes, "trace_axes")
        diag = _as_axis_tuple(diagonal_axes, "diagonal_axes")
        both = set(trace) & set(diag)
        if both:
            raise ValueError(f"Axis {sorted(both)[0]} is in both trace_axes={trace} and "
                             f"diagonal_axes={diag}; an axis is either traced or diagonal.")
        return cls(trace, diag)

    def for_leaf(self, ndim: int, where: str = "the output") -> LeafAxes:
        trace = _normalize(self.trace_axes, ndim, "trace_axes", where)
        diag = _normalize(self.diagonal_axes, ndim, "diagonal_axes", where)
        both = set(trace) & set(diag)
        if both:
            raise ValueError(f"trace_axes={self.trace_axes} and diagonal_axes={self.diagonal_axes} "
                             f"both name axis {sorted(both)[0]} of {where} ({ndim} dims).")
        return LeafAxes(ndim, trace, diag)


@dataclasses.dataclass(frozen=True)
class VmapAxes:
    """Where the batch axis sits, for models that treat examples independently.

    `in_axes` is an int or a pytree of ints matching `x`; `out_axes` likewise for `f`'s output;
    `kwargs_axes` maps keyword-argument names to the batch axis of that argument (others are shared).
    Built from the user's `vmap_axes` by `VmapAxes.create` (an int `a` means `(a, a, {})`).
    """

    in_axes: Any
    out_axes: Any
    kwargs_axes: dict

    @classmethod
    def create(cls, vmap_axes: Any) -> "VmapAxes | None":
        if vmap_axes is None or isinstance(vmap_axes, VmapAxes):
            return vmap_axes
        if isinstance(vmap_axes, tuple) and len(vmap_axes) == 3:
            in_axes, out_axes, kw_axes = vmap_axes
            kw_axes = {} if kw_axes is None else dict(kw_axes)
        else:
            in_axes = out_axes = vmap_axes
            kw_axes = {}
        for leaf in jax.tree_util.tree_leaves((in_axes, out_axes, kw_axes)):
            if not isinstance(leaf, int) or isinstance(leaf, bool):
                raise TypeError(f"vmap_axes={vmap_axes!r} must be None, \"auto\", an int, or a triple "
                                f"(in_axes, out_axes, kwargs_axes) of int pytrees.")
        return cls(in_axes, out_axes, kw_axes)

    def input_axes(self, x: PyTree) -> PyTree:
        """`in_axes` as a pytree matching `x`, each axis non-negative."""
        return _broadcast_axes(self.in_axes, x, "vmap_axes (input axes)")

    def output_axes(self, fx: PyTree) -> PyTree:
        """`out_axes` as a pytree matching `f`'s output (arrays or ShapeDtypeStructs)."""
        return _broadcast_axes(self.out_axes, fx, "vmap_axes (output axes)")

    def kwarg_axes(self, kwargs: dict) -> dict:
        """Batch axis of each keyword argument (None for shared ones), non-negative."""
        unknown = set(self.kwargs_axes) - set(kwargs)
        if unknown:
            raise ValueError(f"vmap_axes names keyword argument(s) {sorted(unknown)} that were not "
                             f"passed to the kernel function.")
        return {k: (_broadcast_axes(self.kwargs_axes[k], v, f"vmap_axes (kwarg {k!r})")
                    if k in self.kwargs_axes else None) for k, v in kwargs.items()}


def _broadcast_axes(axes: Any, tree: PyTree, name: str) -> PyTree:
    if isinstance(axes, int):
        axes = jax.tree_util.tree_map(lambda _: axes, tree)
    try:
        return jax.tree_util.tree_map(
            lambda a, leaf: _normalize((a,), jnp.ndim(leaf) if not hasattr(leaf, "shape")
                                       else len(leaf.shape), name, "an array")[0], axes, tree)
    except ValueError as e:
        if "out of range" in str(e):
            raise
        raise ValueError(f"{name}={axes!r} does not match the structure of "
                         f"{jax.tree_util.tree_structure(tree)}.") from None
