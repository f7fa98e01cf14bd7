"""Cost model, auto selection under a memory budget, `entk.compare` and the `entk compare` CLI."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import pytest

import entk
from entk.algorithms import Strategy, cost, device
from tests import jax_models
from tests.reference import assert_close, brute_force_ntk

NTK_KW = {"trace_axes": (), "diagonal_axes": (), "vmap_axes": None}
CAPS = frozenset({"jc", "ntvp"})


@pytest.fixture(scope="module", autouse=True)
def calibration_cache(tmp_path_factory):
    import os
    old = os.environ.get("ENTK_CACHE_DIR")
    os.environ["ENTK_CACHE_DIR"] = str(tmp_path_factory.mktemp("entk-cache"))
    yield
    if old is None:
        os.environ.pop("ENTK_CACHE_DIR")
    else:
        os.environ["ENTK_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def report():
    f, params, x1, x2 = jax_models.make("conv_nhwc")
    return entk.compare(f, x1, x2, params, trace_axes=(), repeats=2)


def test_report_fields_are_present_and_sane(report):
    names = [row["strategy"] for row in report.rows]
    assert {"jc", "ntvp"} <= set(names)
    for row in report.rows:
        assert set(row) == {"strategy", "flops", "bytes_accessed", "peak_bytes", "predicted_s",
                            "compile_s", "run_s", "status"}
        assert row["status"] == "ok"
        assert row["flops"] > 0 and row["bytes_accessed"] > 0 and row["peak_bytes"] > 0
        assert row["predicted_s"] > 0 and row["compile_s"] > 0 and row["run_s"] > 0
    assert report.auto in names
    assert report.to_dict()["rows"][0].keys() == report.rows[0].keys()
    text = str(report)
    assert "jc" in text and "ntvp" in text and f"auto picks {report.auto}" in text
    # The calibration behind the predicted times, with its date and per-primitive rates.
    cal = cost.calibration()
    assert report.calibration == cal.summary() and report.to_dict()["calibration"] == cal.summary()
    assert cal.summary() in text and cal.measured_at[:10] in text and "conv weight-grad" in text


def _flops(f, x1, params, strategy, ntk_kw):
    return cost.estimate(f, x1, None, params, {}, strategy, ntk_kw).flops


def _asymptotic(strategy, n, o, n_params, forward_flops, traced):
    return cost.asymptotic_flops(strategy, n1=n, n2=n, out_per_example=o,
                                 kept_per_pair=1 if traced else o * o, n_params=n_params,
                                 forward_flops=forward_flops)


def test_flops_ordering_matches_the_asymptotic_model():
    # Many outputs, full kernel, cheap forward pass: JC's N²·O²·P contraction dominates.
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    wide = {"w": jax.random.normal(k1, (16, 40))}
    f_wide = lambda p, x: jnp.tanh(x @ p["w"])
    x = jax.random.normal(k2, (6, 16))
    xla = {s: _flops(f_wide, x, wide, s, NTK_KW) for s in (Strategy.JACOBIAN_CONTRACTION,
                                                            Strategy.NTK_VECTOR_PRODUCTS)}
    model = {s: _asymptotic(s, 6, 40, 16 * 40, forward_flops=2 * 16 * 40, traced=False) for s in xla}
    assert xla[Strategy.NTK_VECTOR_PRODUCTS] < xla[Strategy.JACOBIAN_CONTRACTION]
    assert model[Strategy.NTK_VECTOR_PRODUCTS] < model[Strategy.JACOBIAN_CONTRACTION]

    # One output and a forward pass much dearer than P (a shared conv kernel): NTVP repeats it N·O times.
    conv = {"c": jax.random.normal(k1, (3, 3, 2, 2)) / 3}
    f_conv = lambda p, x: jnp.tanh(jax.lax.conv_general_dilated(
        x, p["c"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))).mean(axis=(1, 2, 3))[:, None]
    xc = jax.random.normal(k2, (8, 12, 12, 2))
    xla = {s: _flops(f_conv, xc, conv, s, NTK_KW) for s in (Strategy.JACOBIAN_CONTRACTION,
                                                             Strategy.NTK_VECTOR_PRODUCTS)}
    assert xla[Strategy.JACOBIAN_CONTRACTION] < xla[Strategy.NTK_VECTOR_PRODUCTS] / 2
    conv_fp = 2 * 12 * 12 * 3 * 3 * 2 * 2   # multiply-adds of the conv, per example
    model = {s: _asymptotic(s, 8, 1, 36, forward_flops=conv_fp, traced=False) for s in xla}
    assert model[Strategy.JACOBIAN_CONTRACTION] < model[Strategy.NTK_VECTOR_PRODUCTS] / 2


def test_auto_respects_memory_budget(report):
    f, params, x1, x2 = jax_models.make("conv_nhwc")
    peaks = {row["strategy"]: row["peak_bytes"] for row in report.rows if row["strategy"] in CAPS}
    small, large = min(peaks, key=peaks.get), max(peaks, key=peaks.get)
    assert peaks[small] < peaks[large]
    budget = int((peaks[small] + peaks[large]) / 2)
    chosen = cost.select(f, x1, x2, params, {}, NTK_KW, capabilities=CAPS, memory_budget=budget)
    assert chosen.short_name == small
    # The kernel function itself honours the budget and stays correct.
    kernel = entk.empirical_ntk_fn(f, trace_axes=(), memory_budget=budget)(x1, x2, params)
    assert_close(kernel, brute_force_ntk(f, x1, x2, params, trace_axes=()))
    with pytest.raises(cost.OutOfBudgetError, match="No strategy fits memory_budget"):
        cost.select(f, x1, x2, params, {}, NTK_KW, capabilities=CAPS, memory_budget=1000)


def test_decision_is_cached(monkeypatch):
    f, params, x1, x2 = jax_models.make("mlp")
    first = cost.select(f, x1, x2, params, {}, NTK_KW, capabilities=CAPS, memory_budget=1 << 30)
    calls = []
    monkeypatch.setattr(cost, "lower_strategy", lambda *a, **k: calls.append(a))
    assert cost.select(f, x1, x2, params, {}, NTK_KW, capabilities=CAPS, memory_budget=1 << 30) is first
    assert not calls


def test_near_tie_is_broken_by_timing_both_candidates(monkeypatch):
    """Predictions within MEASURE_WITHIN of each other: auto times both and takes the measured faster;
    far apart: nothing is timed and the prediction decides. Under jit (tracers) stand-ins are timed."""
    f, params, x1, x2 = jax_models.make("mlp")
    predicted = {"jc": 1e-3, "ntvp": 1.2e-3}
    real_estimate = cost.estimate

    def estimate(*args, **kwargs):
        est = real_estimate(*args, **kwargs)
        est.predicted_s = predicted[est.strategy.short_name]
        return est

    monkeypatch.setattr(cost, "estimate", estimate)
    estimates: list = []
    chosen = cost.select(f, x1, x2, params, {}, NTK_KW, capabilities=CAPS, memory_budget=1 << 30,
                         estimates_out=estimates)
    timed = {est.strategy.short_name: est.measured_s for est in estimates}
    assert set(timed) == CAPS and all(t is not None and t > 0 for t in timed.values())
    assert chosen.short_name == min(timed, key=timed.get)

    kernel = jax.jit(entk.empirical_ntk_fn(f, trace_axes=(), memory_budget=(1 << 30) + 1))(
        x1, x2, params)
    assert_close(kernel, brute_force_ntk(f, x1, x2, params, trace_axes=()))

    predicted["ntvp"] = 10 * cost.MEASURE_WITHIN * predicted["jc"]
    estimates = []
    chosen = cost.select(f, x1, x2, params, {}, NTK_KW, capabilities=CAPS, memory_budget=1 << 30,
                         estimates_out=estimates)
    assert chosen.short_name == "jc"
    assert all(est.measured_s is None for est in estimates)


BOUND_CASES = [  # (model, x2 given, trace_axes, diagonal_axes, vmap_axes): each JC and NTVP form
    ("mlp", True, (), (), None), ("mlp", False, (-1,), (), 0), ("mlp", True, (), (), 0),
    ("mlp", False, (), (0,), 0), ("conv_nhwc", True, (-1,), (), 0), ("conv_nchw", False, (), (), None),
    ("multi_axis", True, (-1,), (1,), 0), ("multi_axis", False, (0,), (), 0),
    ("dict_outputs", True, (), (), 0), ("attention", False, (-1,), (), None),
    ("scan_rnn", True, (), (), 0), ("embedding", False, (-1,), (), 0),
]


@pytest.mark.parametrize("strategy", [Strategy.JACOBIAN_CONTRACTION, Strategy.NTK_VECTOR_PRODUCTS],
                         ids=["jc", "ntvp"])
@pytest.mark.parametrize("name, with_x2, trace, diagonal, vmap", BOUND_CASES,
                         ids=[f"{c[0]}-{'x2' if c[1] else 'x1'}-t{c[2]}-d{c[3]}-v{c[4]}"
                              for c in BOUND_CASES])
def test_lower_bound_is_below_the_prediction(name, with_x2, trace, diagonal, vmap, strategy):
    """The bound auto prunes a candidate with never exceeds the time the cost model predicts from the
    candidate's own lowered program, in every form JC and NTVP take (whole batch, per example, blocks
    or columns, diagonal batch, several output leaves, a scan): pruning never drops a strategy the
    model would pick."""
    f, params, x1, x2 = jax_models.make(name)
    x2 = x2 if with_x2 else None
    ntk_kwargs = {"trace_axes": trace, "diagonal_axes": diagonal, "vmap_axes": vmap}
    call = cost.prepare_call(f, x1, x2, params, {}, ntk_kwargs)
    cal = cost.calibration()
    bound = cost._lower_bound_s(strategy, call, cal)
    est = cost.estimate(f, x1, x2, params, {}, strategy, ntk_kwargs, cal=cal, call=call)
    assert cal.overhead_s < bound <= est.predicted_s


def test_jc_bound_counts_one_loop_step_of_traced_blocks(monkeypatch):
    """A traced kernel contracted in a loop over blocks of traced entries: XLA's cost analysis counts
    the loop's body once, and so does the bound."""
    from entk.algorithms import jacobian_contraction as jc

    f, params, x1, x2 = jax_models.make("mlp")
    ntk_kwargs = {"trace_axes": (-1,), "diagonal_axes": (), "vmap_axes": 0}
    call = cost.prepare_call(f, x1, x2, params, {}, ntk_kwargs)
    whole = jc.written_bytes_lower_bound(f, x1, x2, params, {}, call.axes, call.vmap, call.out1,
                                         call.out2)
    monkeypatch.setattr(jc, "_traced_block", lambda *a: 1)  # one entry per step: 3 steps
    monkeypatch.setattr(jc, "MAX_UNROLLED_STEPS", 2)
    assert jc.written_bytes_lower_bound(f, x1, x2, params, {}, call.axes, call.vmap, call.out1,
                                        call.out2) == whole // 3
    cal = cost.calibration()
    est = cost.estimate(f, x1, x2, params, {}, Strategy.JACOBIAN_CONTRACTION, ntk_kwargs, cal=cal,
                        call=call)
    assert cost._lower_bound_s(Strategy.JACOBIAN_CONTRACTION, call, cal) <= est.predicted_s


