"""The device calibration cannot lie, and the cost model prices each primitive class at its own rate.

No test here runs the real micro-benchmarks (tests/test_cost.py does, once): the timing or the whole
measurement is replaced, so these tests take well under a second each.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from entk.algorithms import Strategy, cost, device, program_flops

CPU = jax.devices()[0]


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch, tmp_path):
    """Each test starts with an empty cache directory and nothing calibrated in memory."""
    monkeypatch.setenv("ENTK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(device, "_CALIBRATIONS", {})
    return tmp_path


def _plausible(fraction: float = 0.1, **changes) -> device.Calibration:
    """A calibration of this machine at `fraction` of its physical peak (no benchmark run)."""
    peak_flops, peak_bytes = device.physical_peak(CPU, 4)
    cal = device.Calibration(
        key=device.calibration_key(CPU),
        flops_per_s={k: fraction * peak_flops for k in device.RATE_CLASSES},
        float64_factor=0.5, bytes_per_s=fraction * peak_bytes,
        fused_bytes_per_s=fraction * peak_flops, op_overhead_s=1e-6,
        overhead_s=5e-6, peak_flops_per_s=peak_flops, peak_bytes_per_s=peak_bytes,
        measured_at="2025-01-01T00:00:00+00:00")
    return dataclasses.replace(cal, **changes)


def _counting(monkeypatch, results):
    """Replaces the measurement by returning `results` in turn; returns the list of calls."""
    calls = []

    def measure(dev):
        calls.append(dev)
        return results[min(len(calls), len(results)) - 1]

    monkeypatch.setattr(device, "_measure", measure)
    return calls


def test_physical_peak_is_cores_times_lanes_times_fma_times_clock():
    info = device._cpuinfo()
    if "clock_hz" not in info or not info.get("flags"):
        pytest.skip("no /proc/cpuinfo clock or flags on this machine")
    lanes = device._vector_bytes(info["flags"]) // 4
    fma = 2 if ("fma" in info["flags"] or "avx512f" in info["flags"]) else 1
    flops, bandwidth = device.physical_peak(CPU, 4)
    assert flops == device.cpu_cores() * lanes * fma * 2 * info["clock_hz"]
    assert device.physical_peak(CPU, 8)[0] == pytest.approx(flops / 2)
    assert bandwidth == device.cpu_cores() * 32 * info["clock_hz"]


def test_timing_100x_over_the_physical_peak_is_rejected_remeasured_and_not_written(
        monkeypatch, fresh_cache):
    """A timer that returns 100x too little time (as a benchmark staged into an enclosing trace did)
    gives rates 100x over the physical peak: every attempt is rejected, the figures are used clamped
    for this process only, and nothing reaches the disk."""
    peak_flops, _ = device.physical_peak(CPU, 4)
    n = 384
    honest_matmul_s = 2 * n ** 3 / (0.1 * peak_flops)   # a matmul at 10% of peak

    def lying_timer(fn, repeats):  # never runs `fn`: 1/1000 of an honest matmul's time, for all
        return honest_matmul_s / 1000

    monkeypatch.setattr(device, "_median_time", lying_timer)
    bad = device._measure(CPU)
    assert bad.flops_per_s["dot"] == pytest.approx(100 * peak_flops)
    assert any("dot" in p for p in bad.problems())

    attempts = []
    measure = device._measure
    monkeypatch.setattr(device, "_measure", lambda dev: attempts.append(dev) or measure(dev))
    with pytest.warns(RuntimeWarning, match="stayed implausible after 3 measurements"):
        cal = device.calibration(CPU)
    assert len(attempts) == device.MAX_ATTEMPTS
    assert not cal.plausible and "IMPLAUSIBLE" in cal.summary()
    assert all(rate <= cal.peak_flops_per_s for rate in cal.flops_per_s.values())
    assert not list(fresh_cache.glob("*")), "an implausible calibration was written to disk"


def test_one_implausible_attempt_is_measured_again_and_only_the_good_one_is_stored(
        monkeypatch, fresh_cache):
    good = _plausible()
    lie = _plausible(flops_per_s={**good.flops_per_s, "dot": 100 * good.peak_flops_per_s})
    calls = _counting(monkeypatch, [lie, good])
    assert device.calibration(CPU) == good
    assert len(calls) == 2
    stored = json.loads(device.calibration_path(CPU).read_text())
    assert stored["flops_per_s"] == good.flops_per_s and stored["key"] == good.key


@pytest.mark.parametrize("rate", [0.0, float("nan"), 1e-9])
def test_absurdly_low_or_broken_rates_are_implausible(rate):
    cal = _plausible(bytes_per_s=rate)
    assert cal.problems() and "memory" in cal.problems()[0]
    assert _plausible(overhead_s=0.0).problems()  # a call cannot cost nothing
    assert _plausible().problems() == []


def test_cache_key_changes_with_jax_version_and_device_count(monkeypatch):
    key = device.calibration_key(CPU)
    assert {"machine", "device_kind", "device_count", "jax", "jaxlib", "version"} <= set(key)
    monkeypatch.setattr(jax, "__version__", "0.0.1")
    assert device.calibration_key(CPU) != key
    monkeypatch.undo()
    assert device.calibration_key(CPU) == key
    monkeypatch.setattr(jax, "device_count", lambda *args, **kwargs: 8)
    assert device.calibration_key(CPU)["device_count"] == 8
    monkeypatch.undo()
    monkeypatch.setattr(device, "machine_name", lambda dev: "another CPU")
    assert device.calibration_key(CPU) != key


def test_a_new_jax_version_or_device_count_measures_again(monkeypatch):
    good = _plausible()
    calls = _counting(monkeypatch, [good])
    device.calibration(CPU)
    device.calibration(CPU)
    assert len(calls) == 1  # cached
    monkeypatch.setattr(jax, "__version__", "99.0.0")
    device.calibration(CPU)
    assert len(calls) == 2
    monkeypatch.setattr(jax, "device_count", lambda *args, **kwargs: 8)
    device.calibration(CPU)
    assert len(calls) == 3


def test_stored_calibration_from_an_older_key_is_measured_again(monkeypatch):
    path = device.calibration_path(CPU)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = _plausible(key={**device.calibration_key(CPU), "jax": "0.4.0"})
    path.write_text(json.dumps(dataclasses.asdict(old)))
    new = _plausible(0.2)
    calls = _counting(monkeypatch, [new])
    assert device.calibration(CPU) == new and len(calls) == 1
    assert json.loads(path.read_text())["key"] == device.calibration_key(CPU)

    # Same key but a lie written by hand (or by an old entk): checked when read, measured again.
    device._CALIBRATIONS.clear()
    lie = _plausible(bytes_per_s=20 * new.peak_bytes_per_s)
    path.write_text(json.dumps(dataclasses.asdict(lie)))
    assert device.calibration(CPU) == new and len(calls) == 2

    # A current, plausible file is used as it is.
    device._CALIBRATIONS.clear()
    assert device.calibration(CPU) == new and len(calls) == 2


# ----------------------------------------------------------------------------------------------
# FLOPs per primitive class


def _counts(fn, *args):
    return program_flops.flops_by_primitive(jax.jit(fn).lower(*args).as_text())


def _conv(x, w, padding="VALID", strides=(1, 1), groups=1):
    return lax.conv_general_dilated(x, w, strides, padding, feature_group_count=groups,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_matmul_flops_are_2nkm():
    n, k, m = 5, 7, 3
    counts = _counts(lambda a, b: a @ b, jnp.ones((n, k)), jnp.ones((k, m)))
    assert counts == {"dot": 2 * n * k * m, "conv": 0, "conv_wgrad": 0}
    b = 4  # batched: 2·B·N·K·M
    counts = _counts(lambda a, c: jnp.einsum("bij,bjk->bik", a, c), jnp.ones((b, n, k)),
                     jnp.ones((b, k, m)))
    assert counts["dot"] == 2 * b * n * k * m


def test_conv_forward_and_weight_gradient_flops():
    n, h, c, o, kh = 2, 6, 3, 4, 3
    x, w = jnp.ones((n, h, h, c)), jnp.ones((kh, kh, c, o))
    valid = 2 * n * (h - kh + 1) ** 2 * o * kh * kh * c
    assert _counts(_conv, x, w) == {"dot": 0, "conv": valid, "conv_wgrad": 0}
    # SAME padding: per spatial dimension, 6 outputs × 3 taps minus the 2 taps on the padding.
    same = 2 * n * o * c * (h * kh - 2) ** 2
    assert _counts(lambda a, b: _conv(a, b, "SAME"), x, w)["conv"] == same
    # The weight gradient is a convolution whose window is the feature map: its own class, same FLOPs.
    g = jnp.ones((n, h - kh + 1, h - kh + 1, o))
    wgrad = _counts(lambda a, t: jax.vjp(lambda k: _conv(a, k), w)[1](t)[0], x, g)
    assert wgrad == {"dot": 0, "conv": 0, "conv_wgrad": valid}
    # Grouped (2 groups of 2 input channels) and strided, checked against XLA's own count.
    xg, wg = jnp.ones((n, 7, 7, 4)), jnp.ones((3, 3, 2, 6))
    grouped = jax.jit(lambda a, b: _conv(a, b, "SAME", (2, 2), groups=2)).lower(xg, wg)
    assert (program_flops.flops_by_primitive(grouped.as_text())["conv"]
            == cost._analysis(grouped.cost_analysis())["flops"])
    # The input gradient of a strided convolution (a dilated input: only every 2nd tap reads one).
    gs = jnp.ones((n, 3, 3, o))
    igrad = jax.jit(lambda k, t: jax.vjp(lambda a: _conv(a, k, "SAME", (2, 2)), x)[1](t)[0]).lower(
        w, gs)
    assert (program_flops.flops_by_primitive(igrad.as_text())["conv"]
            == cost._analysis(igrad.cost_analysis())["flops"] > 0)


def test_a_function_called_twice_counts_twice():
    inner = jax.jit(lambda a, b: a @ b)
    x = jnp.ones((4, 4))
    counts = _counts(lambda a, b: inner(inner(a, b), b), x, x)
    assert counts["dot"] == 2 * (2 * 4 * 4 * 4)


def test_estimate_splits_xla_flops_by_class_and_prices_each_at_its_rate():
    cal = _plausible(flops_per_s={"dot": 1e11, "conv": 1e10, "conv_wgrad": 1e9, "elementwise": 1e8},
                     float64_factor=0.25, bytes_per_s=1e9, op_overhead_s=2e-6, overhead_s=1e-5)
    flops = {"dot": 3e9, "conv": 2e8, "conv_wgrad": 1e7, "elementwise": 1e6}
    expected32 = 3e9 / 1e11 + 2e8 / 1e10 + 1e7 / 1e9 + 1e6 / 1e8 + 5e6 / 1e9 + 10 * 2e-6 + 1e-5
    assert cost.predict_seconds(flops, 5e6, 10, 4, cal) == pytest.approx(expected32)
    expected64 = (3e9 / 1e11 + 2e8 / 1e10 + 1e7 / 1e9 + 1e6 / 1e8) * 4 + 5e6 / 1e9 + 10 * 2e-6 + 1e-5
    assert cost.predict_seconds(flops, 5e6, 10, 8, cal) == pytest.approx(expected64)

    params = {"c": jnp.ones((3, 3, 2, 4), jnp.float32) / 6, "w": jnp.ones((4, 3), jnp.float32)}
    f = lambda p, x: jnp.tanh(_conv(x, p["c"], "SAME")).mean(axis=(1, 2)) @ p["w"]  # noqa: E731
    x = jnp.ones((2, 5, 5, 2), jnp.float32)
    est = cost.estimate(f, x, None, params, {}, Strategy.JACOBIAN_CONTRACTION,
                        {"trace_axes": (), "diagonal_axes": (), "vmap_axes": 0}, cal=cal)
    by_class = est.flops_by_class
    assert by_class["conv"] > 0 and by_class["conv_wgrad"] > 0 and by_class["dot"] > 0
    assert sum(by_class.values()) == pytest.approx(est.flops)  # the rest is XLA's remainder
    assert est.predicted_s == pytest.approx(
        cost.predict_seconds(by_class, est.bytes_accessed, est.n_ops, 4, cal))
