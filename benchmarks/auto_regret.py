"""How good is `implementation="auto"`? Every strategy timed on a zoo of cases, auto's pick, its regret.

    python -m benchmarks.auto_regret [--quick] [--out benchmarks/results/auto.md]
    python -m benchmarks.auto_regret --zoo held-out --out benchmarks/results/auto_held_out.md

`--zoo tuned` (default): the cases below, on which the cost model's rules and thresholds were tuned.
`--zoo held-out`: `benchmarks/cost_validation.py`'s cases, which share none of them, to check auto on
models it was not tuned on. Run it with a fresh `ENTK_CACHE_DIR` so auto decides (calibration
included) instead of reading decisions cached by earlier runs.

Per case and strategy: jit-compiled kernel, one warm-up, median of `--repeats` runs (steady state,
compile time apart). Regret = time of auto's pick / time of the fastest strategy. Strategies are run
in alternating order across repeats so a noisy machine biases none of them.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import numpy as np

from benchmarks import zoo
from entk.algorithms import concrete_strategies, cost
from entk.empirical import empirical_ntk_fn

CASES = [  # name, builder, kwargs, N, traced
    ("mlp-wide N=8 O=10 full", zoo.mlp, {"outputs": 10}, 8, False),
    ("mlp-wide N=32 O=10 traced", zoo.mlp, {"outputs": 10}, 32, True),
    ("mlp-wide N=1 O=1", zoo.mlp, {"outputs": 1}, 1, True),
    ("mlp-deep N=8 O=100 full", zoo.mlp, {"outputs": 100, "width": 64, "depth": 8}, 8, False),
    ("mlp-deep N=32 O=1", zoo.mlp, {"outputs": 1, "width": 64, "depth": 8}, 32, True),
    ("cnn-pool N=8 O=10 traced", zoo.cnn, {"outputs": 10}, 8, True),
    ("cnn-pool N=16 O=10 full", zoo.cnn, {"outputs": 10}, 16, False),
    ("cnn-nopool N=8 O=10 full", zoo.cnn, {"outputs": 10, "pool": False}, 8, False),
    ("cnn-nopool N=32 O=1", zoo.cnn, {"outputs": 1, "pool": False, "channels": 16}, 32, True),
    ("depthwise N=8 O=10 full", zoo.cnn, {"outputs": 10, "depthwise": True}, 8, False),
    ("cnn-pool N=1 O=100 full", zoo.cnn, {"outputs": 100, "channels": 16}, 1, False),
    ("attention N=8 O=10 traced", zoo.transformer, {"outputs": 10}, 8, True),
    ("attention N=1 O=100 full", zoo.transformer, {"outputs": 100}, 1, False),
    ("embedding N=32 O=10 traced", zoo.transformer, {"outputs": 10, "vocab": 1000}, 32, True),
    ("embedding N=8 O=100 full", zoo.transformer, {"outputs": 100, "vocab": 1000}, 8, False),
]


def run_case(builder, kwargs, n, traced, repeats):
    f, params, x = builder(n, **kwargs)
    ntk_kwargs = {"trace_axes": (-1,) if traced else (), "diagonal_axes": (), "vmap_axes": 0}
    strategies = concrete_strategies()
    compiled, compile_s = {}, {}
    for s in strategies:
        start = time.perf_counter()
        fn = jax.jit(empirical_ntk_fn(f, implementation=s, **ntk_kwargs))
        compiled[s] = fn.lower(x, None, params).compile()
        compile_s[s] = time.perf_counter() - start
        jax.block_until_ready(compiled[s](x, None, params))  # warm-up
    times = {s: [] for s in strategies}
    for r in range(repeats):
        order = strategies if r % 2 == 0 else strategies[::-1]
        for s in order:
            start = time.perf_counter()
            jax.block_until_ready(compiled[s](x, None, params))
            times[s].append(time.perf_counter() - start)
    median = {s: float(np.median(t)) for s, t in times.items()}
    start = time.perf_counter()
    pick = cost.select(f, x, None, params, {}, ntk_kwargs, capabilities={"jc", "ntvp", "sd"})
    select_s = time.perf_counter() - start
    best = min(median, key=median.get)
    return {"times": {s.short_name: t for s, t in median.items()},
            "compile_s": {s.short_name: t for s, t in compile_s.items()},
            "auto": pick.short_name, "fastest": best.short_name,
            "regret": median[pick] / median[best], "auto_overhead_s": select_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="first 6 cases only")
    parser.add_argument("--zoo", choices=("tuned", "held-out"), default="tuned")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/auto.md")
    args = parser.parse_args()
    if args.zoo == "held-out":
        from benchmarks.cost_validation import CASES as cases
    else:
        cases = CASES
    cases = cases[:6] if args.quick else cases
    results = {}
    for name, builder, kwargs, n, traced in cases:
        results[name] = run_case(builder, kwargs, n, traced, args.repeats)
        print(name, json.dumps(results[name]), flush=True)
    names = sorted({s for r in results.values() for s in r["times"]})
    lines = [f"# auto's regret, {args.zoo} zoo ({jax.devices()[0].device_kind}, "
             f"jax {jax.__version__})", "",
             "Median of %d runs after warm-up, float32, vmap_axes=0. Regret = time of auto's pick / "
             "time of the fastest. Reproduce: `python -m benchmarks.auto_regret --zoo %s`."
             % (args.repeats, args.zoo), "",
             "Auto's overhead: the cold decision (lowering every strategy; compiling and timing the "
             "two best when their predictions are within cost.MEASURE_WITHIN and cheap), in units of "
             "one compilation of the strategy it picked (budget: 2).", "",
             "| case | " + " | ".join(f"{s} ms" for s in names)
             + " | auto | fastest | regret | auto overhead s | overhead / compile of pick |",
             "|---|" + "---|" * (len(names) + 5)]
    for name, r in results.items():
        cells = [f"{r['times'][s] * 1e3:.3g}" if s in r["times"] else "-" for s in names]
        overhead = r["auto_overhead_s"] / r["compile_s"][r["auto"]]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {r['auto']} | {r['fastest']} | {r['regret']:.2f} | "
                       f"{r['auto_overhead_s']:.2f} | {overhead:.2f} |")
    regrets = [r["regret"] for r in results.values()]
    within = sum(1 for g in regrets if g <= 1.10)
    lines += ["", f"Regret ≤ 1.10 in {within}/{len(regrets)} cases "
              f"({100 * within / len(regrets):.0f}%); worst {max(regrets):.2f}; "
              f"median auto overhead (first decision, cold) "
              f"{np.median([r['auto_overhead_s'] for r in results.values()]):.2f} s, at most "
              f"{max(r['auto_overhead_s'] / r['compile_s'][r['auto']] for r in results.values()):.2f} "
              f"compilations of the pick."]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