def test_candidates_are_lowered_only_when_their_lower_bound_can_win(monkeypatch, tmp_path):
    """Auto lowers NTK-vector products last, and a candidate only when its lower bound
    (`_lower_bound_s`) is within a close call of a strategy already estimated that fits the budget;
    a report (`estimates_out`) estimates all."""
    f, params, x1, x2 = jax_models.make("mlp")
    call = cost.prepare_call(f, x1, x2, params, {}, NTK_KW)
    cal = cost.calibration()
    forward_flops = jax.jit(f).lower(params, x1).cost_analysis()["flops"]
    param_bytes = sum(p.size * p.dtype.itemsize for p in jax.tree_util.tree_leaves(params))
    entries = x2.shape[0] * 3  # whole batch: one VJP per output entry of f(x2)
    fastest = max(cal.flop_rate(x1.dtype.itemsize, kind) for kind in cal.flops_per_s)
    assert cost._lower_bound_s(Strategy.NTK_VECTOR_PRODUCTS, call, cal) == pytest.approx(
        entries * forward_flops / fastest + entries * param_bytes / cal.bytes_per_s
        + cal.overhead_s)
    jacobians = (x1.shape[0] + x2.shape[0]) * 3 * param_bytes  # both sides' Jacobians
    assert cost._lower_bound_s(Strategy.JACOBIAN_CONTRACTION, call, cal) == pytest.approx(
        jacobians / cal.bytes_per_s + cal.overhead_s)

    lowered: list = []
    real_lower = cost.lower_strategy
    monkeypatch.setattr(cost, "lower_strategy",
                        lambda call, strategy, *a: lowered.append(strategy) or real_lower(
                            call, strategy, *a))
    for bound, expect_lowered in ((1e9, False), (0.0, True)):  # nothing decided before: no caches
        monkeypatch.setattr(cost.decision_cache, "directory", lambda b=bound: tmp_path / str(b))
        monkeypatch.setattr(cost, "_DECISIONS", {})
        monkeypatch.setattr(cost, "_lower_bound_s", lambda strategy, call, cal, bound=bound: (
            bound if strategy is Strategy.NTK_VECTOR_PRODUCTS else 0.0))
        lowered.clear()
        chosen = cost.select(f, x1, x2, params, {}, NTK_KW, capabilities=CAPS,
                             memory_budget=1 << 30)
        assert (Strategy.NTK_VECTOR_PRODUCTS in lowered) is expect_lowered
        assert lowered[0] is Strategy.JACOBIAN_CONTRACTION
        if not expect_lowered:
            assert chosen is Strategy.JACOBIAN_CONTRACTION
        lowered.clear()
        estimates: list = []
        cost.select(f, x1, x2, params, {}, NTK_KW, capabilities=CAPS, memory_budget=1 << 30,
                    estimates_out=estimates)
        assert set(lowered) == {Strategy.JACOBIAN_CONTRACTION, Strategy.NTK_VECTOR_PRODUCTS}


