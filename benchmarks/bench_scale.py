"""Benchmarks for entk.scale: throughput against device count, and a large NTK into a store.

    # kernel entries/s of entk.batch with 1, 2, 4 forced host devices (one subprocess each)
    nice -n 19 python benchmarks/bench_scale.py throughput [--n 512 --tile 64 --width 128]

    # the traced NTK of a 3×512 MLP on N examples into a zarr store (resumable: rerun to continue)
    nice -n 19 python benchmarks/bench_scale.py store --n 20000 --implementation sd \
        --store /tmp/mlp20k.zarr [--symmetric]

Forced host devices (XLA_FLAGS=--xla_force_host_platform_device_count=D) split the CPU into D
devices; they share the machine's cores, so on a 2-core machine more than 2 devices cannot add
compute, and XLA's intra-op threads already use both cores with one device. The figures measure
what entk.scale's sharding costs or gains on the machine at hand. Results are printed as JSON (and
written to --out when given).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def mlp(width: int, depth: int, d_in: int, d_out: int, seed: int = 0):
    """`(f, params)`: a ReLU MLP with `depth` hidden layers of `width` (float32, 1/√fan-in weights)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    dims = [d_in] + [width] * depth + [d_out]
    params = [{"w": jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), jnp.float32),
               "b": jnp.zeros((b,), jnp.float32)} for a, b in zip(dims[:-1], dims[1:])]

    def f(p, x):
        for layer in p[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        return x @ p[-1]["w"] + p[-1]["b"]

    return f, params


def _inputs(n: int, d_in: int, seed: int = 1):
    import numpy as np

    return np.random.default_rng(seed).standard_normal((n, d_in)).astype(np.float32)


def throughput_worker(args: argparse.Namespace) -> dict:
    """Runs in a subprocess with the forced device count: steady-state entries/s of entk.batch."""
    import jax

    import entk

    f, params = mlp(args.width, args.depth, args.d_in, args.d_out)
    x = _inputs(args.n, args.d_in)
    ntk_fn = entk.empirical_ntk_fn(f, vmap_axes=0, implementation=args.implementation)
    batched = entk.batch(ntk_fn, args.tile)
    devices = jax.local_device_count()
    warm = x[:args.tile * devices]
    batched(warm, warm, params).block_until_ready()  # compiles the step (same tile shapes)
    start = time.perf_counter()
    kernel = batched(x, x, params)
    kernel.block_until_ready()
    seconds = time.perf_counter() - start
    return {"devices": devices, "n": args.n, "tile": args.tile, "seconds": seconds,
            "entries_per_s": args.n * args.n / seconds}


def throughput(args: argparse.Namespace) -> dict:
    """One subprocess per device count; returns the table."""
    rows = []
    for devices in args.devices:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JAX_PLATFORMS="cpu",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        command = [sys.executable, os.path.abspath(__file__), "_throughput_worker",
                   "--n", str(args.n), "--tile", str(args.tile), "--width", str(args.width),
                   "--depth", str(args.depth), "--d-in", str(args.d_in), "--d-out", str(args.d_out),
                   "--implementation", args.implementation]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['devices']} device(s): {row['entries_per_s']:,.0f} entries/s "
              f"({row['n']}² entries in {row['seconds']:.2f} s, tiles of {row['tile']})", flush=True)
    return {"benchmark": "throughput", "model": f"MLP {args.depth}x{args.width}, d_in={args.d_in}, "
            f"{args.d_out} outputs, traced, float32, vmap_axes=0, {args.implementation}",
            "rows": rows}


def store(args: argparse.Namespace) -> dict:
    """The traced NTK of the MLP on `--n` examples into `--store`, with progress; resumable."""
    import numpy as np

    import entk

    f, params = mlp(args.width, args.depth, args.d_in, args.d_out)
    x = _inputs(args.n, args.d_in)
    ntk_fn = entk.empirical_ntk_fn(f, vmap_axes=0, implementation=args.implementation)
    tile = args.tile if args.tile == "auto" else int(args.tile)
    start = time.perf_counter()
    kernel = entk.compute_kernel(ntk_fn, x, None, params, store=args.store, tile=tile,
                                 progress=True, symmetric=args.symmetric)
    seconds = time.perf_counter() - start
    sample = np.asarray(kernel[: min(args.n, 64), : min(args.n, 64)])
    return {"benchmark": "store", "model": f"MLP {args.depth}x{args.width}, d_in={args.d_in}, "
            f"{args.d_out} outputs, traced, float32, vmap_axes=0, {args.implementation}",
            "n": args.n, "symmetric": args.symmetric, "store": args.store,
            "chunks": list(kernel.chunks),
            "seconds_this_run": seconds, "finite": bool(np.isfinite(sample).all()),
            "bytes_on_disk": sum(os.path.getsize(os.path.join(d, name))
                                 for d, _, names in os.walk(args.store) for name in names)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["throughput", "store", "_throughput_worker"])
    parser.add_argument("--n", type=int, default=None,
                        help="examples (default: 512 for throughput, 20000 for store)")
    parser.add_argument("--tile", default=None, help="tile size (default: 64 / auto)")
    parser.add_argument("--devices", type=lambda s: [int(v) for v in s.split(",")],
                        default=[1, 2, 4], help="forced host device counts (default 1,2,4)")
    parser.add_argument("--width", type=int, default=None, help="default: 128 / 512")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--d-in", type=int, default=32)
    parser.add_argument("--d-out", type=int, default=10)
    parser.add_argument("--implementation", default="auto")
    parser.add_argument("--store", default="/tmp/entk_bench_mlp.zarr")
    parser.add_argument("--symmetric", action="store_true",
                        help="store mode: compute the tiles on and above the diagonal only")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args()
    is_store = args.mode == "store"
    args.n = args.n or (20000 if is_store else 512)
    args.width = args.width or (512 if is_store else 128)
    args.tile = args.tile or ("auto" if is_store else "64")
    if args.mode != "store":
        args.tile = int(args.tile)

    if args.mode == "_throughput_worker":
        print(json.dumps(throughput_worker(args)))
        return
    result = throughput(args) if args.mode == "throughput" else store(args)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
