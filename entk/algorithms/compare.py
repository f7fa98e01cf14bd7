"""`entk.compare`: every strategy side by side on one problem: FLOPs, memory, compile and run time."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import numpy as np

from entk.algorithms import cost
from entk.model import Model

PyTree = Any

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
      calibration: the measured throughput the predicted times come from (per-primitive rates,
        bandwidth, physical peak, date: `entk.algorithms.device.Calibration.summary`).
      model: what was compared, for titles: the model's class and framework (`"torch MLP"`,
        `"entk.Model (flax)"`, `"f (function + params)"`); the CLI puts its SPEC in front.
      shapes: the problem's sizes: `x1`, `x2` (shapes, `x2` is `None` when it is `x1`), `output`
        (the model's output shape(s) on `x1`) and `params` (the parameter count).
    """

    rows: list[dict]
    auto: str
    memory_budget: int
    device: str
    calibration: str = ""
    model: str = ""
    shapes: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"rows": [dict(r) for r in self.rows], "auto": self.auto,
                "memory_budget": self.memory_budget, "device": self.device,
                "calibration": self.calibration, "model": self.model, "shapes": dict(self.shapes)}

    def title(self) -> str:
        """One line naming the model and the problem's shapes, e.g.
        `torch MLP: x1 (8, 3), x2 = x1, output (8, 2), 38 params`."""
        s = self.shapes
        parts = []
        if "x1" in s:
            parts.append(f"x1 {_shape_text(s['x1'])}")
            parts.append("x2 = x1" if s.get("x2") is None else f"x2 {_shape_text(s['x2'])}")
        if s.get("output") is not None:
            parts.append(f"output {_shape_text(s['output'])}")
        if s.get("params") is not None:
            parts.append(f"{s['params']:,} params")
        return ": ".join(p for p in [self.model or "model", ", ".join(parts)] if p)

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
        return "\n".join([self.title()] + text + [f"device: {self.device}; memory budget "
                                 f"{self.memory_budget / 2**20:.0f} MiB; auto picks {self.auto}"]
                         + ([self.calibration] if self.calibration else []))

    def plot(self, path: str | None = None) -> Any:
        """Bar charts per strategy: predicted and measured time side by side, FLOPs, peak memory.

        Log scales; every bar carries its value; auto's pick is marked in the tick labels
        (`(auto)`, bold) and the title names the model, its shapes, the device and the pick.

        Args:
          path: where to save a PNG (`None`: do not save).

        Returns:
          The `matplotlib.figure.Figure` (built without pyplot, so no global backend or state is
          touched): `fig.axes` are time (ms), GFLOPs and peak MiB; the time axes' bar containers are
          labelled `"predicted"` and `"measured"`.
        """
        from matplotlib.figure import Figure

        names = [r["strategy"] + (" (auto)" if r["strategy"] == self.auto else "") for r in self.rows]
        ok = [r["status"] == "ok" for r in self.rows]
        positions = np.arange(len(self.rows), dtype=float)
        fig = Figure(figsize=(4.0 + 2.6 * max(len(self.rows), 1), 4.2), layout="constrained")
        ax_t, ax_f, ax_m = fig.subplots(1, 3, width_ratios=[2, 1, 1])

        width = 0.4
        series = [("predicted", "predicted_s", 1e3, "tab:gray"), ("measured", "run_s", 1e3, "tab:blue")]
        for k, (label, key, scale, color) in enumerate(series):
            values = [_scaled(r[key], scale) for r in self.rows]
            bars = ax_t.bar(positions + (k - 0.5) * width, values, width, label=label, color=color)
            ax_t.bar_label(bars, labels=[_label(v) for v in values], fontsize=7, padding=1)
        ax_t.set_ylabel("time per kernel (ms)")
        ax_t.set_title("time: predicted vs measured", fontsize=9)
        ax_t.legend(fontsize=7, loc="upper left")
        panels = [(ax_f, "flops", 1e-9, "GFLOPs", "tab:orange"),
                  (ax_m, "peak_bytes", 2.0 ** -20, "peak memory (MiB)", "tab:green")]
        for ax, key, scale, label, color in panels:
            values = [_scaled(r[key], scale) for r in self.rows]
            bars = ax.bar(positions, values, 0.6, label=label, color=color)
            ax.bar_label(bars, labels=[_label(v) for v in values], fontsize=7, padding=1)
            ax.set_title(label, fontsize=9)
        for ax in (ax_t, ax_f, ax_m):
            heights = [v for c in ax.containers for v in c.datavalues if np.isfinite(v) and v > 0]
            if heights:
                ax.set_yscale("log")
                ax.set_ylim(min(heights) / 3, max(heights) * 8)  # room for the value labels
            ax.set_xticks(positions, [n if good else f"{n}\n({r['status'][:18]})"
                                      for n, good, r in zip(names, ok, self.rows)], fontsize=8)
            for tick, r in zip(ax.get_xticklabels(), self.rows):
                if r["strategy"] == self.auto:
                    tick.set_fontweight("bold")
        fig.suptitle(f"{self.title()}\neNTK strategies on {self.device}; auto picks {self.auto}",
                     fontsize=10)
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _scaled(value: Any, scale: float) -> float:
    """A row's figure in plot units; NaN (no bar) when missing or not finite."""
    if value is None or not math.isfinite(value):
        return float("nan")
    return float(value) * scale