def test_calibration_is_cached_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("ENTK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(device, "_CALIBRATIONS", {})
    cal = cost.calibration()  # a real measurement
    assert cal.flop_rate(4) > 0 and cal.bytes_per_s > 0 and cal.op_overhead_s >= 0
    # Stored only when plausible: on a machine busy enough to distort the micro-benchmarks the
    # figures are clamped and kept for this process only (tests/test_calibration.py fakes both cases).
    assert device.calibration_path().exists() == cal.plausible
    if cal.plausible:
        device._CALIBRATIONS.clear()
        monkeypatch.setattr(device, "_measure", lambda dev: pytest.fail("re-measured"))
        assert cost.calibration() == cal


def test_cli_compare_writes_json_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from entk.cli import main
    json_path, png_path = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["compare", "examples/jax_models.py:mlp", "--input-shape", "32", "--batch", "3",
                 "--outputs", "4", "--full", "--repeats", "1", "--json", str(json_path),
                 "--plot", str(png_path)])
    assert code == 0
    data = json.loads(json_path.read_text())
    assert {row["strategy"] for row in data["rows"]} >= {"jc", "ntvp"}
    assert data["auto"] in {row["strategy"] for row in data["rows"]}
    assert png_path.read_bytes()[:4] == b"\x89PNG"
    # The report (and the plot's title, tests/test_compare_plot.py) names the SPEC and the shapes.
    assert data["model"].startswith("examples/jax_models.py:mlp (entk.Model")
    assert data["shapes"]["x1"] == [3, 32] and data["shapes"]["output"] == [3, 4]
    assert data["shapes"]["x2"] is None and data["shapes"]["params"] > 0
    out = capsys.readouterr().out
    assert "auto picks" in out and out.startswith("examples/jax_models.py:mlp (entk.Model")


