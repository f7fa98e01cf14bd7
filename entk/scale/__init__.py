"""Kernels bigger than one device: tiled, sharded over devices and hosts, resumable on disk.

- `entk.batch(kernel_fn, batch_size)`: the same kernel function, computed in tiles spread over the
  local devices (`jax.sharding`: one tile per device per step with `shard_map`), any N1 and N2.
- `entk.compute_kernel(kernel_fn, x1, x2, params, store=PATH)`: tile by tile into a zarr store; a
  rerun computes only the missing tiles; under `jax.distributed` every process computes its share
  into the same store; a tqdm bar shows tiles done, tiles/s and ETA.

Modules: `calls` (binding a kernel function's arguments, learning its output layout), `tiling` (tile
grid, padding, automatic tile size), `sharding` (running tiles on devices), `store` (the on-disk
format, fingerprint, completion markers), `compute` (the two public functions). zarr and tqdm are
imported only when a store or a progress bar is used.
"""

from entk.scale.compute import batch, compute_kernel
from entk.scale.store import StoreMismatchError

__all__ = ["batch", "compute_kernel", "StoreMismatchError"]
