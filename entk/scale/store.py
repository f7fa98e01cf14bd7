"""The on-disk kernel: a zarr group whose chunks are the tiles, completion markers, a fingerprint.

Layout of a store at `PATH`:

    PATH/zarr.json           zarr group; attribute "entk_kernel" holds the fingerprint
    PATH/<name>/             one zarr array per output leaf ("kernel" for a single array output;
                             "nngp", "ntk", ... for a pytree), chunk = one tile, uncompressed,
                             fill value NaN (an absent tile reads as NaN)
    PATH/tiles_done/<i>.<j>  completion marker of tile (i, j) ("<i>" on a diagonal), written after
                             every leaf's chunk of that tile; JSON holding the SHA-256 of each
                             leaf's values as written ("checksums"), the writing process and time

A tile counts as finished only when its marker exists, and the marker is written (temporary file,
then `os.replace`) only after its chunks are written and read back intact. A process killed at any
moment therefore leaves every tile either complete or absent, and a rerun recomputes exactly the
tiles without a marker (zarr's own chunk writes are also write-then-rename). Survives killed
processes; power loss is not covered (no fsync).

Stored tiles are verified before they are used: a marker's checksums are compared with the values
its chunks hold now (`KernelStore.verify`), so a chunk file that was deleted (it would read as the
NaN fill value), truncated or overwritten is found, reported with a warning naming the tile, and the
tile is recomputed rather than returned.

The store is created in a temporary directory beside `PATH` and renamed into place, so processes
racing to create it (under `jax.distributed`) end up sharing one, and a half-created store never
appears. The fingerprint records shapes, dtypes, tile size, hashes of the inputs, of the kernel's
array arguments (parameters) and of the kernel's computation (its jaxpr on one tile, seen through
`jax.jit`); a store whose fingerprint differs from the current call is refused rather than mixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import numpy as np

from entk.scale.calls import KernelCall, Layout
from entk.scale.tiling import Tile, TileGrid

PyTree = Any

ATTRIBUTE = "entk_kernel"
DONE_DIR = "tiles_done"
FORMAT = 1
# Damaged tiles a warning names one by one (the rest are counted).
MAX_LISTED = 10


class StoreMismatchError(ValueError):
    """The store at the given path holds another kernel than the one asked for."""


class StoreIntegrityError(OSError):
    """A tile just written does not read back as written (the filesystem lost or altered it)."""


def tile_checksums(leaves: list[np.ndarray]) -> list[str]:
    """SHA-256 of each leaf's values (C order, with dtype and shape), as stored in a tile's marker."""
    sums = []
    for leaf in leaves:
        digest = hashlib.sha256()
        _add_array(digest, leaf)
        sums.append(digest.hexdigest())
    return sums


# ----------------------------------------------------------------------------------------------
# Fingerprint


def _add_array(digest: Any, leaf: Any) -> None:
    """Feeds an array's dtype, shape and values (C order) to a hashlib digest."""
    a = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{a.dtype.str}{a.shape}".encode())
    digest.update(a.tobytes())


def _hash_arrays(tree: PyTree) -> str:
    digest = hashlib.sha256()
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    digest.update(str(treedef).encode())
    for leaf in leaves:
        _add_array(digest, leaf)
    return digest.hexdigest()


def unwrap_jit(fn: Callable) -> Callable:
    """The function `jax.jit` wrapped (repeatedly), or `fn` itself if it is not a jitted function.

    `jax.jit(kernel_fn)` computes exactly what `kernel_fn` does, but traces to a jaxpr with an extra
    `jit` equation around it; the fingerprint hashes the unwrapped function so that a store written
    with `kernel_fn` accepts `jax.jit(kernel_fn)` and vice versa. Other decorators are kept: they
    may change what is computed.
    """
    while isinstance(fn, jax.stages.Wrapped) and callable(getattr(fn, "__wrapped__", None)):
        fn = fn.__wrapped__
    return fn


