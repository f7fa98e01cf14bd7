"""The tile grid over the (x1, x2) example pairs, ragged edges, and the automatic tile size.

Every tile has the same padded size `(b1, b2)` so the tile function compiles once; inputs are padded
to whole tiles by repeating their last example (a real example, so the padding cannot produce NaNs
or trip input checks) and the padded rows / columns of the kernel are dropped.

`tile="auto"` compiles the tile function at two small sizes, reads XLA's memory analysis of each
(temporaries + outputs), fits `bytes(b) ≈ α·b + γ·b²` and takes the largest square tile within the
per-device memory budget, then checks that size by compiling it (shrinking if it does not fit). This
is the compiler's own byte count for the real tile function (any kernel function, analytic ones
included); the free memory comes from the device facts (`entk.algorithms.device.device_free_bytes`).
When even a 1 x 1 tile exceeds the budget, `entk.algorithms.device.OutOfBudgetError` says so (a tile
that does not fit is never chosen silently).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np

from entk.scale.calls import DIAGONAL, GRID

PyTree = Any
Tile = tuple[int, int]

log = logging.getLogger("entk.scale")

# Upper bound on an automatic tile side: larger tiles gain little throughput but lose more work on a
# crash and give a coarser progress bar.
MAX_AUTO_TILE = 4096
# Fraction of the free memory an automatic tile may plan to use (XLA's estimate is not exact, and
# the host also holds fetched tiles and the inputs).
MEMORY_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """Tiles of `(b1, b2)` examples over `n1 × n2` pairs (`kind=GRID`) or over the `n1 = n2` diagonal.

    A tile is named `(i, j)`: x1 examples `[i·b1, (i+1)·b1)` against x2 examples `[j·b2, (j+1)·b2)`;
    on the diagonal `i == j` and `b1 == b2`. A `symmetric` grid (the kernel of x1 with itself) keeps
    only the tiles with `i <= j`; each also fills its mirror image `(j, i)`, transposed.
    """

    n1: int
    n2: int
    b1: int
    b2: int
    kind: str = GRID
    symmetric: bool = False

    def __post_init__(self):
        if self.kind == DIAGONAL and (self.n1 != self.n2 or self.b1 != self.b2):
            raise ValueError(f"A diagonal tiling needs N1 == N2 and square tiles, got {self.n1} × "
                             f"{self.n2} examples in tiles of {self.b1} × {self.b2}.")
        if self.symmetric and (self.kind != GRID or self.n1 != self.n2 or self.b1 != self.b2):
            raise ValueError(f"A symmetric tiling needs a grid kernel with N1 == N2 and square "
                             f"tiles, got {self.n1} × {self.n2} examples in tiles of {self.b1} × "
                             f"{self.b2}.")
        for name, b in (("tile height", self.b1), ("tile width", self.b2)):
            if b < 1:
                raise ValueError(f"The {name} must be at least 1, got {b}.")

    @property
    def rows(self) -> int:
        return math.ceil(self.n1 / self.b1)

    @property
    def cols(self) -> int:
        return math.ceil(self.n2 / self.b2)

    @property
    def padded(self) -> tuple[int, int]:
        """Example counts of x1 and x2 after padding to whole tiles."""
        return self.rows * self.b1, self.cols * self.b2

    def tiles(self) -> list[Tile]:
        """Every tile, row-major (the order processes share them in)."""
        if self.kind == DIAGONAL:
            return [(i, i) for i in range(self.rows)]
        return [(i, j) for i in range(self.rows) for j in range(self.cols)
                if not self.symmetric or i <= j]

    def mirror(self, tile: Tile) -> tuple[slice, ...] | None:
        """Where the transposed tile lands on a symmetric grid (`None` if nowhere else)."""
        i, j = tile
        if not self.symmetric or i == j:
            return None
        return self.region((j, i))

    def valid(self, tile: Tile) -> tuple[int, int]:
        """How many rows and columns of the padded tile are real examples."""
        i, j = tile
        return min(self.b1, self.n1 - i * self.b1), min(self.b2, self.n2 - j * self.b2)

    def region(self, tile: Tile) -> tuple[slice, ...]:
        """Where the tile's valid part lands in the kernel's example axes."""
        i, j = tile
        r1, r2 = self.valid(tile)
        rows = slice(i * self.b1, i * self.b1 + r1)
        if self.kind == DIAGONAL:
            return (rows,)
        return rows, slice(j * self.b2, j * self.b2 + r2)

    def crop(self, tile: Tile) -> tuple[slice, ...]:
        """The valid part of a padded tile's example axes."""
        r1, r2 = self.valid(tile)
        return (slice(0, r1),) if self.kind == DIAGONAL else (slice(0, r1), slice(0, r2))

    def name(self, tile: Tile) -> str:
        i, j = tile
        return f"{i}" if self.kind == DIAGONAL else f"{i}.{j}"


def pad_examples(x: PyTree, n: int) -> PyTree:
    """Host inputs padded to `n` examples by repeating the last one."""

    def pad(leaf: np.ndarray) -> np.ndarray:
        extra = n - leaf.shape[0]
        if extra <= 0:
            return leaf
        return np.concatenate([leaf, np.repeat(leaf[-1:], extra, axis=0)], axis=0)

    return jax.tree_util.tree_map(pad, x)


