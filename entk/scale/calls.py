"""A kernel function call with its non-input arguments bound, and the layout of what it returns.

`entk.batch` and `entk.compute_kernel` accept any kernel function whose first two arguments are the
inputs `x1, x2` (pytrees of arrays, examples on axis 0 of every leaf) and whose other arguments are
the same for every tile: `ntk_fn(x1, x2, params, **kw)` of `empirical_ntk_fn` / `empirical_nngp_fn`,
`kernel_fn(x1, x2, get, params, **kw)` of `empirical_kernel_fn`, and `kernel_fn(x1, x2, get)` of
`entk.stax` / `monte_carlo_kernel_fn`. The other arguments are split into arrays (passed to the
compiled tile function, replicated on every device) and everything else (strings such as `get`,
Python numbers: fixed at trace time).

Only outputs whose leaves all start with the example axes can be tiled:
- *grid* layout, every leaf `(N1, N2, ...)`: tiles cover the (x1, x2) grid;
- *diagonal* layout, every leaf `(N, ...)` (the batch axis is in `diagonal_axes`, so the kernel pairs
  example n of x1 with example n of x2 only): tiles cover the diagonal, x1 and x2 cut alike.
The layout is learned from the kernel's abstract output on 2 × 3 (and 2 × 2, 3 × 3) examples.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Sequence

import jax
import numpy as np

PyTree = Any

GRID = "grid"
DIAGONAL = "diagonal"


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _static_key(leaf: Any) -> Any:
    try:
        hash(leaf)
        return leaf
    except TypeError:
        return object()  # unhashable: never equal to another call's, so never a stale cache hit


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """`fn(x1, x2, *args, **kwargs)` with everything but the inputs bound.

    `dynamic` are the array leaves of `(args, kwargs)` (parameters, array keyword arguments), in
    `tree_leaves` order; `static_key` identifies the rest, so a compiled tile function can be reused
    for calls that differ only in array values.
    """

    fn: Callable[..., PyTree]
    args: tuple
    kwargs: dict

    @classmethod
    def with_params(cls, fn: Callable[..., PyTree], params: PyTree, kwargs: dict) -> "KernelCall":
        """The `compute_kernel` form: `fn(x1, x2, params, **kwargs)`.

        `params` goes by keyword when `fn` has a parameter named `params` (so `empirical_kernel_fn`'s
        `kernel_fn(x1, x2, get, params)` works with `get=` in `kwargs`), positionally otherwise, and
        not at all when it is `None` (stax kernel functions take no parameters).
        """
        if params is None:
            return cls(fn, (), dict(kwargs))
        if "params" in _parameter_names(fn):
            return cls(fn, (), {**kwargs, "params": params})
        return cls(fn, (params,), dict(kwargs))

    def _split(self) -> tuple[list, Any, list, list]:
        leaves, treedef = jax.tree_util.tree_flatten((self.args, self.kwargs))
        dynamic_positions = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]
        return leaves, treedef, dynamic_positions, [leaves[i] for i in dynamic_positions]

    @property
    def dynamic(self) -> list:
        """Array leaves of the bound arguments (inputs of the compiled tile function)."""
        return self._split()[3]

    @property
    def static_key(self) -> tuple:
        """Hashable description of the non-array arguments (and where the arrays sit)."""
        leaves, treedef, positions, _ = self._split()
        statics = tuple(_static_key(leaf) for i, leaf in enumerate(leaves) if i not in positions)
        return (id(self.fn), str(treedef), tuple(positions), statics)

    def tile_function(self) -> Callable[[PyTree, PyTree, list], PyTree]:
        """`(x1_tile, x2_tile, dynamic) -> kernel`: pure, traceable, the static arguments baked in."""
        leaves, treedef, positions, _ = self._split()
        # Array slots are left empty so that a cached tile function does not keep them alive.
        template = [None if i in positions else leaf for i, leaf in enumerate(leaves)]
        fn = self.fn

        def tile_fn(x1: PyTree, x2: PyTree, dynamic: list) -> PyTree:
            filled = list(template)
            for i, value in zip(positions, dynamic):
                filled[i] = value
            args, kwargs = jax.tree_util.tree_unflatten(treedef, filled)
            return fn(x1, x2, *args, **kwargs)

        return tile_fn


def _parameter_names(fn: Callable) -> Sequence[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


# ----------------------------------------------------------------------------------------------
# Inputs


def example_count(x: PyTree, name: str) -> int:
    """The number of examples (size of axis 0, equal for every leaf) of input `x`."""
    leaves = jax.tree_util.tree_leaves_with_path(x)
    if not leaves:
        raise ValueError(f"{name} has no arrays; pass an array (or pytree of arrays) with the "
                         f"examples on axis 0.")
    sizes = {}
    for path, leaf in leaves:
        if isinstance(leaf, jax.core.Tracer):
            raise TypeError(f"{name} is being traced (inside jax.jit, vmap or grad): tiled kernels "
                            f"run a Python loop over tiles and store results on the host. Call the "
                            f"batched kernel function outside of jax transformations; each tile is "
                            f"compiled for you.")
        shape = np.shape(leaf)
        if not shape:
            raise ValueError(f"{name}{jax.tree_util.keystr(path)} is a scalar; inputs need the "
                             f"examples on axis 0.")
        sizes[jax.tree_util.keystr(path) or "(root)"] = shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"The leaves of {name} have different numbers of examples on axis 0: "
                         f"{sizes}; every leaf must hold the same examples.")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"{name} holds no examples (axis 0 has size 0); a kernel needs at least "
                         f"one example on each side.")
    return n


def to_host(x: PyTree) -> PyTree:
    """Inputs as NumPy arrays (tiles are cut and padded on the host, then sent to the devices)."""
    return jax.tree_util.tree_map(np.asarray, x)


def _with_examples(x: PyTree, n: int) -> PyTree:
    return jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct((n,) + tuple(leaf.shape[1:]), leaf.dtype), x)


# ----------------------------------------------------------------------------------------------
# Output layout


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One output leaf: where it sits in the output pytree, its trailing shape and its dtype."""

    path: str
    tail: tuple[int, ...]
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the kernel function returns: `kind` (`GRID` / `DIAGONAL`) and its leaves, in order."""

    kind: str
    treedef: Any
    leaves: tuple[LeafSpec, ...]

    @property
    def example_axes(self) -> int:
        """How many leading axes of every leaf are example axes (2 on a grid, 1 on the diagonal)."""
        return 2 if self.kind == GRID else 1

    def full_shapes(self, n1: int, n2: int) -> list[tuple[int, ...]]:
        lead = (n1, n2) if self.kind == GRID else (n1,)
        return [lead + leaf.tail for leaf in self.leaves]


def _abstract_output(tile_fn: Callable, x1: PyTree, x2: PyTree, dynamic: list, n1: int,
                     n2: int) -> PyTree:
    return jax.eval_shape(tile_fn, _with_examples(x1, n1), _with_examples(x2, n2), dynamic)


def _describe(out: PyTree) -> str:
    parts = []
    for k, (path, leaf) in enumerate(jax.tree_util.tree_leaves_with_path(out)):
        name = jax.tree_util.keystr(path)
        name = f"leaf {k}" if not name or "flat index" in name else name
        parts.append(f"{name}: {tuple(leaf.shape)}")
    return ", ".join(parts)


def probe_layout(call: KernelCall, x1: PyTree, x2: PyTree) -> Layout:
    """Learns whether the kernel's leaves are `(N1, N2, ...)` or `(N, ...)`; refuses anything else.

    Raises:
      ValueError: naming the leaves and shapes that do not start with the example axes (e.g. the
        `cov1` / `cov2` entries of a stax `Kernel`, or an output whose batch axis is not axis 0).
    """
    tile_fn = call.tile_function()
    dynamic = call.dynamic
    grid_error: Exception | None = None
    try:
        out = _abstract_output(tile_fn, x1, x2, dynamic, 2, 3)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(out)
        if leaves and all(tuple(leaf.shape[:2]) == (2, 3) for _, leaf in leaves):
            return Layout(GRID, treedef, tuple(
                LeafSpec(jax.tree_util.keystr(p), tuple(leaf.shape[2:]), np.dtype(leaf.dtype))
                for p, leaf in leaves))
        grid_description = _describe(out)
    except Exception as e:  # noqa: BLE001 - a diagonal kernel refuses N1 != N2; tried next
        grid_error = e
        grid_description = None

    try:
        out2 = _abstract_output(tile_fn, x1, x2, dynamic, 2, 2)
        out3 = _abstract_output(tile_fn, x1, x2, dynamic, 3, 3)
    except Exception:
        if grid_error is not None:
            raise grid_error from None  # the kernel fails whatever the layout: its own error
        out2 = out3 = None
    leaves2, treedef = jax.tree_util.tree_flatten_with_path(out2)
    leaves3 = jax.tree_util.tree_leaves(out3)
    if out2 is not None and leaves2 and all(
            a.shape and a.shape[0] == 2 and b.shape[0] == 3 and a.shape[1:] == b.shape[1:]
            for (_, a), b in zip(leaves2, leaves3)):
        return Layout(DIAGONAL, treedef, tuple(
            LeafSpec(jax.tree_util.keystr(p), tuple(leaf.shape[1:]), np.dtype(leaf.dtype))
            for p, leaf in leaves2))
    seen = grid_description if grid_description is not None else _describe(out2)
    raise ValueError(
        f"Cannot tile this kernel: with 2 examples in x1 and 3 in x2 its output leaves have shapes "
        f"[{seen}], but tiling needs every leaf to start with the example axes (N1, N2) (or (N,) "
        f"when the batch axis is in diagonal_axes). Ask for array kernels only (e.g. get='ntk' or "
        f"('nngp', 'ntk') rather than the whole stax Kernel with its per-example cov1/cov2), and "
        f"keep the examples on axis 0 of the inputs and outputs.")
