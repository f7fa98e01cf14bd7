"""`CompareReport.plot` and the report's description of the problem (`entk compare --plot`).

The figure is read back (title, bar heights, value labels) and checked against the report's own
numbers; the report's shapes against the model's real shapes. The CLI's `--json` / `--plot` (the
SPEC in the report's model name) are checked in tests/test_cost.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import entk
from entk.algorithms.compare import CompareReport

pytest.importorskip("matplotlib")


def _mlp(params, x):
    return jnp.tanh(x @ params["w"]) @ params["v"]


@pytest.fixture(scope="module")
def report():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w": jax.random.normal(k1, (3, 4)), "v": jax.random.normal(k2, (4, 2))}
    x1, x2 = jax.random.normal(k3, (5, 3)), jax.random.normal(k4, (4, 3))
    return entk.compare(_mlp, x1, x2, params, measure=True, repeats=1)


def _bars(ax):
    """`{container label: bar heights}` of one axes."""
    return {c.get_label(): np.array([p.get_height() for p in c.patches]) for c in ax.containers}


def _value_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.texts if t.get_text()]


def test_report_describes_the_model_and_its_shapes(report):
    assert report.model == "_mlp (function + params)"
    assert report.shapes == {"x1": (5, 3), "x2": (4, 3), "output": (5, 2), "params": 3 * 4 + 4 * 2}
    assert report.title() == "_mlp (function + params): x1 (5, 3), x2 (4, 3), output (5, 2), 20 params"
    assert str(report).splitlines()[0] == report.title()
    assert report.to_dict()["shapes"] == report.shapes and report.to_dict()["model"] == report.model


def test_plot_shows_title_values_and_predicted_vs_measured(report, tmp_path):
    path = tmp_path / "compare.png"
    fig = report.plot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    title = fig.get_suptitle()
    for part in ("_mlp", "x1 (5, 3)", "x2 (4, 3)", "output (5, 2)", "20 params",
                 f"auto picks {report.auto}", report.device):
        assert part in title, (part, title)

    ax_time, ax_flops, ax_mem = fig.axes[:3]
    rows = report.rows
    assert all(r["status"] == "ok" and r["run_s"] is not None for r in rows)  # measure=True ran all
    bars = _bars(ax_time)
    assert set(bars) == {"predicted", "measured"}
    np.testing.assert_allclose(bars["predicted"], [r["predicted_s"] * 1e3 for r in rows], rtol=1e-12)
    np.testing.assert_allclose(bars["measured"], [r["run_s"] * 1e3 for r in rows], rtol=1e-12)
    expected_labels = ([f"{r['predicted_s'] * 1e3:.3g}" for r in rows]
                       + [f"{r['run_s'] * 1e3:.3g}" for r in rows])
    assert _value_labels(ax_time) == expected_labels

    (flops,) = _bars(ax_flops).values()
    np.testing.assert_allclose(flops, [r["flops"] * 1e-9 for r in rows], rtol=1e-12)
    assert _value_labels(ax_flops) == [f"{r['flops'] * 1e-9:.3g}" for r in rows]
    (peaks,) = _bars(ax_mem).values()
    np.testing.assert_allclose(peaks, [r["peak_bytes"] / 2**20 for r in rows], rtol=1e-12)
    assert _value_labels(ax_mem) == [f"{r['peak_bytes'] / 2**20:.3g}" for r in rows]

    ticks = ax_time.get_xticklabels()
    assert [t.get_text() for t in ticks] == [
        r["strategy"] + (" (auto)" if r["strategy"] == report.auto else "") for r in rows]
    assert [t.get_fontweight() == "bold" for t in ticks] == [r["strategy"] == report.auto for r in rows]


def test_plot_leaves_out_what_was_not_measured():
    # A hand-made report: one strategy over budget (compiled, not run), one failed to compile.
    rows = [
        {"strategy": "jc", "flops": 2e9, "bytes_accessed": 1e6, "peak_bytes": 3 * 2**20,
         "predicted_s": 0.004, "compile_s": 0.1, "run_s": 0.005, "status": "ok"},
        {"strategy": "ntvp", "flops": 5e9, "bytes_accessed": 2e6, "peak_bytes": 9 * 2**20,
         "predicted_s": 0.02, "compile_s": 0.1, "run_s": None, "status": "over budget"},
        {"strategy": "sd", "flops": 1e9, "bytes_accessed": 1e6, "peak_bytes": None,
         "predicted_s": float("inf"), "compile_s": None, "run_s": None, "status": "error: boom"},
    ]
    report = CompareReport(rows, auto="jc", memory_budget=2**30, device="cpu",
                           model="torch Net", shapes={"x1": [(8, 3), (8,)], "x2": None,
                                                      "output": (8, 2), "params": 1234})
    fig = report.plot()
    assert fig.get_suptitle().startswith(
        "torch Net: x1 [(8, 3), (8,)], x2 = x1, output (8, 2), 1,234 params\n")
    bars = _bars(fig.axes[0])
    np.testing.assert_allclose(bars["predicted"], [4.0, 20.0, np.nan])
    np.testing.assert_allclose(bars["measured"], [5.0, np.nan, np.nan])
    assert _value_labels(fig.axes[0]) == ["4", "20", "5"]
    assert [t.get_text() for t in fig.axes[2].get_xticklabels()] == [
        "jc (auto)", "ntvp\n(over budget)", "sd\n(error: boom)"]

