"""Does the cost model predict time? Predicted vs measured time of every strategy on held-out models.

    python -m benchmarks.cost_validation [--repeats 5] [--out benchmarks/results/cost_validation.md]
    python -m benchmarks.cost_validation --zoo tuned --out benchmarks/results/cost_validation_tuned.md

Eight small models built from `benchmarks/zoo.py` at sizes and settings that `benchmarks/auto_regret.py`
(the zoo the cost model's constant FUSED_BYTES_FRACTION was chosen on) does not use: MLPs, CNNs (pooled,
unpooled, depthwise) and attention blocks, float32, `vmap_axes=0`. For each case and strategy: the
cost model's prediction from one fresh calibration, then the jit-compiled kernel's median time after a
warm-up. Two predictions from the same calibration and the same lowered program:

    single rate    all FLOPs at the matmul rate (the model before the per-primitive table)
    per primitive  matmul / conv / conv weight-gradient / other FLOPs each at its measured rate
    per primitive, fused bytes
                   the same, but the elementwise work priced by the program's lowered bytes at
                   the rate a fused elementwise chain runs them (not the memory-stream rate)

`--zoo tuned` runs the same comparison on `benchmarks/auto_regret.py`'s cases instead (the zoo the
constants were chosen on), so both zoos can be reported side by side.

Reported: the median of predicted / measured and its spread (the geometric standard deviation, and
the 10th-90th percentile range), and in how many cases each model ranks the fastest strategy first.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import jax
import numpy as np

from benchmarks import zoo
from entk.algorithms import concrete_strategies, cost, device
from entk.empirical import empirical_ntk_fn

CASES = [  # name, builder, kwargs, N, traced -- none of these is in benchmarks/auto_regret.py
    ("mlp w128 d3 N=8 O=10 full", zoo.mlp, {"outputs": 10, "width": 128, "depth": 3,
                                            "input_size": 64}, 8, False),
    ("mlp w256 d1 N=16 O=5 traced", zoo.mlp, {"outputs": 5, "width": 256, "depth": 1,
                                              "input_size": 128}, 16, True),
    ("cnn-pool c8 12px N=8 O=10 full", zoo.cnn, {"outputs": 10, "channels": 8, "size": 12}, 8, False),
    ("cnn-nopool c16 8px N=16 O=1", zoo.cnn, {"outputs": 1, "channels": 16, "size": 8,
                                             "pool": False}, 16, True),
    ("depthwise c16 12px N=4 O=10 full", zoo.cnn, {"outputs": 10, "channels": 16, "size": 12,
                                                   "depthwise": True}, 4, False),
    ("attention t8 w32 N=4 O=10 full", zoo.transformer, {"outputs": 10, "tokens": 8, "width": 32,
                                                         "heads": 2}, 4, False),
    ("attention t12 w48 N=8 O=10 traced", zoo.transformer, {"outputs": 10, "tokens": 12,
                                                            "width": 48}, 8, True),
    ("embedding v200 t8 w32 N=8 O=5 traced", zoo.transformer, {"outputs": 5, "tokens": 8,
                                                               "width": 32, "vocab": 200}, 8, True),
    ("mlp w512 d2 N=4 O=20 full", zoo.mlp, {"outputs": 20, "width": 512, "depth": 2,
                                            "input_size": 32}, 4, False),
    ("cnn-pool c32 16px N=4 O=1", zoo.cnn, {"outputs": 1, "channels": 32, "size": 16}, 4, True),
    ("cnn-nopool c8 16px N=8 O=10 traced", zoo.cnn, {"outputs": 10, "channels": 8, "size": 16,
                                                     "pool": False}, 8, True),
    ("attention t16 w64 N=2 O=10 full", zoo.transformer, {"outputs": 10, "tokens": 16,
                                                          "width": 64}, 2, False),
]


def single_rate_prediction(est: cost.Estimate, cal: device.Calibration, itemsize: int) -> float:
    """The previous model: every FLOP at the matmul rate, the rest as in `cost.predict_seconds`."""
    flops = sum(est.flops_by_class.values())
    return (flops / cal.flop_rate(itemsize, "dot")
            + cost.FUSED_BYTES_FRACTION * est.bytes_accessed / cal.bytes_per_s
            + est.n_ops * cal.op_overhead_s + cal.overhead_s)


def fused_bytes_prediction(est: cost.Estimate, cal: device.Calibration, itemsize: int) -> float:
    """Matmul / conv / conv-wgrad FLOPs at their rates; the elementwise work priced by its lowered
    bytes at the rate a fused elementwise chain runs them (`Calibration.fused_bytes_per_s`)."""
    c = est.flops_by_class
    compute = sum(c[k] / cal.flop_rate(itemsize, k) for k in ("dot", "conv", "conv_wgrad"))
    return (compute + est.bytes_accessed / cal.fused_bytes_per_s + est.n_ops * cal.op_overhead_s
            + cal.overhead_s)


def run_case(builder, kwargs, n, traced, repeats, cal):
    f, params, x = builder(n, **kwargs)
    ntk_kwargs = {"trace_axes": (-1,) if traced else (), "diagonal_axes": (), "vmap_axes": 0}
    itemsize = cost._itemsize(params)
    rows = {}
    for s in concrete_strategies():
        try:
            est = cost.estimate(f, x, None, params, {}, s, ntk_kwargs, cal=cal)
            compiled = jax.jit(empirical_ntk_fn(f, implementation=s, **ntk_kwargs)).lower(
                x, None, params).compile()
        except Exception as error:  # noqa: BLE001 - reported, not fatal
            print(f"  {s.short_name}: {type(error).__name__}: {error}"[:200])
            continue
        jax.block_until_ready(compiled(x, None, params))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(x, None, params))
            times.append(time.perf_counter() - start)
        rows[s.short_name] = {"measured_s": float(np.median(times)),
                              "per_primitive_s": est.predicted_s,
                              "single_rate_s": single_rate_prediction(est, cal, itemsize),
                              "fused_bytes_s": fused_bytes_prediction(est, cal, itemsize),
                              "flops_by_class": est.flops_by_class,
                              "bytes_accessed": est.bytes_accessed, "n_ops": est.n_ops}
    return rows


def _stats(ratios: list[float]) -> dict:
    logs = np.log(ratios)
    return {"median": float(np.exp(np.median(logs))), "geo_sd": float(np.exp(np.std(logs))),
            "p10": float(np.exp(np.percentile(logs, 10))),
            "p90": float(np.exp(np.percentile(logs, 90)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--zoo", choices=("held-out", "tuned"), default="held-out",
                        help="held-out: CASES here; tuned: benchmarks/auto_regret.py's cases")
    parser.add_argument("--out", default="benchmarks/results/cost_validation.md")
    args = parser.parse_args()
    cal = device.calibration(refresh=True)
    print(cal.summary(), flush=True)
    results = {}
    if args.zoo == "tuned":
        from benchmarks.auto_regret import CASES as cases
    else:
        cases = CASES
    for name, builder, kwargs, n, traced in cases:
        results[name] = run_case(builder, kwargs, n, traced, args.repeats, cal)
        print(name, json.dumps({s: {k: r[k] for k in ("measured_s", "single_rate_s",
                                                       "per_primitive_s", "fused_bytes_s")}
                                for s, r in results[name].items()}), flush=True)

    models = {"single rate": "single_rate_s", "per primitive": "per_primitive_s",
              "per primitive, fused bytes": "fused_bytes_s"}
    stats, ranked = {}, {}
    for label, field in models.items():
        ratios = [r[field] / r["measured_s"] for case in results.values() for r in case.values()]
        stats[label] = _stats(ratios)
        ranked[label] = sum(1 for case in results.values() if case and
                            min(case, key=lambda s: case[s][field])
                            == min(case, key=lambda s: case[s]["measured_s"]))
    lines = [f"# Cost model: predicted vs measured time ({jax.devices()[0].device_kind}, "
             f"jax {jax.__version__})", "",
             ("Held-out cases (not in `benchmarks/auto_regret.py`)" if args.zoo == "held-out" else
              "The cases of `benchmarks/auto_regret.py` (the zoo the constants were chosen on)")
             + f", float32, vmap_axes=0; median of {args.repeats} runs after warm-up. Reproduce: "
             f"`python -m benchmarks.cost_validation --zoo {args.zoo}`.",
             "", f"Calibration used: {cal.summary()}", "",
             "| case | strategy | measured ms | single-rate ms | per-primitive ms | "
             "per-primitive, fused bytes ms | matmul / conv / conv-wgrad / other MFLOP |",
             "|---|---|---|---|---|---|---|"]
    for name, case in results.items():
        for s, r in case.items():
            c = r["flops_by_class"]
            split = " / ".join(f"{c.get(k, 0) / 1e6:.3g}" for k in
                               ("dot", "conv", "conv_wgrad", "elementwise"))
            lines.append(f"| {name} | {s} | {r['measured_s'] * 1e3:.3g} | "
                         f"{r['single_rate_s'] * 1e3:.3g} | {r['per_primitive_s'] * 1e3:.3g} | "
                         f"{r['fused_bytes_s'] * 1e3:.3g} | {split} |")
    n_pairs = sum(len(c) for c in results.values())
    lines += ["", f"Predicted / measured over {n_pairs} (case, strategy) pairs; the spread is the "
              "geometric standard deviation (1.0 = every prediction off by the same factor) and the "
              "10th-90th percentile of the ratio; 'fastest first' counts the cases where the model "
              "ranks the measured-fastest strategy first.", "",
              "| model | median ratio | geometric SD | p10 - p90 | fastest first |",
              "|---|---|---|---|---|"]
    for label in models:
        st = stats[label]
        lines.append(f"| {label} | {st['median']:.3g} | {st['geo_sd']:.3g} | {st['p10']:.3g} - "
                     f"{st['p90']:.3g} | {ranked[label]}/{len(results)} |")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"calibration": cal.summary(), "cases": results, "stats": stats, "fastest_first": ranked},
        indent=1, default=lambda v: v if math.isfinite(v) else None))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
