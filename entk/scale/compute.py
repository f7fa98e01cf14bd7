"""`compute_kernel` and `batch`: a kernel computed tile by tile, in memory or into a resumable store.

Both share one loop: probe the kernel's output layout, choose the tile grid, cut and pad the inputs
on the host, run D tiles per step on D local devices (`entk.scale.sharding`), and put each finished
tile either into host arrays or into the zarr store (`entk.scale.store`), skipping tiles the store
already holds. Under `jax.distributed` with P processes, process p takes tiles p, p + P, p + 2P, ...
(row-major order) and, once done, waits until the shared store holds every tile.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from entk.model import Model
from entk.scale import sharding, tiling
from entk.scale.calls import DIAGONAL, KernelCall, Layout, example_count, probe_layout, to_host
from entk.scale.store import KernelStore, kernel_hash, make_fingerprint, read_fingerprint
from entk.scale.tiling import TileGrid

PyTree = Any
KernelFn = Callable[..., PyTree]

log = logging.getLogger("entk.scale")

# Seconds between looks at the store while waiting for other processes.
POLL_SECONDS = 0.25
# Seconds the other processes wait for process 0 to create the store (it chooses tile="auto").
STORE_CREATION_TIMEOUT = 600


def compute_kernel(kernel_fn: Any, x1: PyTree, x2: PyTree | None = None, params: PyTree = None, *,
                   store: str | os.PathLike | None = None,
                   tile: str | int | tuple[int, int] = "auto", progress: bool = True,
                   devices: Sequence[jax.Device] | None = None, memory_budget: int | None = None,
                   fingerprint: Any = None, symmetric: bool = False,
                   **kernel_kwargs: Any) -> PyTree:
    """The kernel `kernel_fn(x1, x2, params, **kernel_kwargs)`, computed tile by tile.

    Args:
      kernel_fn: `ntk_fn(x1, x2, params, **kw)` (`empirical_ntk_fn`, `empirical_nngp_fn`),
        `kernel_fn(x1, x2, get, params)` of `empirical_kernel_fn` (pass `get=` as a keyword), or a
        stax `kernel_fn(x1, x2, get)` (pass `params=None` and `get=`). Its output leaves must be
        `(N1, N2, ...)`, or `(N, ...)` when the batch axis is a diagonal axis.
        Or the model itself: a `torch.nn.Module`, a Keras model / `tf.function`, a `(flax_module,
        variables)` pair or an `entk.Model` (a plain `f(params, x)` cannot be told from a kernel
        function: wrap it, `entk.Model.from_function(f, params)`). Its NTK is computed, as
        `entk.ntk(model, x)` would (`vmap_axes="auto"`); `params` defaults to the model's current
        weights; `trace_axes`, `diagonal_axes`, `vmap_axes`, `implementation` in `kernel_kwargs`
        configure the kernel, `get="nngp"` (or a tuple) asks for the NNGP too, and other keyword
        arguments go to the model. Inputs may be the model's kind of array.
      x1: inputs, a pytree of arrays with `N1` examples on axis 0 of every leaf.
      x2: `N2` examples likewise, or `None` for `x1`.
      params: passed to `kernel_fn` (by keyword if it has a `params` argument), the same for every
        tile; `None` passes nothing.
      store: a directory for a zarr kernel store. Each finished tile is written there atomically; a
        rerun with the same store computes only the missing tiles; a store holding another kernel
        (other inputs, parameters, model, axes, tile size, dtype) is refused with
        `entk.scale.StoreMismatchError`. Every stored tile is checked against the checksum in its
        completion marker before it is used; a damaged one (chunk file deleted, truncated or
        altered) is named in a `RuntimeWarning` and recomputed. Required under `jax.distributed`
        with several processes: every process computes its share of the tiles into it.
      tile: `"auto"` (the largest tile the memory budget allows, from XLA's memory analysis of the
        compiled tile; a resumed store keeps its tile size), an int (square tiles) or `(rows, cols)`.
      progress: show a tqdm bar (tiles done, tiles/s, ETA).
      devices: local devices to spread tiles over (default: all of this process's devices).
      memory_budget: bytes a tile may use per device for `tile="auto"` (default: half the free
        memory, split between CPU devices sharing the host). If even a 1 x 1 tile needs more,
        `entk.algorithms.cost.OutOfBudgetError` says how much it needs (no tile is chosen that
        exceeds the budget).
      fingerprint: any JSON-able value stored with the kernel and checked on resume (e.g. a dataset
        version), on top of the automatic checks.
      symmetric: with `x2=None`, compute only the tiles on and above the diagonal and fill the ones
        below by transposing them (about half the work). You assert that
        `kernel_fn(a, b) == kernel_fn(b, a).T`, as for the empirical NTK and NNGP; only kernels whose
        leaves are `(N, N)` (e.g. traced over all output axes) can be mirrored this way.
      **kernel_kwargs: passed to `kernel_fn` unchanged for every tile (e.g. `get="ntk"`). Keyword
        arguments with one value per example are not cut into tiles.

    Returns:
      The kernel with `kernel_fn`'s output structure: zarr arrays when `store` is given (`np.asarray`
      reads them), NumPy arrays otherwise.
    """
    from entk import adapters

    if adapters.needs_example(kernel_fn) or adapters.is_flax_pair(kernel_fn) or isinstance(
            kernel_fn, Model):
        with adapters.precision_scope(kernel_fn, x1, x2, params):
            kernel_fn, x1, x2, params, kernel_kwargs = _model_kernel(kernel_fn, x1, x2, params,
                                                                     kernel_kwargs)
            return compute_kernel(kernel_fn, x1, x2, params, store=store, tile=tile,
                                  progress=progress, devices=devices, memory_budget=memory_budget,
                                  fingerprint=fingerprint, symmetric=symmetric, **kernel_kwargs)
    call = KernelCall.with_params(kernel_fn, params, kernel_kwargs)
    processes = jax.process_count()
    if processes > 1 and store is None:
        raise ValueError(f"compute_kernel runs under jax.distributed with {processes} processes but "
                         f"store=None: pass store=PATH on a filesystem every process sees, so each "
                         f"computes its share of the tiles into it (without a store every process "
                         f"would compute the whole kernel).")
    return _compute(call, x1, x2, tile=tile, store=store, progress=progress, devices=devices,
                    memory_budget=memory_budget, fingerprint=fingerprint, share=True,
                    symmetric=symmetric)


_KERNEL_SETTINGS = ("trace_axes", "diagonal_axes", "vmap_axes", "implementation")


def _model_kernel(model: Any, x1: PyTree, x2: PyTree | None, params: PyTree,
                  kwargs: dict) -> tuple[KernelFn, PyTree, PyTree, PyTree, dict]:
    """`compute_kernel(model, ...)` as `compute_kernel(kernel_fn, ...)`: the model converted
    (`entk.adapters.to_model`, with `x1`), its empirical kernel function built from the settings
    in `kwargs`, inputs as NumPy, and `params` the model's own unless given."""
    from entk import adapters
    from entk.empirical import empirical_kernel_fn, empirical_ntk_fn

    converted = adapters.to_model(model, x1, params=params)
    settings = {"vmap_axes": "auto", **{k: kwargs.pop(k) for k in _KERNEL_SETTINGS if k in kwargs}}
    if "get" in kwargs:
        fn = empirical_kernel_fn(converted, **settings)
    else:
        fn = empirical_ntk_fn(converted, **settings)
    x1, x2 = jax.tree_util.tree_map(adapters.to_numpy, (x1, x2))
    return fn, x1, x2, converted.params, kwargs