def kernel_hash(call: KernelCall, x1: PyTree, x2: PyTree, b1: int, b2: int) -> str:
    """Hash of what the kernel computes on one tile: its jaxpr (addresses removed) and constants.

    Two kernel functions with another model, other `trace_axes` / `diagonal_axes`, another strategy
    or other static keyword arguments trace to different jaxprs; a `jax.jit` around the kernel
    function does not count (`unwrap_jit`). Parameter values are not in it.
    """
    def shaped(x, n):
        return jax.tree_util.tree_map(
            lambda leaf: jax.ShapeDtypeStruct((n,) + tuple(leaf.shape[1:]), leaf.dtype), x)

    tile_fn = dataclasses.replace(call, fn=unwrap_jit(call.fn)).tile_function()
    dynamic_shapes = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in call.dynamic]
    closed = jax.make_jaxpr(tile_fn)(shaped(x1, b1), shaped(x2, b2), dynamic_shapes)
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(closed))
    digest = hashlib.sha256(text.encode())
    digest.update(_hash_arrays(list(closed.consts)).encode())
    return digest.hexdigest()


def make_fingerprint(*, layout: Layout, grid: TileGrid, x1: PyTree, x2: PyTree, x2_is_x1: bool,
                     dynamic: list, kernel: str, user: Any) -> dict:
    """The JSON-able description a store is checked against (see the module docstring)."""
    fingerprint = {
        "format": FORMAT,
        "layout": layout.kind,
        "examples": [grid.n1, grid.n2],
        "tile": [grid.b1, grid.b2],
        "outputs": [{"path": leaf.path, "shape": list(shape), "dtype": leaf.dtype.str}
                    for leaf, shape in zip(layout.leaves, layout.full_shapes(grid.n1, grid.n2))],
        "x2_is_x1": x2_is_x1,
        "symmetric": grid.symmetric,
        "x1_sha256": _hash_arrays(x1),
        "x2_sha256": _hash_arrays(x1 if x2_is_x1 else x2),
        "arguments_sha256": _hash_arrays(dynamic),
        "kernel_sha256": kernel,
        "user": user,
    }
    try:
        return json.loads(json.dumps(fingerprint))  # as it reads back from the store's attributes
    except TypeError:
        raise TypeError(f"fingerprint={user!r} must be JSON-serialisable (str, numbers, lists, "
                        f"dicts); it is stored in the kernel store's attributes.") from None


_WHAT = {
    "format": "store format version",
    "layout": "kernel layout (grid of (N1, N2) vs batch diagonal)",
    "examples": "numbers of examples [N1, N2]",
    "tile": "tile size",
    "outputs": "output leaves (path, shape, dtype)",
    "x2_is_x1": "x2 is x1",
    "symmetric": "symmetric (upper-triangle tiles mirrored)",
    "user": "fingerprint= value",
}
_DIFFERENT = {
    "x1_sha256": "x1 holds other values",
    "x2_sha256": "x2 holds other values",
    "arguments_sha256": "the parameters (or other array arguments) of the kernel function differ",
    "kernel_sha256": "the kernel computes something else: another model, trace_axes / "
                     "diagonal_axes, implementation or static keyword argument (or another JAX "
                     "version traced it differently)",
}


def check_fingerprint(path: str | os.PathLike, stored: dict, current: dict) -> None:
    """Raises `StoreMismatchError` naming every field in which the store differs from this call."""
    problems = [f"- {what}: the store has {stored.get(key)!r}, this call {current.get(key)!r}"
                for key, what in _WHAT.items() if stored.get(key) != current.get(key)]
    same_shapes = stored.get("tile") == current.get("tile") and stored.get(
        "examples") == current.get("examples")
    for key, what in _DIFFERENT.items():
        # The kernel's jaxpr is traced at the tile size, so it is only comparable at equal sizes.
        if stored.get(key) != current.get(key) and (key != "kernel_sha256" or same_shapes):
            problems.append(f"- {what}")
    if problems:
        hint = ""
        if stored.get("tile") != current.get("tile") and len(problems) == 1:
            hint = f" To resume it, pass tile={tuple(stored['tile'])} or tile='auto'."
        raise StoreMismatchError(
            f"The kernel store {os.fspath(path)!r} holds another kernel than this call computes:\n"
            + "\n".join(problems)
            + f"\nRefusing to mix them.{hint} Use another store path for this kernel, or delete "
              f"{os.fspath(path)!r} to start over.")


