"""Times the three eNTK strategies (JC, NTVP, SD) on three reference models.

Each strategy's kernel function is `jax.jit`-compiled once (compile time reported apart), then run
`--repeats` times; the median wall time of those steady-state runs is reported, with XLA's FLOP count
(`jax.jit(fn).lower(...).cost_analysis()["flops"]`) and the compiled program's temporary memory
(`.compile().memory_analysis().temp_size_in_bytes`). Each kernel's largest relative difference to JC's
is printed as a sanity check.

Models (float32, as one would run them):
- mlp: 256-512-512-10 ReLU MLP, N=32 inputs, full kernel (trace_axes=()) — the figure of the issue;
- cnn: two 3x3 SAME convs with 32 channels on 16x16x3 inputs, ReLU, flatten, dense to O=10, N=16;
- transformer: token embedding (vocabulary 1000, width 64) + one pre-LN block (4-head attention,
  GELU MLP of width 256) + mean-pool readout to O=10, sequences of 16 tokens, N=8.

Usage:
    python benchmarks/bench_strategies.py                       # all models, vmap_axes=0
    python benchmarks/bench_strategies.py --models mlp --vmap none both --repeats 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import entk  # noqa: E402

DTYPE = jnp.float32


def _normal(key: jax.Array, shape: tuple, scale: float = 1.0) -> jax.Array:
    return scale * jax.random.normal(key, shape, DTYPE)


def _dense(key: jax.Array, n_in: int, n_out: int) -> dict:
    k1, k2 = jax.random.split(key)
    return {"w": _normal(k1, (n_in, n_out), n_in ** -0.5), "b": _normal(k2, (n_out,), 0.1)}


def _apply_dense(p: dict, x: jax.Array) -> jax.Array:
    return x @ p["w"] + p["b"]


def mlp_model(key: jax.Array) -> tuple[Callable, Any, jax.Array, dict]:
    widths = (256, 512, 512, 10)
    keys = jax.random.split(key, len(widths))
    params = [_dense(k, a, b) for k, a, b in zip(keys, widths[:-1], widths[1:])]

    def f(p, x):
        for layer in p[:-1]:
            x = jax.nn.relu(_apply_dense(layer, x))
        return _apply_dense(p[-1], x)

    return f, params, _normal(keys[-1], (32, 256)), {"trace_axes": ()}


def cnn_model(key: jax.Array) -> tuple[Callable, Any, jax.Array, dict]:
    keys = jax.random.split(key, 4)
    params = {"c1": _normal(keys[0], (3, 3, 3, 32), (27) ** -0.5),
              "c2": _normal(keys[1], (3, 3, 32, 32), (288) ** -0.5),
              "out": _dense(keys[2], 16 * 16 * 32, 10)}
    dims = ("NHWC", "HWIO", "NHWC")

    def f(p, x):
        y = jax.nn.relu(lax.conv_general_dilated(x, p["c1"], (1, 1), "SAME", dimension_numbers=dims))
        y = jax.nn.relu(lax.conv_general_dilated(y, p["c2"], (1, 1), "SAME", dimension_numbers=dims))
        return _apply_dense(p["out"], y.reshape(y.shape[0], -1))

    return f, params, _normal(keys[3], (16, 16, 16, 3)), {"trace_axes": ()}


def transformer_model(key: jax.Array) -> tuple[Callable, Any, jax.Array, dict]:
    vocab, d, heads, t, hidden, n = 1000, 64, 4, 16, 256, 8
    ks = jax.random.split(key, 10)

    def ln_params(k):
        return {"scale": jnp.ones((d,), DTYPE), "bias": _normal(k, (d,), 0.1)}

    params = {"emb": _normal(ks[0], (vocab, d)), "pos": _normal(ks[1], (t, d), 0.1),
              "ln1": ln_params(ks[2]), "qkv": _normal(ks[3], (d, 3 * d), d ** -0.5),
              "o": _dense(ks[4], d, d), "ln2": ln_params(ks[5]), "m1": _dense(ks[6], d, hidden),
              "m2": _dense(ks[7], hidden, d), "out": _dense(ks[8], d, 10)}

    def layer_norm(p, x):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) * lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]

    def f(p, x):
        b = x.shape[0]
        h = p["emb"][x] + p["pos"]
        q, k, v = jnp.split(layer_norm(p["ln1"], h) @ p["qkv"], 3, axis=-1)
        q, k, v = (a.reshape(b, t, heads, d // heads) for a in (q, k, v))
        att = jax.nn.softmax(jnp.einsum("nthd,nshd->nhts", q, k) / np.sqrt(d // heads), axis=-1)
        h = h + _apply_dense(p["o"], jnp.einsum("nhts,nshd->nthd", att, v).reshape(b, t, d))
        h = h + _apply_dense(p["m2"], jax.nn.gelu(_apply_dense(p["m1"], layer_norm(p["ln2"], h))))
        return _apply_dense(p["out"], h.mean(1))

    x = jax.random.randint(ks[9], (n, t), 0, vocab)
    return f, params, x, {"trace_axes": ()}


MODELS = {"mlp": mlp_model, "cnn": cnn_model, "transformer": transformer_model}
STRATEGIES = ("jc", "ntvp", "sd")


def _measure(fn: Callable, args: tuple, repeats: int) -> dict:
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    cost = lowered.cost_analysis() or {}
    memory = compiled.memory_analysis()
    out = jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return {"time": statistics.median(times), "compile": compile_s,
            "flops": float(cost.get("flops", float("nan"))),
            "temp": getattr(memory, "temp_size_in_bytes", float("nan")), "out": out}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run(models: list[str], vmaps: list[Any], repeats: int, strategies: tuple[str, ...]) -> None:
    print(f"jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} CPUs, "
          f"median of {repeats} runs")
    header = (f"{'model':<12}{'vmap':<6}{'strategy':<9}{'time (ms)':>11}{'vs JC':>8}"
              f"{'compile (s)':>13}{'GFLOP':>10}{'temp mem':>12}  max rel. diff to JC")
    print(header)
    print("-" * len(header))
    for name in models:
        f, params, x, kw = MODELS[name](jax.random.PRNGKey(0))
        for vmap in vmaps:
            results = {}
            for s in strategies:
                ntk_fn = entk.empirical_ntk_fn(f, vmap_axes=vmap, implementation=s, **kw)
                results[s] = _measure(lambda x, p: ntk_fn(x, None, p), (x, params), repeats)
            ref = results.get("jc", next(iter(results.values())))["out"]
            for s, r in results.items():
                diff = float(jnp.max(jnp.abs(r["out"] - ref)) / jnp.max(jnp.abs(ref)))
                speedup = results["jc"]["time"] / r["time"] if "jc" in results else float("nan")
                print(f"{name:<12}{str(vmap):<6}{s:<9}{1e3 * r['time']:>11.2f}{speedup:>7.1f}x"
                      f"{r['compile']:>13.2f}{r['flops'] / 1e9:>10.3f}{_fmt_bytes(r['temp']):>12}"
                      f"  {diff:.1e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--vmap", nargs="+", default=["0"], choices=["0", "none"],
                        help="vmap_axes values to run (0: per-example, none: whole batches)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    vmaps = [None if v == "none" else int(v) for v in args.vmap]
    run(args.models, vmaps, args.repeats, tuple(args.strategies))


if __name__ == "__main__":
    main()
