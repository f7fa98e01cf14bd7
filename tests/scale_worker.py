"""Subprocess side of tests/test_scale.py: runs with forced host devices or under jax.distributed.

XLA_FLAGS=--xla_force_host_platform_device_count=N must be set before JAX starts, so the multi-device,
SIGKILL and two-process checks run this script in fresh interpreters. Each command prints one JSON
line (prefixed with "RESULT ") that the test reads; tiles are logged at DEBUG level to `--log`, one
"tile <name> computed" line per tile, which is how the tests count what each run computed.

    python tests/scale_worker.py devices
    python tests/scale_worker.py compute --store A [--store B ...] --log FILE
    python tests/scale_worker.py distributed --process-id I --processes P --port PORT \
        --store S --log F

Also the model spec of the CLI test: `tests.scale_worker:mlp_model`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import entk  # noqa: E402
from tests import jax_models  # noqa: E402
from tests.reference import brute_force_ntk as _brute_force_ntk  # noqa: E402

N1, N2, TILE = 37, 29, 8  # 5 x 4 = 20 tiles, ragged on both sides


def make_case(name: str, n1: int, n2: int, seed: int = 0):
    """`(f, params, x1, x2)` for `jax_models` architecture `name`, float64, drawn with NumPy.

    The model function and parameter shapes are `jax_models`'; the values come from NumPy rather
    than `jax.random`, whose draws take about a second of compilation each on CPU, which would
    dominate these tests' run time.
    """
    built = {}

    def shapes(key):
        f, params, shape, kind = jax_models.ZOO[name](jax.random.split(key, 8))
        built.update(f=f, shape=shape, kind=kind)  # f closes over no traced value
        return params

    param_shapes = jax.eval_shape(shapes, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype), param_shapes)
    if built["kind"] == "int":
        x1, x2 = (jnp.asarray(rng.integers(0, 7, (n,) + built["shape"])) for n in (n1, n2))
    else:
        x1, x2 = (jnp.asarray(rng.standard_normal((n,) + built["shape"])) for n in (n1, n2))
    return built["f"], params, x1, x2


def case():
    """The zoo MLP (float64) on 37 and 29 examples."""
    return make_case("mlp", N1, N2)


def mlp_model():
    """`(f, params)` for the CLI test (`entk ntk tests.scale_worker:mlp_model ...`)."""
    f, params, _, _ = case()
    return f, params


def slow_ntk_fn(f):
    """The NTK with a host callback that sleeps ENTK_TEST_TILE_SLEEP seconds per tile.

    The sleep length is read when the callback runs, so every run traces the same kernel (and the
    store's fingerprint matches) whatever the sleep; the result is the NTK, bit for bit.
    """
    ntk_fn = entk.empirical_ntk_fn(f, implementation="jc")

    def pause():
        time.sleep(float(os.environ.get("ENTK_TEST_TILE_SLEEP", "0")))

    def kernel(x1, x2, params):
        jax.debug.callback(pause)
        return ntk_fn(x1, x2, params)

    return kernel


def brute_force_ntk(f, x1, x2, params, trace_axes=(-1,), diagonal_axes=()):
    """tests.reference.brute_force_ntk, compiled (eager Jacobians are slow)."""
    return jax.jit(lambda a, b, p: _brute_force_ntk(f, a, b, p, trace_axes, diagonal_axes))(
        x1, x2, params)


def digest(array) -> str:
    a = np.ascontiguousarray(np.asarray(array))
    return hashlib.sha256(a.tobytes()).hexdigest()


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-300))


def log_tiles_to(path: str) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("entk.scale")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


def report(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def devices_check() -> None:
    """Batched / sharded kernels on 4 devices against the plain kernel and a brute-force NTK."""
    from entk import stax
    from entk.scale import sharding

    f, params, x1, x2 = case()
    ntk_fn = entk.empirical_ntk_fn(f, implementation="jc")
    errors = {}
    reference = brute_force_ntk(f, x1, x2, params)
    errors["ntk_fn"] = relative_error(entk.batch(ntk_fn, TILE)(x1, x2, params), reference)
    errors["ntk_fn_rect_tiles"] = relative_error(
        entk.batch(ntk_fn, (5, 7))(x1, x2, params), reference)
    errors["ntk_fn_x2_none"] = relative_error(
        entk.batch(ntk_fn, TILE)(x1, None, params), brute_force_ntk(f, x1, None, params))

    kernel_fn = entk.empirical_kernel_fn(f, implementation="jc")
    both = entk.batch(kernel_fn, TILE)(x1, x2, ("nngp", "ntk"), params)
    plain = kernel_fn(x1, x2, ("nngp", "ntk"), params)
    errors["kernel_fn_ntk"] = relative_error(both.ntk, reference)
    errors["kernel_fn_nngp"] = relative_error(both.nngp, plain.nngp)

    diagonal_fn = entk.empirical_ntk_fn(f, trace_axes=(), diagonal_axes=(0,), implementation="jc")
    x1_other = x1[::-1]
    errors["diagonal"] = relative_error(
        entk.batch(diagonal_fn, TILE)(x1, x1_other, params),
        brute_force_ntk(f, x1, x1_other, params, trace_axes=(), diagonal_axes=(0,)))

    _, _, stax_fn = stax.serial(stax.Dense(8), stax.Relu(), stax.Dense(1))
    errors["stax"] = relative_error(entk.batch(stax_fn, TILE)(x1, x2, "ntk"),
                                    stax_fn(x1, x2, "ntk"))

    stored = entk.compute_kernel(ntk_fn, x1, x2, params, tile=TILE, progress=False,
                                 store=os.path.join(os.environ["ENTK_TEST_TMP"], "devices.zarr"))
    errors["compute_kernel_store"] = relative_error(stored, reference)

    meshes = {len(mesh.devices.ravel()) for cache in sharding._STEPS.values()
              for _, mesh in cache.values()}
    report({"device_count": jax.local_device_count(), "mesh_sizes": sorted(meshes),
            "errors": errors})


def compute(stores: list[str], log: str) -> None:
    """compute_kernel of the slow NTK into each store in turn (resuming whatever is there)."""
    f, params, x1, x2 = case()
    kernel = slow_ntk_fn(f)
    log_tiles_to(log)
    digests = []
    for store in stores:
        result = entk.compute_kernel(kernel, x1, x2, params, store=store, tile=TILE, progress=False)
        digests.append(digest(result))
    report({"digests": digests, "device_count": jax.local_device_count()})


def distributed(process_id: int, processes: int, port: int, store: str, log: str) -> None:
    """One of `processes` jax.distributed processes computing the NTK into a shared store."""
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=processes,
                               process_id=process_id, initialization_timeout=120)
    f, params, x1, x2 = case()
    log_tiles_to(log)
    ntk_fn = entk.empirical_ntk_fn(f, implementation="jc")
    result = entk.compute_kernel(ntk_fn, x1, x2, params, store=store, tile=TILE, progress=False)
    error = relative_error(result, brute_force_ntk(f, x1, x2, params))
    report({"process_index": jax.process_index(), "process_count": jax.process_count(),
            "digest": digest(result), "error": error})
    jax.distributed.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("devices")
    p = sub.add_parser("compute")
    p.add_argument("--store", action="append", required=True)
    p.add_argument("--log", required=True)
    p = sub.add_parser("distributed")
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--log", required=True)
    args = parser.parse_args()
    if args.command == "devices":
        devices_check()
    elif args.command == "compute":
        compute(args.store, args.log)
    else:
        distributed(args.process_id, args.processes, args.port, args.store, args.log)


if __name__ == "__main__":
    main()