def _notes(error: BaseException) -> str:
    return "\n".join(getattr(error, "__notes__", []))


def test_auto_reports_the_models_shape_error_not_out_of_budget():
    # A model expecting 6 features given 7 (the user's `--input-shape 7`), and a hard-coded reshape:
    # every strategy fails to trace; auto re-raises the model's own error, not OutOfBudgetError.
    params = {"w": jnp.ones((6, 5)), "v": jnp.ones((5, 2))}
    x = jnp.ones((4, 7))

    def mlp(p, x):
        return jnp.tanh(x @ p["w"]) @ p["v"]

    def reshaping(p, x):
        return jnp.reshape(x, (x.shape[0], 2, 3)).sum(-1) @ p["v"][:2]

    with pytest.raises(TypeError, match=r"contracting dimensions.*\(7,\) and \(6,\)") as info:
        entk.compare(mlp, x, None, params, measure=False)
    assert re.search(r"fails on x1 \(float\d+\[4,7\]\)", _notes(info.value)), _notes(info.value)
    with pytest.raises(TypeError, match=r"cannot reshape array of shape \(4, 7\)") as info:
        cost.select(reshaping, x, None, params, {}, NTK_KW, capabilities=CAPS)
    assert "before any eNTK strategy runs" in _notes(info.value)
    with pytest.raises(TypeError, match=r"cannot reshape array of shape \(4, 7\)"):
        entk.empirical_ntk_fn(reshaping, implementation="auto")(x, None, params)
    with pytest.raises(TypeError, match="contracting dimensions") as info:  # x2 checked too
        cost.select(mlp, x[:, :6], x, params, {}, NTK_KW, capabilities=CAPS)
    assert "fails on x2" in _notes(info.value)