def batch(kernel_fn: KernelFn, batch_size: int | tuple[int, int], *,
          devices: Sequence[jax.Device] | None = None) -> KernelFn:
    """`kernel_fn` computed in tiles of `batch_size` examples, spread over the local devices.

    Supported forms (any function whose first two arguments are `x1, x2` and whose other arguments
    are the same for every tile): `ntk_fn(x1, x2, params, **kw)` of `empirical_ntk_fn` /
    `empirical_nngp_fn`; `kernel_fn(x1, x2, get, params, **kw)` of `empirical_kernel_fn`; and
    `kernel_fn(x1, x2, get)` of `entk.stax` and `monte_carlo_kernel_fn` with `get` naming array
    kernels (`"nngp"`, `"ntk"` or a tuple of them; not the whole `Kernel`, whose per-example `cov1`
    and `cov2` cannot be tiled).

    Any `N1` and `N2` work: the last tiles are padded and the padding dropped. Kernels whose leaves
    are `(N1, N2, ...)` are tiled over the (x1, x2) grid; kernels whose leaves are `(N, ...)` (the
    batch axis in `diagonal_axes`) are tiled along the diagonal, x1 and x2 cut alike; any other
    layout is refused with an error naming the leaves. Each step computes one tile per device with
    `shard_map` over a `Mesh` of the devices.

    Args:
      kernel_fn: the kernel function to tile.
      batch_size: examples per tile, an int or `(rows, cols)`.
      devices: local devices to use (default: all of this process's devices).

    Returns:
      `batched(x1, x2=None, *args, **kwargs)` with `kernel_fn`'s result as JAX arrays. It runs a
      Python loop over tiles, so call it outside `jax.jit`. Under `jax.distributed` each process
      computes the whole kernel on its own devices (use `compute_kernel(store=...)` to share tiles).
      Keyword arguments go unchanged to every tile; with an `rng` keyword, the tiles of `x2=None`
      see `x2` as different inputs (as `kernel_fn(x1, x1_copy)` would), so stochastic models give
      other samples than one unbatched call.
    """
    tile = tiling.normalize_tile(batch_size, 1 << 62, 1 << 62, "grid")

    @functools.wraps(kernel_fn)
    def batched(x1: PyTree, x2: PyTree | None = None, *args: Any, **kwargs: Any) -> PyTree:
        out = _compute(KernelCall(kernel_fn, args, kwargs), x1, x2, tile=tile, store=None,
                       progress=False, devices=devices, memory_budget=None, fingerprint=None,
                       share=False, symmetric=False)
        return jax.tree_util.tree_map(jnp.asarray, out)

    return batched


