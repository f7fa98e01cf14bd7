"""Running tiles on every local device at once with `jax.sharding`.

One step computes D tiles on D devices: the x1 and x2 slices of the D tiles are stacked on a leading
`tiles` axis and sharded over a one-axis `Mesh` (`NamedSharding(mesh, P("tiles"))`); `shard_map` hands
each device its own tile and the parameters, replicated. The kernel function runs unchanged on one
tile per device: nothing is communicated between devices, so the same code serves one device, many
local devices, and (with one store shared by processes) many hosts under `jax.distributed`.

Steps are pipelined: step k+1 is dispatched before step k's results are copied to the host, so the
devices keep computing while the host writes tiles.
"""

from __future__ import annotations

import time
import weakref
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from entk.scale.calls import KernelCall, Layout
from entk.scale.tiling import Tile, TileGrid

PyTree = Any
AXIS = "tiles"

# kernel function -> {(static arguments, devices): compiled step}; reused across calls.
_STEPS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def local_devices(devices: Sequence[jax.Device] | None) -> list[jax.Device]:
    """`devices`, or every device of this process; refuses another process's devices."""
    if devices is None:
        return list(jax.local_devices())
    devices = list(devices)
    if not devices:
        raise ValueError("devices=[] has no devices; pass None for all local devices.")
    foreign = [d for d in devices if d.process_index != jax.process_index()]
    if foreign:
        raise ValueError(f"devices includes {foreign}, which belong to other processes; each "
                         f"process computes its tiles on its own devices (jax.local_devices()).")
    return devices


def _step_function(call: KernelCall, devices: list[jax.Device]) -> Callable:
    """jit(shard_map(tile function)) over a mesh of `devices`, cached per kernel function."""
    key = (call.static_key, tuple(d.id for d in devices))
    try:
        cache = _STEPS.setdefault(call.fn, {})
    except TypeError:  # not weak-referenceable: no reuse across calls
        cache = {}
    if key in cache:
        return cache[key]
    tile_fn = call.tile_function()
    mesh = Mesh(np.array(devices), (AXIS,))

    def one_tile_per_device(x1_block: PyTree, x2_block: PyTree, dynamic: list) -> PyTree:
        squeeze = lambda tree: jax.tree_util.tree_map(lambda a: a[0], tree)  # noqa: E731
        out = tile_fn(squeeze(x1_block), squeeze(x2_block), dynamic)
        return jax.tree_util.tree_map(lambda a: a[None], out)

    step = jax.jit(jax.shard_map(
        one_tile_per_device, mesh=mesh,
        in_specs=(PartitionSpec(AXIS), PartitionSpec(AXIS), PartitionSpec()),
        out_specs=PartitionSpec(AXIS),
        # Kernel functions may hold callbacks (PyTorch / TF bridges) without replication rules.
        check_vma=False))
    cache[key] = (step, mesh)
    return cache[key]


class TileRunner:
    """Computes tiles of one kernel on `devices`, D tiles per step.

    Args:
      call: the kernel function with its bound arguments.
      layout: its output layout (`probe_layout`).
      grid: the tile grid.
      x1, x2: host inputs, already padded to whole tiles (`grid.padded`).
      devices: local devices to spread the tiles over.
    """

    def __init__(self, call: KernelCall, layout: Layout, grid: TileGrid, x1: PyTree, x2: PyTree,
                 devices: list[jax.Device]):
        self.layout, self.grid = layout, grid
        self.x1, self.x2 = x1, x2
        self.devices = devices
        self.step, mesh = _step_function(call, devices)
        self.sharding = NamedSharding(mesh, PartitionSpec(AXIS))
        replicated = NamedSharding(mesh, PartitionSpec())
        self.dynamic = [jax.device_put(leaf, replicated) for leaf in call.dynamic]

    def _inputs(self, tiles: list[Tile]) -> tuple[PyTree, PyTree]:
        b1, b2 = self.grid.b1, self.grid.b2

        def stack(x: PyTree, starts: list[int], size: int) -> PyTree:
            return jax.tree_util.tree_map(
                lambda leaf: jax.device_put(np.stack([leaf[s:s + size] for s in starts]),
                                            self.sharding), x)

        return (stack(self.x1, [i * b1 for i, _ in tiles], b1),
                stack(self.x2, [j * b2 for _, j in tiles], b2))

    def _dispatch(self, tiles: list[Tile]) -> tuple[list[Tile], PyTree, float]:
        padded = tiles + [tiles[-1]] * (len(self.devices) - len(tiles))  # idle devices redo one
        x1, x2 = self._inputs(padded)
        return tiles, self.step(x1, x2, self.dynamic), time.perf_counter()

    def run(self, tiles: Iterable[Tile]) -> Iterator[tuple[Tile, list[np.ndarray], float]]:
        """Yields `(tile, leaves, seconds)` per tile: host arrays cropped to the valid examples, in
        `tree_leaves` order, and the wall time of the step that computed it shared among its tiles."""
        tiles = list(tiles)
        d = len(self.devices)
        steps = [tiles[k:k + d] for k in range(0, len(tiles), d)]
        pending = self._dispatch(steps[0]) if steps else None
        for k in range(len(steps)):
            done_tiles, out, started = pending
            pending = self._dispatch(steps[k + 1]) if k + 1 < len(steps) else None
            leaves = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(out)]
            seconds = (time.perf_counter() - started) / len(done_tiles)
            for slot, tile in enumerate(done_tiles):
                crop = self.grid.crop(tile)
                yield tile, [leaf[slot][crop] for leaf in leaves], seconds