# ----------------------------------------------------------------------------------------------
# Store


def _array_names(layout: Layout) -> list[str]:
    if len(layout.leaves) == 1 and not layout.leaves[0].path:
        return ["kernel"]
    names: list[str] = []
    for k, leaf in enumerate(layout.leaves):
        name = ".".join(re.findall(r"[A-Za-z0-9_\-]+", leaf.path)) or f"leaf{k}"
        while name in names or name == DONE_DIR:
            name = f"{name}_{k}"
        names.append(name)
    return names


def _local_path(path: str | os.PathLike) -> Path:
    text = os.fspath(path)
    if "://" in text:
        raise ValueError(f"store={text!r}: only local (or network-mounted) directories are "
                         f"supported, not URLs.")
    return Path(text)


def read_fingerprint(path: str | os.PathLike) -> dict | None:
    """The fingerprint of the store at `path`, or `None` if nothing is there yet.

    Raises:
      ValueError: `path` exists but is not an entk kernel store.
    """
    import zarr

    path = _local_path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return None
    try:
        group = zarr.open_group(str(path), mode="r")
        stored = dict(group.attrs).get(ATTRIBUTE)
    except Exception as e:  # noqa: BLE001 - any failure to read means "not our store"
        raise ValueError(f"store={os.fspath(path)!r} exists but is not an entk kernel store ({e}); "
                         f"choose another path.") from None
    if stored is None:
        raise ValueError(f"store={os.fspath(path)!r} is a zarr group without the {ATTRIBUTE!r} "
                         f"attribute, not an entk kernel store; choose another path.")
    return stored