def normalize_tile(tile: int | Sequence[int], n1: int, n2: int, kind: str) -> tuple[int, int]:
    """`tile` (an int or a pair) as `(b1, b2)`, clipped to the example counts."""
    if isinstance(tile, (int, np.integer)) and not isinstance(tile, bool):
        b1 = b2 = int(tile)
    else:
        try:
            b1, b2 = (int(t) for t in tile)
        except (TypeError, ValueError):
            raise TypeError(f"tile must be 'auto', an int, or a pair of ints (rows, cols), got "
                            f"{tile!r}.") from None
    if b1 < 1 or b2 < 1:
        raise ValueError(f"tile={tile!r}: tile sizes must be at least 1.")
    if kind == DIAGONAL:
        if b1 != b2:
            raise ValueError(f"tile={tile!r}: this kernel pairs example n of x1 with example n of "
                             f"x2 only (the batch axis is diagonal), so x1 and x2 are cut alike; give "
                             f"one tile size.")
        b = min(b1, n1)
        return b, b
    return min(b1, n1), min(b2, n2)


def even_split(n: int, b: int) -> int:
    """The smallest tile size giving as many tiles as size `b` does (least padding)."""
    return math.ceil(n / math.ceil(n / b))


# ----------------------------------------------------------------------------------------------
# Memory budget and automatic tile size


def memory_budget(devices: Sequence[jax.Device]) -> int:
    """Bytes one tile computation may use on each device: a fraction of the free memory.

    Free memory is `entk.algorithms.device.device_free_bytes` (allocator statistics on
    accelerators, the host's available memory on CPU). CPU devices share the host's RAM, so their
    budget is split between them.
    """
    from entk.algorithms.device import device_free_bytes

    free = min(device_free_bytes(d) for d in devices)
    sharing = sum(1 for d in devices if d.platform == "cpu") or 1
    return int(free * MEMORY_FRACTION / sharing)


def _tile_bytes(tile_fn: Callable, x1: PyTree, x2: PyTree, dynamic: list, b1: int, b2: int) -> int:
    """XLA's estimate of the memory one tile of `(b1, b2)` takes (arguments, temporaries, outputs)."""
    def shaped(x, n):
        return jax.tree_util.tree_map(
            lambda leaf: jax.ShapeDtypeStruct((n,) + tuple(leaf.shape[1:]), leaf.dtype), x)

    compiled = jax.jit(tile_fn).lower(shaped(x1, b1), shaped(x2, b2), dynamic).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        raise NotImplementedError("this backend gives no memory analysis")
    return int(stats.argument_size_in_bytes + stats.temp_size_in_bytes
               + stats.output_size_in_bytes)


def _raise_no_tile_fits(used: int, budget: int, fixed: int) -> None:
    """`tile="auto"` cannot honour the budget: even one example pair needs more."""
    from entk.algorithms.device import OutOfBudgetError

    raise OutOfBudgetError(
        f"tile='auto': the smallest tile (1 x 1 examples) needs {used / 2**20:.3g} MiB by the "
        f"compiler's estimate ({fixed / 2**20:.3g} MiB of it the kernel's parameters and other array "
        f"arguments), more than memory_budget={budget / 2**20:.3g} MiB per device. Raise "
        f"memory_budget; or make the kernel cheaper (another implementation=, trace_axes= to "
        f"average output axes, vmap_axes= for a model that treats examples independently); or "
        f"give tile= explicitly (it is used as given, whatever the budget).")


def auto_tile(tile_fn: Callable, x1: PyTree, x2: PyTree, dynamic: list, n1: int, n2: int,
              kind: str, budget: int) -> tuple[int, int]:
    """The largest (square, evenly split) tile whose compiled footprint fits `budget` bytes."""
    n = max(n1, n2) if kind == GRID else n1
    fixed = sum(int(np.asarray(leaf).nbytes) for leaf in dynamic)  # parameters: every tile's

    measured: dict[tuple[int, int], int] = {}

    def footprint(b1: int, b2: int | None = None) -> int:
        b1, b2 = normalize_tile(b1 if b2 is None else (b1, b2), n1, n2, kind)
        if (b1, b2) not in measured:
            measured[b1, b2] = _tile_bytes(tile_fn, x1, x2, dynamic, b1, b2)
        return measured[b1, b2]

    small = min(8, n)
    try:
        y_small = footprint(small) - fixed
        if small == n and y_small + fixed <= budget:
            return normalize_tile(n, n1, n2, kind)
        y_big = footprint(2 * small) - fixed if small < n else 2 * y_small  # (linear if no probe)
    except NotImplementedError:
        log.warning("No compiler memory analysis on %s; using tile=256.", jax.default_backend())
        return normalize_tile(256, n1, n2, kind)
    # footprint(b) - fixed ≈ α b + γ b² through the probes at b0 and 2 b0.
    gamma = (y_big - 2 * y_small) / (2 * small * small)
    if gamma <= 0:
        gamma, alpha = 0.0, max(y_small / small, y_big / (2 * small), 1.0)
    else:
        alpha = max((y_small - gamma * small * small) / small, 0.0)
    room = max(budget - fixed, 0)
    b = (room / alpha if gamma == 0 else
         (-alpha + math.sqrt(alpha * alpha + 4 * gamma * room)) / (2 * gamma))
    b = int(max(1, min(b, n, MAX_AUTO_TILE)))
    while True:
        if kind == GRID:
            b1, b2 = min(even_split(n1, b), n1), min(even_split(n2, b), n2)
        else:
            b1 = b2 = even_split(n, b)
        used = footprint(b1, b2)
        if used <= budget:
            break
        if b == 1:
            _raise_no_tile_fits(used, budget, fixed)
        b = max(1, min(b - 1, int(b * math.sqrt(budget / used) * 0.9)))
    log.info("tile='auto': %d x %d examples (compiler estimate %.3g GB, budget %.3g GB per device).",
             b1, b2, used / 1e9, budget / 1e9)
    return b1, b2