# ----------------------------------------------------------------------------------------------


class _InMemory:
    """Host arrays for a kernel computed without a store (same interface as `KernelStore`)."""

    def __init__(self, layout: Layout, grid: TileGrid):
        self.layout, self.grid = layout, grid
        self.arrays = [np.empty(shape, leaf.dtype)
                       for leaf, shape in zip(layout.leaves, layout.full_shapes(grid.n1, grid.n2))]
        self.path = "memory"

    def done(self) -> set:
        return set()

    def verify(self, tiles: Any) -> set:
        return set()

    def write(self, tile: tiling.Tile, leaves: list[np.ndarray], info: dict) -> None:
        region, mirror = self.grid.region(tile), self.grid.mirror(tile)
        for array, leaf in zip(self.arrays, leaves):
            array[region] = leaf
            if mirror is not None:
                array[mirror] = leaf.T

    def result(self) -> PyTree:
        return jax.tree_util.tree_unflatten(self.layout.treedef, self.arrays)


def _compute(call: KernelCall, x1: PyTree, x2: PyTree | None, *, tile: Any, store: Any,
             progress: bool, devices: Any, memory_budget: int | None, fingerprint: Any,
             share: bool, symmetric: bool) -> PyTree:
    x2_is_x1 = x2 is None or x2 is x1
    n1 = example_count(x1, "x1")
    n2 = n1 if x2_is_x1 else example_count(x2, "x2")
    x1 = to_host(x1)
    x2 = x1 if x2_is_x1 else to_host(x2)
    layout = probe_layout(call, x1, x2)
    if layout.kind == DIAGONAL and n1 != n2:
        raise ValueError(f"This kernel pairs example n of x1 with example n of x2 only (its leaves "
                         f"are (N, ...)), so x1 and x2 need as many examples; got {n1} and {n2}.")
    if symmetric:
        _check_symmetric(layout, x2_is_x1)
    devices = sharding.local_devices(devices)
    process, processes = (jax.process_index(), jax.process_count()) if share else (0, 1)

    stored = read_fingerprint(store) if store is not None else None
    if stored is None and store is not None and tile == "auto" and process != 0:
        stored = _wait_for_store(store)  # process 0 chooses the tile size for everyone
    b1, b2 = _tile_size(tile, stored, call, layout, x1, x2, n1, n2, devices, memory_budget)
    if symmetric and b1 != b2:
        raise ValueError(f"symmetric=True mirrors tiles across the diagonal, so they must be "
                         f"square; got tile={tile!r}, pass one size.")
    grid = TileGrid(n1, n2, b1, b2, layout.kind, symmetric)

    if store is None:
        target = _InMemory(layout, grid)
    else:
        fp = make_fingerprint(layout=layout, grid=grid, x1=x1, x2=x2, x2_is_x1=x2_is_x1,
                              dynamic=call.dynamic, user=fingerprint,
                              kernel=kernel_hash(call, x1, x2, b1, b2))
        target = KernelStore.open(store, fp, layout, grid)
    every = grid.tiles()
    mine = every[process::processes]  # round-robin share of this process
    done = target.verify(mine)  # damaged stored tiles are reported and recomputed, never returned
    todo = [t for t in mine if t not in done]
    where = f" (process {process} of {processes})" if processes > 1 else ""
    log.info("kernel %s in %d tiles of %d x %d on %d device(s)%s: %d to compute, %d already stored.",
             tuple(layout.full_shapes(n1, n2)[0][:2]), len(every), b1, b2, len(devices), where,
             len(todo), len(mine) - len(todo))
    bar = _progress_bar(progress, len(mine), len(mine) - len(todo), "kernel tiles" + where)
    runner = None

    def run(tiles: list) -> None:
        nonlocal runner
        if runner is None:
            padded1, padded2 = grid.padded
            runner = sharding.TileRunner(call, layout, grid, tiling.pad_examples(x1, padded1),
                                         tiling.pad_examples(x2, padded2), devices)
        for t, leaves, seconds in runner.run(tiles):
            target.write(t, leaves, {"process": process, "seconds": seconds})
            log.debug("tile %s computed and stored in %s (%.3f s)", grid.name(t), target.path,
                      seconds)
            if bar is not None:
                bar.update(1)

    try:
        if todo:
            run(todo)
        if processes > 1:
            _wait_for_others(target, every, bar)
            # The other processes' tiles are verified too; a damaged one is recomputed here.
            others = sorted(set(every) - set(mine))
            intact = target.verify(others)
            damaged = [t for t in others if t not in intact]
            if damaged:
                run(damaged)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
            bar = None
        print(_interrupted(target, every), file=sys.stderr, flush=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return target.result()


def _interrupted(target: KernelStore | _InMemory, every: list) -> str:
    """What a Ctrl-C leaves behind, and how to resume: printed before the interrupt propagates."""
    if isinstance(target, _InMemory):
        return ("entk.compute_kernel interrupted: nothing stored; pass store=PATH to "
                "entk.compute_kernel (or --store to `entk ntk`) to make it resumable.")
    stored = len(target.done() & set(every))
    return (f"entk.compute_kernel interrupted: stored {stored} of {len(every)} tiles in "
            f"{os.fspath(target.path)}; run the same command or call again to resume.")


def _check_symmetric(layout: Layout, x2_is_x1: bool) -> None:
    if not x2_is_x1:
        raise ValueError("symmetric=True needs x2=None (the kernel of x1 with itself).")
    wrong = [leaf.path or "output" for leaf in layout.leaves if leaf.tail] or (
        ["output"] if layout.kind != "grid" else [])
    if wrong:
        raise ValueError(f"symmetric=True mirrors (N, N) kernels only, but {wrong} have more axes "
                         f"(or a diagonal batch axis); trace the output axes (trace_axes) or use "
                         f"symmetric=False.")


def _tile_size(tile: Any, stored: dict | None, call: KernelCall, layout: Layout, x1: PyTree,
               x2: PyTree, n1: int, n2: int, devices: list, memory_budget: int | None
               ) -> tuple[int, int]:
    if isinstance(tile, str):
        if tile != "auto":
            raise ValueError(f"tile={tile!r}: use 'auto', an int, or a pair of ints.")
        if stored is not None and stored.get("examples") == [n1, n2]:
            return tuple(stored["tile"])
        budget = memory_budget if memory_budget is not None else tiling.memory_budget(devices)
        return tiling.auto_tile(call.tile_function(), x1, x2, call.dynamic, n1, n2, layout.kind,
                                budget)
    return tiling.normalize_tile(tile, n1, n2, layout.kind)


def _progress_bar(enabled: bool, total: int, initial: int, description: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("progress=True needs tqdm (pip install tqdm); continuing without a progress "
                      "bar.", stacklevel=3)
        return None
    return tqdm(total=total, initial=initial, desc=description, unit="tile", dynamic_ncols=True)


def _wait_for_store(store: Any) -> dict:
    """Waits until process 0 has created the store (it picks `tile='auto'` for every process)."""
    log.info("waiting for process 0 to create the store %s", os.fspath(store))
    deadline = time.monotonic() + STORE_CREATION_TIMEOUT
    while time.monotonic() < deadline:
        stored = read_fingerprint(store)
        if stored is not None:
            return stored
        time.sleep(POLL_SECONDS)
    raise TimeoutError(f"Process 0 did not create the store {os.fspath(store)!r} within "
                       f"{STORE_CREATION_TIMEOUT} s. With tile='auto' under jax.distributed, process "
                       f"0 picks the tile size; check that it runs and sees the same filesystem, or "
                       f"pass an explicit tile= to every process.")


def _wait_for_others(kernel_store: KernelStore, every: list, bar) -> None:
    """Waits until the shared store holds every tile (the other processes' shares included)."""
    missing = set(every) - kernel_store.done()
    if missing:
        log.info("waiting for other processes to finish %d tile(s)", len(missing))
        if bar is not None:
            bar.set_postfix_str(f"waiting for {len(missing)} tile(s) of other processes")
    while missing:
        time.sleep(POLL_SECONDS)
        missing -= kernel_store.done()
