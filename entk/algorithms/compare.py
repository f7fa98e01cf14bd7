"""`entk.compare`: every strategy side by side on one problem: FLOPs, memory, compile and run time."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import numpy as np

from entk.algorithms import Strategy
from entk.algorithms import cost
from entk.model import ALL_STRATEGIES, Model

PyTree = Any

_COLUMNS = ("strategy", "flops", "bytes_accessed", "peak_bytes", "predicted_s", "compile_s", "run_s",
            "status")


@dataclasses.dataclass
class CompareReport:
    """The result of `entk.compare`.

    Attributes:
      rows: one dict per strategy with keys `strategy`, `flops`, `bytes_accessed`, `peak_bytes`,
        `predicted_s`, `compile_s`, `run_s` (`None` when not measured) and `status` (`"ok"`,
        `"over budget"`, or the error that strategy raised).
      auto: the strategy `implementation="auto"` picks for this problem (short name).
      memory_budget: the budget (bytes) auto and the measurements respected.
      device: the device kind the figures come from.
    """

    rows: list[dict]
    auto: str
    memory_budget: int
    device: str

    def to_dict(self) -> dict:
        return {"rows": [dict(r) for r in self.rows], "auto": self.auto,
                "memory_budget": self.memory_budget, "device": self.device}

    def __str__(self) -> str:
        header = ["strategy", "GFLOPs", "MB accessed", "peak MB", "predicted ms", "compile s",
                  "run ms", "status"]
        lines = [header]
        for r in self.rows:
            name = r["strategy"] + (" (auto)" if r["strategy"] == self.auto else "")
            lines.append([name, _fmt(r["flops"], 1e-9, 3), _fmt(r["bytes_accessed"], 1e-6, 2),
                          _fmt(r["peak_bytes"], 1e-6, 2), _fmt(r["predicted_s"], 1e3, 3),
                          _fmt(r["compile_s"], 1, 2), _fmt(r["run_s"], 1e3, 3), r["status"]])
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
        text = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                          for i, (c, w) in enumerate(zip(line, widths))) for line in lines]
        text.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(text + [f"device: {self.device}; memory budget "
                                 f"{self.memory_budget / 2**20:.0f} MiB; auto picks {self.auto}"])

    def plot(self, path: str) -> None:
        """Saves bar charts of run (or predicted) time and peak memory per strategy, log scale."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [r["strategy"] for r in self.rows]
        times = [r["run_s"] if r["run_s"] is not None else r["predicted_s"] for r in self.rows]
        peaks = [r["peak_bytes"] for r in self.rows]
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(8, 3.2))
        colors = ["tab:green" if n == self.auto else "tab:blue" for n in names]
        ax_t.bar(names, [t if t is not None and math.isfinite(t) else 0 for t in times], color=colors)
        ax_t.set_yscale("log")
        ax_t.set_ylabel("time (s)" + ("" if all(r["run_s"] is not None for r in self.rows)
                                      else ", predicted where not run"))
        ax_m.bar(names, [p / 2**20 if p is not None and math.isfinite(p) else 0 for p in peaks],
                 color=colors)
        ax_m.set_yscale("log")
        ax_m.set_ylabel("peak memory (MiB)")
        fig.suptitle(f"eNTK strategies on {self.device} (auto: {self.auto}, green)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _fmt(value: Any, scale: float, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    return f"{value * scale:.{digits}g}"


def compare(f: Callable[..., PyTree] | Model, x1: PyTree, x2: PyTree | None = None,
            params: PyTree = None, *, measure: bool = True, repeats: int = 3,
            memory_budget: int | None = None, **ntk_kwargs: Any) -> CompareReport:
    """Every available strategy on this problem, and the one `"auto"` picks.

    Each strategy is compiled from the program the cost model already traced (for XLA's exact peak
    memory) and, with `measure=True`, run `repeats`
    times after a warm-up; the median is reported. A strategy whose compiled peak exceeds
    `memory_budget` (default: half the device's free memory) is reported as over budget and not run.

    Args:
      f: `f(params, x, **kw)` or an `entk.Model` (then `params` defaults to the model's).
      x1, x2: inputs (`x2=None` means `x1`).
      ntk_kwargs: `trace_axes`, `diagonal_axes`, `vmap_axes` as for `empirical_ntk_fn`, and keyword
        arguments for `f` under the key `apply_kwargs` (a dict).
    """
    capabilities = ALL_STRATEGIES
    if isinstance(f, Model):
        capabilities = f.capabilities
        params = f.params if params is None else params
        f = f.apply
    if params is None:
        raise TypeError("compare needs params= (or an entk.Model).")
    apply_kwargs = dict(ntk_kwargs.pop("apply_kwargs", {}) or {})
    unknown = set(ntk_kwargs) - {"trace_axes", "diagonal_axes", "vmap_axes"}
    if unknown:
        raise TypeError(f"compare got unknown keyword(s) {sorted(unknown)}; pass model keyword "
                        f"arguments as apply_kwargs={{...}}.")
    budget = cost.default_memory_budget() if memory_budget is None else int(memory_budget)
    estimates: list[cost.Estimate] = []
    auto = cost.select(f, x1, x2, params, apply_kwargs, ntk_kwargs, capabilities=capabilities,
                       memory_budget=budget, estimates_out=estimates)

    rows = []
    array_kwargs, static_kwargs = cost._split_static(apply_kwargs)
    for est in estimates:
        row = {"strategy": est.strategy.short_name, "flops": est.flops,
               "bytes_accessed": est.bytes_accessed, "peak_bytes": None, "predicted_s": est.predicted_s,
               "compile_s": None, "run_s": None, "status": "ok"}
        rows.append(row)
        if isinstance(est.compiled, Exception):
            row["status"] = f"error: {type(est.compiled).__name__}: {est.compiled}"[:200]
            continue
        try:
            start = time.perf_counter()
            compiled = est.lowered.compile()
            row["compile_s"] = time.perf_counter() - start
            row["peak_bytes"] = cost.compiled_peak_bytes(compiled)
        except Exception as error:  # noqa: BLE001 - reported in the table
            row["status"] = f"error: {type(error).__name__}: {error}"[:200]
            continue
        if row["peak_bytes"] is not None and row["peak_bytes"] > budget:
            row["status"] = "over budget"
            continue
        if measure:
            args = (x1, x2, params, array_kwargs)
            row["run_s"] = _median_run(lambda: compiled(*args), repeats)
    return CompareReport(rows, auto.short_name, budget, jax.devices()[0].device_kind)


def _median_run(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))