def test_calibration_inside_jit_runs_its_benchmarks(monkeypatch, tmp_path):
    """`entk.ntk` selects a strategy while its kernel function is traced under `jax.jit`; the
    calibration's micro-benchmarks must still run on concrete arrays, not be staged into that trace
    (which timed nothing and cached rates ~10x the machine's)."""
    monkeypatch.setenv("ENTK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(device, "_CALIBRATIONS", {})
    results = []
    median_time = device._median_time

    def recording(fn, repeats):
        results.append(fn())
        return median_time(fn, 1)

    monkeypatch.setattr(device, "_median_time", recording)
    jax.jit(lambda x: x + cost.calibration().overhead_s)(jnp.ones(()))
    assert results and not any(isinstance(r, jax.core.Tracer) for r in results)
    assert list(tmp_path.glob("calibration-*.json"))


def test_decision_is_reused_by_a_new_process_from_disk(monkeypatch, tmp_path):
    """A new process on the same model and shapes reuses auto's decision from the cache directory
    (no candidate is lowered again), while it still fits the memory budget."""
    monkeypatch.setenv("ENTK_CACHE_DIR", str(tmp_path))
    f, params, x1, x2 = jax_models.make("mlp")
    first = cost.select(f, x1, x2, params, {}, NTK_KW, capabilities=CAPS, memory_budget=1 << 30)
    assert len(list((tmp_path / "decisions").glob("*.json"))) == 1
    estimate = cost.estimate
    monkeypatch.setattr(cost, "_DECISIONS", {})  # a new process: nothing decided in memory
    monkeypatch.setattr(cost, "estimate", lambda *a, **k: pytest.fail("decided again"))
    assert cost.select(f, x1, x2, params, {}, NTK_KW, capabilities=CAPS,
                       memory_budget=1 << 30) is first
    # Other shapes, other settings or another model: another key.
    key = cost._disk_key(f, x1, x2, params, {}, NTK_KW, list(Strategy)[1:])
    assert key != cost._disk_key(f, x1[:2], x2, params, {}, NTK_KW, list(Strategy)[1:])
    assert key != cost._disk_key(f, x1, x2, params, {}, {**NTK_KW, "trace_axes": (-1,)},
                                 list(Strategy)[1:])
    g, g_params, g1, g2 = jax_models.make("conv_nhwc")
    assert key != cost._disk_key(g, g1, g2, g_params, {}, NTK_KW, list(Strategy)[1:])
    # A budget the stored pick does not fit is decided afresh (here: nothing fits).
    monkeypatch.setattr(cost, "estimate", estimate)
    monkeypatch.setattr(cost, "_DECISIONS", {})
    with pytest.raises(cost.OutOfBudgetError):
        cost.select(f, x1, x2, params, {}, NTK_KW, capabilities=CAPS, memory_budget=1000)