class KernelStore:
    """An opened kernel store (see the module docstring)."""

    def __init__(self, path: Path, grid: TileGrid, layout: Layout):
        import zarr

        self.path, self.grid, self.layout = path, grid, layout
        group = zarr.open_group(str(path), mode="r+")
        self.names = _array_names(layout)
        self.arrays = [group[name] for name in self.names]
        self.done_dir = path / DONE_DIR

    @classmethod
    def open(cls, path: str | os.PathLike, fingerprint: dict, layout: Layout,
             grid: TileGrid) -> "KernelStore":
        """Opens the store at `path` (creating it if absent) after checking its fingerprint."""
        path = _local_path(path)
        stored = read_fingerprint(path)
        if stored is None:
            cls._create(path, fingerprint, layout, grid)
            stored = read_fingerprint(path)  # another process may have created it first
        check_fingerprint(path, stored, fingerprint)
        return cls(path, grid, layout)

    @staticmethod
    def _create(path: Path, fingerprint: dict, layout: Layout, grid: TileGrid) -> None:
        import zarr

        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.parent / f".{path.name}.creating-{uuid.uuid4().hex}"
        try:
            group = zarr.open_group(str(staging), mode="w", attributes={ATTRIBUTE: fingerprint})
            tile = (grid.b1, grid.b2) if grid.kind == "grid" else (grid.b1,)
            for name, leaf, shape in zip(_array_names(layout), layout.leaves,
                                         layout.full_shapes(grid.n1, grid.n2)):
                fill = np.nan if np.issubdtype(leaf.dtype, np.inexact) else 0
                group.create_array(name=name, shape=shape, chunks=tile + leaf.tail,
                                   dtype=leaf.dtype, compressors=None, fill_value=fill,
                                   attributes={"leaf": leaf.path})
            (staging / DONE_DIR).mkdir()
            try:
                os.rename(staging, path)  # atomic; fails if another process created `path` first
            except OSError:
                if read_fingerprint(path) is None:
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def done(self) -> set[Tile]:
        """Tiles whose completion marker exists."""
        tiles = set()
        for name in os.listdir(self.done_dir):
            if name.startswith("."):
                continue
            parts = name.split(".")
            try:
                i, j = (int(parts[0]), int(parts[0])) if len(parts) == 1 else map(int, parts)
            except ValueError:
                continue
            tiles.add((i, j))
        return tiles

    def write(self, tile: Tile, leaves: list[np.ndarray], info: dict) -> None:
        """Writes every leaf's chunk of `tile`, reads them back, then writes its completion marker
        (JSON `info` plus the leaves' `checksums`).

        Raises:
          StoreIntegrityError: the chunks do not read back as written.
        """
        region = self.grid.region(tile)
        mirror = self.grid.mirror(tile)
        for array, leaf in zip(self.arrays, leaves):
            array[region] = leaf
            if mirror is not None:
                array[mirror] = leaf.T
        checksums = tile_checksums(leaves)
        problem = self._check(tile, checksums)
        if problem is not None:
            raise StoreIntegrityError(
                f"Tile {self.grid.name(tile)} of the kernel store {os.fspath(self.path)!r} does not "
                f"read back as written: {problem}. Check the filesystem (full disk? another process "
                f"writing there?) and rerun.")
        name = self.grid.name(tile)
        temporary = self.done_dir / f".{name}.{uuid.uuid4().hex}"
        temporary.write_text(json.dumps({**info, "checksums": checksums}))
        os.replace(temporary, self.done_dir / name)

    def _check(self, tile: Tile, checksums: Any) -> str | None:
        """Why the stored chunks of `tile` do not hold the values whose `checksums` are given, or
        `None` if they do (the mirrored copy of a symmetric tile included)."""
        if not isinstance(checksums, list) or len(checksums) != len(self.arrays):
            return "its completion marker holds no checksums (written by an older entk)"
        region, mirror = self.grid.region(tile), self.grid.mirror(tile)
        try:
            for array, expected in zip(self.arrays, checksums):
                if tile_checksums([array[region]]) != [expected]:
                    return f"the chunk of {array.name.strip('/')!r} holds other values than were " \
                           f"written (chunk file deleted, truncated or overwritten)"
                if mirror is not None and tile_checksums([np.asarray(array[mirror]).T]) != [expected]:
                    return f"the mirrored chunk of {array.name.strip('/')!r} holds other values " \
                           f"than were written (chunk file deleted, truncated or overwritten)"
        except Exception as e:  # noqa: BLE001 - zarr/codec errors on a damaged chunk file
            from entk.algorithms.cost import error_summary

            return f"its chunk cannot be read ({error_summary(e)})"
        return None

    def verify(self, tiles: Iterable[Tile]) -> set[Tile]:
        """The tiles among `tiles` whose marker exists and whose chunks hold what the marker's
        checksums say. Any other tile with a marker (its chunk file deleted, truncated or altered,
        or its marker unreadable) loses the marker and is named in a `RuntimeWarning`, so that it is
        recomputed rather than returned."""
        good, bad = set(), []
        for tile in sorted(set(tiles) & self.done()):
            marker = self.done_dir / self.grid.name(tile)
            try:
                checksums = json.loads(marker.read_text()).get("checksums")
                problem = self._check(tile, checksums)
            except (OSError, ValueError, AttributeError):
                problem = "its completion marker cannot be read"
            if problem is None:
                good.add(tile)
                continue
            bad.append(f"tile {self.grid.name(tile)}: {problem}")
            try:
                os.remove(marker)
            except FileNotFoundError:
                pass
        if bad:
            listed = "\n".join(f"- {line}" for line in bad[:MAX_LISTED])
            more = f"\n- ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
            warnings.warn(f"The kernel store {os.fspath(self.path)!r} holds {len(bad)} damaged "
                          f"tile(s); they are recomputed, not returned:\n{listed}{more}",
                          RuntimeWarning, stacklevel=4)
        return good

    def result(self) -> PyTree:
        """The zarr arrays, in the structure of the kernel function's output."""
        return jax.tree_util.tree_unflatten(self.layout.treedef, self.arrays)
