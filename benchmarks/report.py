"""Tables and the plot of a `benchmarks/run.py` report (the dict it also saves as JSON).

    python -m benchmarks.report benchmarks/results/full.json    # rewrites full.md and full.png
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
import sys
from typing import Any

STRATEGIES = ("jc", "ntvp", "sd", "auto")


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e3:.3g}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def _mib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2 ** 20:.0f}"


def _gflop(n: float | None) -> str:
    return "—" if n is None else f"{n / 1e9:.3g}"


def ratio_summary(report: dict) -> dict[str, dict]:
    """Per strategy: how many cases entk was no slower than neural-tangents, and the geometric mean
    and worst of entk time / nt time."""
    summary = {}
    for strategy in STRATEGIES:
        ratios = [case["strategies"][strategy]["entk_over_nt"] for case in report["jax"]
                  if "entk_over_nt" in case["strategies"][strategy]]
        if ratios:
            summary[strategy] = {
                "cases": len(ratios), "no_slower": sum(r <= 1.0 for r in ratios),
                "geomean": math.exp(statistics.fmean(math.log(r) for r in ratios)),
                "worst": max(ratios), "best": min(ratios)}
    return summary


def _summary_lines(report: dict) -> list[str]:
    summary = ratio_summary(report)
    if not summary:
        return []
    lines = ["## entk vs neural-tangents 0.6.5, summary", "",
             "Time ratio entk / neural-tangents per case (below 1: entk faster). Target: ≤ 1.0.", "",
             "| strategy | cases | entk no slower | geometric mean | best | worst | target met |",
             "|---|---|---|---|---|---|---|"]
    for strategy, s in summary.items():
        met = "yes" if s["no_slower"] == s["cases"] else f"**no** ({s['cases'] - s['no_slower']} above 1.0)"
        lines.append(f"| {strategy} | {s['cases']} | {s['no_slower']}/{s['cases']} | "
                     f"{s['geomean']:.2f} | {s['best']:.2f} | {s['worst']:.2f} | {met} |")
    return lines + [""]


def _jax_lines(report: dict) -> list[str]:
    if not report["jax"]:
        return []
    lines = ["## JAX networks, every strategy", "",
             "Times are medians of steady-state calls (ms); compile in s; peak: XLA's compiled "
             "arguments+outputs+temporaries (entk; JAX 0.4.24 reports none on CPU) and the RSS rise of "
             "the first call (MiB); diff: max |Θ − Θ_entk,jc| / max |Θ_entk,jc|.", "",
             "| case | params | strategy | entk ms | nt ms | entk / nt | entk compile s | "
             "nt compile s | entk GFLOP | nt GFLOP | entk XLA peak MiB | RSS rise entk / nt MiB | "
             "diff entk / nt |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in report["jax"]:
        for strategy in STRATEGIES:
            row = case["strategies"][strategy]
            head = f"| {case['case']} | {case['n_params']:,} | {strategy} |"
            if row.get("skipped"):
                lines.append(f"{head} skipped: {row['skipped']} |" + " |" * 10)
                continue
            e, n = row.get("entk", {}), row.get("nt", {})
            errors = "; ".join(f"{k} failed: {v['error'][:120]}" for k, v in (("entk", e), ("nt", n))
                               if "error" in v)
            ratio = f"{row['entk_over_nt']:.2f}" if "entk_over_nt" in row else (errors or "—")
            if row.get("entk_over_nt", 0) > 1.0:
                ratio = f"**{ratio}**"
            if strategy == "auto":
                head = (f"| {case['case']} | {case['n_params']:,} | auto (entk: "
                        f"{e.get('picked', '?')}, nt: {n.get('picked', '?')}) |")
            diffs = " / ".join(f"{t['rel_diff_to_entk_jc']:.0e}" if "rel_diff_to_entk_jc" in t
                               else "—" for t in (e, n))
            lines.append(
                f"{head} {_ms(e.get('median_s'))} | {_ms(n.get('median_s'))} | {ratio} | "
                f"{e.get('compile_s', 0):.2f} | {n.get('compile_s', 0):.2f} | "
                f"{_gflop(e.get('flops'))} | {_gflop(n.get('flops'))} | {_mib(e.get('peak_bytes'))} | "
                f"{_mib(e.get('peak_rss_bytes'))} / {_mib(n.get('peak_rss_bytes'))} | {diffs} |")
    return lines + [""]


def _torch_lines(report: dict) -> list[str]:
    if not report["torch"]:
        return []
    lines = ["## PyTorch models: entk (auto) vs the torch.func tutorial's two methods", "",
             "Full kernel (N, N, O, O), float32. entk: `entk.ntk(module, x, trace_axes=(), "
             "vmap_axes=0)` (module exported to JAX once; compile on the warm-up call, excluded). "
             "(1 run): the warm-up call was slower than the suite's limit, so it is the measurement.", "",
             "| model | params | N | entk s | entk compile s | torch.func JC s | torch.func NTVP s | "
             "faster torch.func / entk | target | met | RSS rise entk / JC / NTVP MiB | diff to JC |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["torch"]:
        t = row["tools"]

        def cell(name: str) -> str:
            return f"{t[name]['median_s']:.4g}" + (" (1 run)" if t[name].get("single_run") else "")

        target = row.get("target")
        met = "—" if target is None else ("yes" if row["speedup"] >= target else "**no**")
        lines.append(
            f"| {row['model']} | {row['n_params']:,} | {row['n']} | {cell('entk')} | "
            f"{t['entk']['compile_s']:.3g} | {cell('func_jc')} | {cell('func_ntvp')} | "
            f"{row['speedup']:.1f}× (vs {row['faster_func']}) | "
            f"{'—' if target is None else f'{target}×'} | {met} | "
            + " / ".join(_mib(t[k]['peak_rss_bytes']) for k in ("entk", "func_jc", "func_ntvp"))
            + f" | {t['entk']['rel_diff_to_func_jc']:.0e} |")
    return lines + [""]


def markdown(report: dict) -> str:
    m = report["machine"]
    versions = f"jax {m['jax']}" + (f", neural-tangents 0.6.5 on jax {m['nt_jax']}"
                                    if "nt_jax" in m else "") + (
        f", torch {m['torch']}" if "torch" in m else "")
    lines = [f"# Benchmark suite `{report['suite']}` ({report['date']})", "",
             f"Command: `{report['command']}`  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['device']}; {versions}; Python "
             f"{m['python']}.  ",
             f"Protocol: per strategy, compile, two untimed calls, then {report['repeats']} timed calls "
             f"alternating between tools and strategies{_fast_rule(report)}; medians. float32, "
             f"vmap_axes=0. Strategies "
             f"entk's cost model predicts slower than {report['max_predicted_s']} s per call are "
             f"skipped for both tools.  ",
             f"Wall time of the whole run: {report.get('wall_s', 0) / 60:.1f} min.", ""]
    lines += _summary_lines(report) + _torch_lines(report) + _jax_lines(report)
    return "\n".join(lines)


def plot(report: dict, path: pathlib.Path) -> None:
    """Left: entk / neural-tangents time per case and strategy (log). Right: entk's speed-up over
    the torch.func tutorial's faster method per PyTorch model, with its target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5), width_ratios=(3, 1))
    cases = [c for c in report["jax"]
             if any("entk_over_nt" in c["strategies"][s] for s in STRATEGIES)]
    width = 0.8 / len(STRATEGIES)
    for i, strategy in enumerate(STRATEGIES):
        xs, ys = [], []
        for j, case in enumerate(cases):
            row = case["strategies"][strategy]
            if "entk_over_nt" in row:
                xs.append(j + (i - 1.5) * width)
                ys.append(row["entk_over_nt"])
        left.bar(xs, ys, width, label=strategy)
    left.axhline(1.0, color="k", lw=0.8)
    left.set_yscale("log")
    left.set_xticks(range(len(cases)), [c["case"] for c in cases], rotation=75, fontsize=7)
    left.set_ylabel("time entk / neural-tangents (lower: entk faster)")
    left.set_title("JAX networks: entk vs neural-tangents 0.6.5")
    left.legend()
    rows = report["torch"]
    if rows:
        labels = [f"{r['model']} N={r['n']}" for r in rows]
        right.bar(range(len(rows)), [r["speedup"] for r in rows], color="tab:green")
        for k, r in enumerate(rows):
            if r.get("target"):
                right.hlines(r["target"], k - 0.4, k + 0.4, colors="r")
        right.set_yscale("log")
        right.set_xticks(range(len(rows)), labels, rotation=45, fontsize=8)
        right.set_ylabel("speed-up over torch.func's faster method (red: target)")
        right.set_title("PyTorch models: entk vs torch.func")
    else:
        right.axis("off")
    fig.suptitle(f"suite {report['suite']}, {report['machine']['cpu']}, "
                 f"{report['machine']['cores']} cores, float32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    for name in (sys.argv[1:] if argv is None else argv):
        path = pathlib.Path(name)
        report = json.loads(path.read_text())
        path.with_suffix(".md").write_text(markdown(report))
        plot(report, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.md')} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()


def _fast_rule(report: dict) -> str:
    """The protocol's extra rounds for fast cases, where the report records them."""
    if "fast_repeats" not in report:
        return ""
    return (f" (at least {report['fast_repeats']} for a case whose calls all take under "
            f"{report['fast_call_s'] * 1e3:.0f} ms)")