def _label(value: float) -> str:
    return "" if not np.isfinite(value) else f"{value:.3g}"


def _shape_text(shape: Any) -> str:
    """`(8, 3)` for one shape, `[(8, 3), (8,)]` for several."""
    if isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], (list, tuple)):
        return "[" + ", ".join(_shape_text(s) for s in shape) + "]"
    return str(tuple(shape))


def _fmt(value: Any, scale: float, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    return f"{value * scale:.{digits}g}"


def compare(model: Any, x1: PyTree, x2: PyTree | None = None, params: PyTree = None, *,
            measure: bool = True, repeats: int = 3, memory_budget: int | None = None,
            **ntk_kwargs: Any) -> CompareReport:
    """Every available strategy on this problem, and the one `"auto"` picks.

    Each strategy is compiled from the program the cost model already traced (for XLA's exact peak
    memory) and, with `measure=True`, run `repeats`
    times after a warm-up; the median is reported. A strategy whose compiled peak exceeds
    `memory_budget` (default: half the device's free memory) is reported as over budget and not run.

    Args:
      model: any model `entk.ntk` takes: a `torch.nn.Module`, a Keras model / `tf.function`, a
        `(flax_module, variables)` pair, an `entk.Model` (then `params` defaults to their own
        weights), or `f(params, x, **kw)` with `params`.
      x1, x2: inputs (`x2=None` means `x1`), the model's kind of array, NumPy or JAX.
      params: the parameters (required for a plain `f`; otherwise the model's own by default).
      measure: also run each strategy that fits (`repeats` times after a warm-up); `False` reports
        the cost model's figures and compiled peak memory only.
      ntk_kwargs: `trace_axes`, `diagonal_axes`, `vmap_axes` as for `empirical_ntk_fn`, and keyword
        arguments for `f` under the key `apply_kwargs` (a dict).
    """
    from entk import adapters

    with adapters.precision_scope(model, x1, x2, params):
        converted = adapters.to_model(model, x1, params=params)
        to_jax, _ = adapters.array_converters(x1)
        x1, x2 = jax.tree_util.tree_map(to_jax, (x1, x2))
        shapes = _problem_shapes(converted, x1, x2, ntk_kwargs.get("apply_kwargs") or {})
        report = _compare(converted, x1, x2, measure=measure, repeats=repeats,
                          memory_budget=memory_budget, **ntk_kwargs)
    return dataclasses.replace(report, model=describe_model(model, converted), shapes=shapes)


def describe_model(model: Any, converted: Model) -> str:
    """A short name for `model` in titles: its framework and class (`"torch MLP"`, `"keras
    Sequential 'mlp'"`, `"flax CNN"`, `"entk.Model (torch MLP)"`, `"f (function + params)"`)."""
    from entk import adapters

    if isinstance(model, Model):
        inner = converted.info.get("module")
        return f"entk.Model ({converted.source}{' ' + inner if inner else ''})"
    if adapters.is_flax_pair(model):
        return f"flax {type(model[0]).__name__}"
    framework = adapters.framework_of(model)
    if framework is not None:
        name = getattr(model, "name", None)
        named = f" {name!r}" if isinstance(name, str) and name else ""
        return f"{framework} {type(model).__name__}{named}"
    name = getattr(model, "__qualname__", None) or type(model).__name__
    return f"{name} (function + params)"


def _problem_shapes(model: Model, x1: PyTree, x2: PyTree | None, apply_kwargs: dict) -> dict:
    """`{"x1", "x2", "output", "params"}` for `CompareReport.shapes` (`output` None if unknown)."""
    def shapes_of(tree: PyTree) -> Any:
        leaves = [tuple(np.shape(a)) for a in jax.tree_util.tree_leaves(tree)]
        return leaves[0] if len(leaves) == 1 else leaves

    try:
        output = shapes_of(jax.eval_shape(lambda p, x: model.apply(p, x, **apply_kwargs),
                                          model.params, x1))
    except Exception:  # noqa: BLE001 - a title without the output shape; compare reports errors
        output = None
    return {"x1": shapes_of(x1), "x2": None if x2 is None else shapes_of(x2), "output": output,
            "params": int(sum(np.size(a) for a in jax.tree_util.tree_leaves(model.params)))}


def _compare(model: Model, x1: PyTree, x2: PyTree | None, *, measure: bool, repeats: int,
             memory_budget: int | None, **ntk_kwargs: Any) -> CompareReport:
    capabilities, params, f = model.capabilities, model.params, model.apply
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
    return CompareReport(rows, auto.short_name, budget, jax.devices()[0].device_kind,
                         cost.calibration().summary())


def _median_run(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))
