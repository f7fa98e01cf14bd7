"""entk.batch and entk.compute_kernel: tiled, sharded, resumable kernels.

In-process tests use this process's single CPU device. Checks that need 4 devices or two
`jax.distributed` processes run tests/scale_worker.py in fresh interpreters with
XLA_FLAGS=--xla_force_host_platform_device_count=N (the flag must be set before JAX starts); those
subprocesses are started early (module fixture) and run while the in-process tests do.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import entk
from entk.scale import StoreMismatchError
from entk.scale.calls import DIAGONAL, GRID
from entk.scale.tiling import TileGrid
from tests.reference import assert_close, brute_force_ntk
from tests.scale_worker import make_case

zarr = pytest.importorskip("zarr")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "scale_worker.py")
N1, N2, TILE = 37, 29, 8          # as in scale_worker.py: 5 x 4 = 20 ragged tiles
ALL_TILES = {(i, j) for i in range(5) for j in range(4)}
SUBPROCESS_TIMEOUT = 240


# ----------------------------------------------------------------------------------------------
# Shared cases (compiled once per module)


@pytest.fixture(scope="module")
def mlp():
    f, params, x1, x2 = make_case("mlp", N1, N2)
    ntk_fn = entk.empirical_ntk_fn(f, implementation="jc")
    reference = jax.jit(lambda a, b, p: brute_force_ntk(f, a, b, p))(x1, x2, params)
    return f, params, x1, x2, ntk_fn, reference


def _env(devices: int, **extra: str) -> dict:
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def _worker(args: list[str], devices: int, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, *args], cwd=ROOT, env=_env(devices, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert process.returncode == 0, f"worker failed ({process.returncode}):\n{err[-4000:]}"
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"worker printed no result:\n{out[-2000:]}\n{err[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _logged_tiles(path: str, store: str | None = None) -> list[tuple[int, int]]:
    tiles = []
    if not os.path.exists(path):
        return tiles
    with open(path) as f:
        for line in f:
            words = line.split()
            if len(words) > 2 and words[0] == "tile" and (store is None or store in line):
                i, j = words[1].split(".")
                tiles.append((int(i), int(j)))
    return tiles


def _markers(store: str) -> set[tuple[int, int]]:
    names = os.listdir(os.path.join(store, "tiles_done"))
    return {tuple(int(v) for v in name.split(".")) for name in names if not name.startswith(".")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def background(tmp_path_factory):
    """Starts the 4-device check and the two jax.distributed processes; tests collect them."""
    tmp = tmp_path_factory.mktemp("scale_workers")
    devices = _worker(["devices"], 4, ENTK_TEST_TMP=str(tmp))
    port = _free_port()
    store = str(tmp / "shared.zarr")
    distributed = [_worker(["distributed", "--process-id", str(i), "--processes", "2", "--port",
                            str(port), "--store", store, "--log", str(tmp / f"dist{i}.log")], 2)
                   for i in range(2)]
    yield {"devices": devices, "distributed": distributed, "tmp": tmp, "store": store}
    for p in [devices, *distributed]:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture(scope="module", autouse=True)
def _start_background(request):
    """Starts the subprocesses before the first (in-process) test, if a selected test needs them."""
    if any("background" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("background")


# ----------------------------------------------------------------------------------------------
# Tile grid


@pytest.mark.parametrize("n1,n2,b1,b2,kind", [(37, 29, 8, 8, GRID), (37, 29, 5, 7, GRID),
                                              (4, 3, 10, 10, GRID), (37, 37, 8, 8, DIAGONAL)])
def test_tile_grid_covers_every_entry_once(n1, n2, b1, b2, kind):
    grid = TileGrid(n1, n2, min(b1, n1), min(b2, n2), kind)
    count = np.zeros((n1, n2) if kind == GRID else (n1,), int)
    for tile in grid.tiles():
        count[grid.region(tile)] += 1
        r1, r2 = grid.valid(tile)
        assert 1 <= r1 <= grid.b1 and 1 <= r2 <= grid.b2
    np.testing.assert_array_equal(count, 1)


# ----------------------------------------------------------------------------------------------
# entk.batch on one device


@pytest.mark.parametrize("batch_size", [8, (5, 7), 100])
def test_batch_matches_brute_force(mlp, batch_size):
    f, params, x1, x2, ntk_fn, reference = mlp
    out = entk.batch(ntk_fn, batch_size)(x1, x2, params)
    assert isinstance(out, jax.Array)
    assert_close(out, reference, rtol=1e-12, what=f"batch_size={batch_size}")


def test_batch_kernel_fn_form_and_pytree_outputs():
    f, params, x1, x2 = make_case("dict_outputs", N1, N2)
    kernel_fn = entk.empirical_kernel_fn(f, implementation="jc")
    out = entk.batch(kernel_fn, 8)(x1, x2, "ntk", params)
    reference = jax.jit(lambda a, b, p: brute_force_ntk(f, a, b, p))(x1, x2, params)
    assert out["pair"].shape == (N1, N2, 2, 2)
    assert_close(out, reference, rtol=1e-12, what="dict outputs")


def test_batch_diagonal_kernel_is_tiled_along_the_diagonal(mlp):
    f, params, x1, _, _, _ = mlp
    diag_fn = entk.empirical_ntk_fn(f, trace_axes=(), diagonal_axes=(0,), implementation="jc")
    x2 = x1[::-1]
    out = entk.batch(diag_fn, 8)(x1, x2, params)
    reference = jax.jit(lambda a, b, p: brute_force_ntk(f, a, b, p, trace_axes=(),
                                                        diagonal_axes=(0,)))(x1, x2, params)
    assert out.shape == (N1, 3, 3)
    assert_close(out, reference, rtol=1e-12, what="diagonal batch axis")
    with pytest.raises(ValueError, match="as many examples"):
        entk.batch(diag_fn, 8)(x1, x1[:5], params)


def test_batch_refuses_untileable_outputs_and_tracing(mlp):
    _, params, x1, x2, ntk_fn, _ = mlp

    def mixed(a, b):
        return {"gram": a @ b.T, "norms": jnp.sum(a * a, axis=1)}

    with pytest.raises(ValueError, match=r"\['norms'\]: \(2,\).*start with the example axes"):
        entk.batch(mixed, 4)(x1, x2)
    with pytest.raises(TypeError, match="outside of jax transformations"):
        jax.jit(lambda a: entk.batch(ntk_fn, 8)(a, x2, params))(x1)


# ----------------------------------------------------------------------------------------------
# compute_kernel and its store


def test_compute_kernel_in_memory_and_auto_tile(mlp, caplog):
    from entk.scale.calls import KernelCall
    from entk.scale.tiling import _tile_bytes

    _, params, x1, x2, ntk_fn, reference = mlp
    call = KernelCall.with_params(ntk_fn, params, {})
    budget = _tile_bytes(call.tile_function(), x1, x2, call.dynamic, 16, 16)
    with caplog.at_level(logging.INFO, logger="entk.scale"):
        out = entk.compute_kernel(ntk_fn, x1, x2, params, progress=False, memory_budget=budget)
    assert isinstance(out, np.ndarray)
    assert_close(jnp.asarray(out), reference, rtol=1e-12, what="auto tile")
    chosen = [r.getMessage() for r in caplog.records if "tile='auto'" in r.getMessage()]
    assert chosen, "tile='auto' logs the size it chose"
    b1, b2 = (int(v) for v in chosen[0].split(": ")[1].split(" examples")[0].split(" x "))
    assert 8 <= b1 < N1 and 8 <= b2 < N2, chosen
    assert _tile_bytes(call.tile_function(), x1, x2, call.dynamic, b1, b2) <= budget


def test_auto_tile_refuses_a_budget_no_tile_fits(mlp, caplog):
    from entk.algorithms.cost import OutOfBudgetError
    from entk.scale.calls import KernelCall
    from entk.scale.tiling import _tile_bytes

    _, params, x1, x2, ntk_fn, reference = mlp
    call = KernelCall.with_params(ntk_fn, params, {})
    one = _tile_bytes(call.tile_function(), x1, x2, call.dynamic, 1, 1)
    # One example pair already exceeds the budget: an error, not 1 x 1 tiles that still exceed it.
    with pytest.raises(OutOfBudgetError, match=r"smallest tile \(1 x 1 examples\) needs "
                                               r"[0-9.e-]+ MiB .* more than memory_budget=.*"
                                               r"Raise memory_budget.*give tile= explicitly"):
        entk.compute_kernel(ntk_fn, x1, x2, params, progress=False, memory_budget=one - 1)
    # Few examples (<= 8) whose whole kernel exceeds the budget: a smaller tile is chosen, not all.
    few1, few2 = x1[:6], x2[:5]
    budget = _tile_bytes(call.tile_function(), few1, few2, call.dynamic, 3, 3)
    with caplog.at_level(logging.INFO, logger="entk.scale"):
        out = entk.compute_kernel(ntk_fn, few1, few2, params, progress=False, memory_budget=budget)
    assert_close(jnp.asarray(out), reference[:6, :5], rtol=1e-12, what="few examples, auto tile")
    chosen = [r.getMessage() for r in caplog.records if "tile='auto'" in r.getMessage()][-1]
    b1, b2 = (int(v) for v in chosen.split(": ")[1].split(" examples")[0].split(" x "))
    assert (b1, b2) != (6, 5)
    assert _tile_bytes(call.tile_function(), few1, few2, call.dynamic, b1, b2) <= budget


def test_symmetric_computes_the_upper_tiles_and_mirrors_them(mlp, caplog):
    f, params, x1, x2, ntk_fn, _ = mlp
    reference = jax.jit(lambda a, p: brute_force_ntk(f, a, None, p))(x1, params)
    with caplog.at_level(logging.DEBUG, logger="entk.scale"):
        out = entk.compute_kernel(ntk_fn, x1, None, params, tile=TILE, symmetric=True,
                                  progress=False)
    computed = {tuple(int(v) for v in r.getMessage().split()[1].split("."))
                for r in caplog.records if r.getMessage().startswith("tile ")}
    assert computed == {(i, j) for i in range(5) for j in range(5) if i <= j}
    assert_close(jnp.asarray(out), reference, rtol=1e-12, what="symmetric")
    np.testing.assert_array_equal(out[TILE:2 * TILE, :TILE], out[:TILE, TILE:2 * TILE].T)
    with pytest.raises(ValueError, match="needs x2=None"):
        entk.compute_kernel(ntk_fn, x1, x2, params, tile=TILE, symmetric=True, progress=False)
    full_fn = entk.empirical_ntk_fn(f, trace_axes=(), implementation="jc")
    with pytest.raises(ValueError, match=r"mirrors \(N, N\) kernels only"):
        entk.compute_kernel(full_fn, x1, None, params, tile=TILE, symmetric=True, progress=False)


def test_store_resume_recomputes_exactly_the_missing_tiles(mlp, tmp_path, caplog, capsys):
    _, params, x1, x2, ntk_fn, reference = mlp
    store = str(tmp_path / "k.zarr")
    first = entk.compute_kernel(ntk_fn, x1, x2, params, store=store, tile=TILE, progress=True)
    assert isinstance(first, zarr.Array) and first.chunks == (TILE, TILE)
    assert "20/20" in capsys.readouterr().err, "the progress bar counts tiles"
    complete = np.asarray(first).copy()
    assert_close(jnp.asarray(complete), reference, rtol=1e-12, what="stored kernel")
    assert _markers(store) == ALL_TILES

    # Simulate a crash: three tiles lost their marker; one of them was half-written (garbage chunk).
    lost = [(0, 0), (2, 3), (4, 1)]
    for i, j in lost:
        os.remove(os.path.join(store, "tiles_done", f"{i}.{j}"))
    first[0:TILE, 0:TILE] = -1.0
    with caplog.at_level(logging.DEBUG, logger="entk.scale"):
        again = entk.compute_kernel(ntk_fn, x1, x2, params, store=store, tile="auto",
                                    progress=False)
    recomputed = [tuple(int(v) for v in r.getMessage().split()[1].split("."))
                  for r in caplog.records if r.getMessage().startswith("tile ")]
    assert sorted(recomputed) == sorted(lost)
    np.testing.assert_array_equal(np.asarray(again), complete)


def _chunk(store: str, i: int, j: int) -> str:
    return os.path.join(store, "kernel", "c", str(i), str(j))


def test_damaged_chunks_are_found_and_recomputed_never_returned(mlp, tmp_path, caplog):
    _, params, x1, x2, ntk_fn, reference = mlp
    store = str(tmp_path / "k.zarr")
    complete = np.asarray(entk.compute_kernel(ntk_fn, x1, x2, params, store=store, tile=TILE,
                                              progress=False))
    assert_close(jnp.asarray(complete), reference, rtol=1e-12, what="stored kernel")
    # The user's disk loses one chunk file, truncates another and flips bytes in a third, while
    # every completion marker stays: the store claims 20 of 20 tiles done.
    os.remove(_chunk(store, 1, 2))
    with open(_chunk(store, 3, 0), "r+b") as fh:
        fh.truncate(100)
    with open(_chunk(store, 4, 1), "r+b") as fh:
        fh.seek(16)
        fh.write(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    assert _markers(store) == ALL_TILES
    with caplog.at_level(logging.DEBUG, logger="entk.scale"), \
            pytest.warns(RuntimeWarning, match="3 damaged tile") as caught:
        again = entk.compute_kernel(ntk_fn, x1, x2, params, store=store, tile="auto",
                                    progress=False)
    message = str(caught[0].message)
    for name in ("tile 1.2:", "tile 3.0:", "tile 4.1:"):
        assert name in message, message
    recomputed = [tuple(int(v) for v in r.getMessage().split()[1].split("."))
                  for r in caplog.records if r.getMessage().startswith("tile ")]
    assert sorted(recomputed) == [(1, 2), (3, 0), (4, 1)]
    np.testing.assert_array_equal(np.asarray(again), complete)
    assert_close(jnp.asarray(np.asarray(again)), reference, rtol=1e-12, what="resumed kernel")
    assert _markers(store) == ALL_TILES
    # Now intact: a further resume computes nothing and warns of nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(
            np.asarray(entk.compute_kernel(ntk_fn, x1, x2, params, store=store, progress=False)),
            complete)


def test_damaged_mirror_chunk_of_a_symmetric_store_is_recomputed(mlp, tmp_path):
    _, params, x1, _, ntk_fn, _ = mlp
    store = str(tmp_path / "sym.zarr")
    complete = np.asarray(entk.compute_kernel(ntk_fn, x1, None, params, store=store, tile=TILE,
                                              symmetric=True, progress=False))
    os.remove(_chunk(store, 3, 1))  # the lower-triangle copy of tile 1.3
    with pytest.warns(RuntimeWarning, match="tile 1.3: the mirrored chunk"):
        again = entk.compute_kernel(ntk_fn, x1, None, params, store=store, tile=TILE,
                                    symmetric=True, progress=False)
    np.testing.assert_array_equal(np.asarray(again), complete)
    assert not np.isnan(np.asarray(again)).any()


def test_store_refuses_another_kernel(mlp, tmp_path):
    f, params, x1, x2, ntk_fn, _ = mlp
    store = str(tmp_path / "k.zarr")
    entk.compute_kernel(ntk_fn, x1, x2, params, store=store, tile=TILE, progress=False,
                        fingerprint={"data": "v1"})
    full_fn = entk.empirical_ntk_fn(f, trace_axes=(), implementation="jc")
    other_params = jax.tree_util.tree_map(lambda p: p * 1.5, params)
    cases = [
        (dict(x2=x2 + 1.0), "x2 holds other values"),
        (dict(x2=x2[:20]), r"numbers of examples \[N1, N2\]: the store has \[37, 29\]"),
        (dict(params=other_params), "parameters .* differ"),
        (dict(tile=7), r"pass tile=\(8, 8\) or tile='auto'"),
        (dict(fingerprint={"data": "v2"}), "fingerprint= value"),
        (dict(kernel_fn=full_fn), r"output leaves"),
        (dict(x1=x1.astype(jnp.float32), x2=x2.astype(jnp.float32),
              params=jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params)),
         "float32|<f4"),
    ]
    for change, message in cases:
        call = dict(kernel_fn=ntk_fn, x1=x1, x2=x2, params=params, tile=TILE,
                    fingerprint={"data": "v1"})
        call.update(change)
        kernel_fn = call.pop("kernel_fn")
        with pytest.raises(StoreMismatchError, match=message):
            entk.compute_kernel(kernel_fn, call.pop("x1"), call.pop("x2"), call.pop("params"),
                                store=store, progress=False, **call)
    # Same shapes, other model computation: only the jaxpr fingerprint can tell.
    other_fn = entk.empirical_ntk_fn(lambda p, x: jnp.sin(f(p, x)), implementation="jc")
    with pytest.raises(StoreMismatchError, match="the kernel computes something else"):
        entk.compute_kernel(other_fn, x1, x2, params, store=store, tile=TILE, progress=False,
                            fingerprint={"data": "v1"})
    not_a_store = tmp_path / "other"
    not_a_store.mkdir()
    (not_a_store / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not an entk kernel store"):
        entk.compute_kernel(ntk_fn, x1, x2, params, store=str(not_a_store), tile=TILE,
                            progress=False)


def test_cli_ntk_stores_the_kernel_and_resumes(mlp, tmp_path, capsys):
    from entk import cli_ntk

    _, _, x1, x2, _, reference = mlp
    np.save(tmp_path / "x1.npy", np.asarray(x1))
    np.save(tmp_path / "x2.npy", np.asarray(x2))
    store = str(tmp_path / "cli.zarr")
    argv = ["tests.scale_worker:mlp_model", "--input", str(tmp_path / "x1.npy"), "--input2",
            str(tmp_path / "x2.npy"), "--store", store, "--tile", "16", "--implementation", "jc",
            "--dtype", "float64", "--no-progress"]
    parser = argparse.ArgumentParser()
    cli_ntk.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ntk", *argv])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["shape"] == [[N1, N2]] and summary["chunks"] == [[16, 16]]
    kernel = np.asarray(zarr.open_group(store, mode="r")["kernel"])
    assert_close(jnp.asarray(kernel), reference, rtol=1e-12, what="entk ntk")
    os.remove(os.path.join(store, "tiles_done", "1.1"))
    assert cli_ntk.main(argv) == 0  # resumes the one missing tile
    assert _markers(store) == {(i, j) for i in range(3) for j in range(2)}

    # Without --input2 the traced kernel is symmetric: only tiles on and above the diagonal run.
    square = str(tmp_path / "square.zarr")
    assert cli_ntk.main([*argv[:3], "--store", square, *argv[7:]]) == 0
    assert _markers(square) == {(i, j) for i in range(3) for j in range(3) if i <= j}
    f, params = mlp[0], mlp[1]
    expected = jax.jit(lambda a, p: brute_force_ntk(f, a, None, p))(x1, params)
    kernel = np.asarray(zarr.open_group(square, mode="r")["kernel"])
    assert_close(jnp.asarray(kernel), expected, rtol=1e-12, what="entk ntk without --input2")


# ----------------------------------------------------------------------------------------------
# Subprocesses: 4 forced host devices, SIGKILL + resume, two jax.distributed processes


def test_four_devices_match_plain_kernels(background):
    result = _result(background["devices"])
    assert result["device_count"] == 4
    assert result["mesh_sizes"] == [4], "tiles must be spread over all 4 devices"
    for name, error in result["errors"].items():
        assert error <= 1e-12, f"{name}: relative error {error:.3g}"
    assert set(result["errors"]) >= {"ntk_fn", "ntk_fn_x2_none", "kernel_fn_ntk", "kernel_fn_nngp",
                                     "diagonal", "stax", "compute_kernel_store"}


def test_sigkill_then_resume_is_bit_identical_and_computes_only_missing_tiles(tmp_path):
    killed, clean = str(tmp_path / "killed.zarr"), str(tmp_path / "clean.zarr")
    first_log, second_log = str(tmp_path / "first.log"), str(tmp_path / "second.log")
    victim = _worker(["compute", "--store", killed, "--log", first_log], 4,
                     ENTK_TEST_TILE_SLEEP="0.4")
    deadline = time.time() + SUBPROCESS_TIMEOUT
    markers_dir = os.path.join(killed, "tiles_done")
    while time.time() < deadline and victim.poll() is None:
        if os.path.isdir(markers_dir) and len(_markers(killed)) >= 4:
            break
        time.sleep(0.02)
    assert victim.poll() is None, f"worker ended before it could be killed:\n{victim.communicate()}"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    finished = _markers(killed)
    assert 4 <= len(finished) < len(ALL_TILES), f"killed midway, {len(finished)} tiles stored"
    assert set(_logged_tiles(first_log)) <= finished

    resumed = _result(_worker(["compute", "--store", killed, "--store", clean, "--log", second_log],
                              4, ENTK_TEST_TILE_SLEEP="0"))
    resumed_tiles = _logged_tiles(second_log, killed)
    assert sorted(resumed_tiles) == sorted(ALL_TILES - finished), "only unfinished tiles recomputed"
    assert sorted(_logged_tiles(second_log, clean)) == sorted(ALL_TILES)
    a = np.asarray(zarr.open_group(killed, mode="r")["kernel"])
    b = np.asarray(zarr.open_group(clean, mode="r")["kernel"])
    assert not np.isnan(a).any()
    np.testing.assert_array_equal(a, b)  # bit-identical to the uninterrupted run
    assert resumed["digests"][0] == resumed["digests"][1]


def test_two_distributed_processes_share_one_store(background):
    results = [_result(p) for p in background["distributed"]]
    assert sorted(r["process_index"] for r in results) == [0, 1]
    assert all(r["process_count"] == 2 for r in results)
    assert results[0]["digest"] == results[1]["digest"], "both processes read the same kernel"
    for r in results:
        assert r["error"] <= 1e-12, f"process {r['process_index']}: error {r['error']:.3g}"
    tiles = [set(_logged_tiles(str(background["tmp"] / f"dist{i}.log"))) for i in range(2)]
    assert tiles[0] and tiles[1], "each process computes a share"
    assert not tiles[0] & tiles[1] and tiles[0] | tiles[1] == ALL_TILES
    assert _markers(background["store"]) == ALL_TILES
