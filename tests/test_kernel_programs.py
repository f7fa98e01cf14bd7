"""`entk.ntk`'s compiled programs (`entk/kernel_programs.py`): auto's winner is run as select lowered it,
its compilation started while the other candidates lower, and the result is the exact kernel."""

from __future__ import annotations

import json
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import entk
from entk.algorithms import Strategy, background, compile_time, cost, device
from entk.algorithms.call import PreparedCall
from tests import jax_models
from tests.reference import assert_close, brute_force_ntk


@pytest.fixture
def fresh_decisions(monkeypatch, tmp_path):
    """No decision in memory or on disk: auto decides afresh."""
    monkeypatch.setattr(cost, "_DECISIONS", {})
    monkeypatch.setattr(cost.decision_cache, "directory", lambda: tmp_path / "decisions")


def _count_lowerings(monkeypatch) -> list:
    lowered: list = []
    real = cost.lower_strategy
    monkeypatch.setattr(cost, "lower_strategy",
                        lambda call, strategy, *a: lowered.append(strategy) or real(call, strategy, *a))
    return lowered


@pytest.mark.parametrize("name", ["mlp", "conv_nhwc", "dict_outputs"])
def test_first_call_runs_the_winner_as_auto_lowered_it(name, monkeypatch, fresh_decisions):
    """Every candidate is lowered once, the winner is not traced again, its compilation was started
    on the background worker (structured derivatives first), and the kernel is exact."""
    f, params, x1, x2 = jax_models.make(name)
    model = entk.Model.from_function(f, params)
    lowered = _count_lowerings(monkeypatch)
    submitted: list = []
    real_submit = background.submit
    monkeypatch.setattr(background, "submit",
                        lambda job: submitted.append(job) or real_submit(job))
    monkeypatch.setattr(PreparedCall, "run", lambda *a: pytest.fail("the strategy was traced again"))

    kernel = entk.ntk(model, x1, x2)

    assert lowered[0] is Strategy.STRUCTURED_DERIVATIVES
    assert len(lowered) == len(set(lowered))  # the winner was not lowered a second time
    assert submitted  # the first candidate's compilation (and maybe the calibration's warm-up)
    assert_close(kernel, brute_force_ntk(f, x1, x2, params))

    # Later calls with these shapes call the executable: nothing is lowered.
    lowered.clear()
    doubled = model.replace(params=jax.tree_util.tree_map(lambda p: 2 * p, params))
    assert_close(entk.ntk(doubled, x1, x2), brute_force_ntk(f, x1, x2, doubled.params))
    assert not lowered


def test_stored_decision_lowers_only_the_chosen_strategy(monkeypatch, fresh_decisions):
    f, params, x1, _ = jax_models.make("mlp")
    expected = brute_force_ntk(f, x1, None, params)
    assert_close(entk.ntk(entk.Model.from_function(f, params), x1), expected)
    chosen = set(cost._DECISIONS.values())
    monkeypatch.setattr(cost, "_DECISIONS", {})  # a new process: the decision is on disk only
    lowered = _count_lowerings(monkeypatch)
    g = lambda p, x: f(p, x)  # a new function: nothing of the first call's is reused in memory
    assert_close(entk.ntk(entk.Model.from_function(g, params), x1), expected)
    assert len(lowered) == 1 and set(lowered) == chosen


def test_under_jit_the_kernel_is_traced_into_the_callers_program():
    f, params, x1, x2 = jax_models.make("conv_nchw")
    model = entk.Model.from_function(f, params)
    kernel = jax.jit(lambda a, b, p: entk.ntk(model, a, b, params=p))(x1, x2, params)
    assert_close(kernel, brute_force_ntk(f, x1, x2, params))


def test_model_state_is_an_argument_not_a_constant():
    """Two models sharing an apply function and differing only in state share one program, and each
    call computes with its own state."""
    def apply(params, state, x):
        return jnp.tanh((x - state["shift"]) @ params["w"]) @ params["v"]

    params = {"w": jnp.asarray(np.linspace(-1, 1, 12).reshape(4, 3)),
              "v": jnp.asarray(np.linspace(1, -1, 6).reshape(3, 2))}
    x = jnp.asarray(np.linspace(-2, 2, 12).reshape(3, 4))
    for shift in (0.0, 0.7):
        state = {"shift": jnp.full((4,), shift)}
        model = entk.Model(apply, params, state)
        expected = brute_force_ntk(lambda p, x: apply(p, state, x), x, None, params)
        assert_close(entk.ntk(model, x, implementation="jc"), expected)
    from entk import empirical
    (programs,) = empirical._COMPILED[id(apply)][1].values()
    assert len(programs.executables) == 1


def test_background_compilation_keeps_the_callers_precision():
    """A program lowered in 64-bit mode, compiled on the worker thread, computes in float64."""
    f = lambda p, x: jnp.sin(x @ p)
    p = jnp.linspace(0.1, 1.0, 6, dtype=jnp.float64).reshape(3, 2)
    x = jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float64).reshape(2, 3)
    lowered = jax.jit(f).lower(p, x)
    est = cost.Estimate(Strategy.JACOBIAN_CONTRACTION, 0.0, 0.0, 0.0, 0.0, lowered=lowered)
    cost.compile_in_background(est)
    compiled = cost.compiled_program(est)
    out = compiled(p, x)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(out), np.sin(np.asarray(x) @ np.asarray(p)), rtol=1e-15)
    ran_on = background.submit(lambda: threading.current_thread().name).result()
    assert ran_on.startswith("entk-background")


def test_calibration_warm_up_compiles_what_the_measurement_runs(monkeypatch, tmp_path):
    """After `warm_up_in_background`, measuring the calibration compiles nothing more."""
    monkeypatch.setenv("ENTK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(device, "_CALIBRATIONS", {})
    monkeypatch.setattr(device, "_WARMING_UP", {})
    programs = [device._MATMUL, device._CONV, device._CONV_WGRAD, device._FUSED, device._ADD_ONE,
                device._CHAINED]
    for program in programs:
        program.clear_cache()
    device.warm_up_in_background()
    (warming,) = device._WARMING_UP.values()
    warming.result()
    sizes = [program._cache_size() for program in programs]
    assert all(sizes)
    cal = device.calibration()
    assert [program._cache_size() for program in programs] == sizes
    assert cal.flop_rate(4) > 0 and not device._WARMING_UP


class _FakeLowered:
    """A lowered program whose compilation reports what JAX's would: a compile duration, and a cache
    hit when it was read from the persistent cache."""

    def __init__(self, hit: bool):
        self.hit = hit

    def as_text(self) -> str:
        return "%0 = stablehlo.add %a, %b\n%1 = stablehlo.dot_general %0, %0\n"

    def compile(self) -> str:
        if self.hit:
            jax.monitoring.record_event("/jax/compilation_cache/cache_hits")
        jax.monitoring.record_event_duration_secs("/jax/core/compile/backend_compile_duration", 0.5)
        return "compiled"


def test_compile_rate_is_learned_from_real_compilations_only(monkeypatch, tmp_path):
    """Seconds per lowered operation, averaged over the compilations XLA really made (on the caller's
    thread or the background worker); cache reads and JAX's in-memory hits do not count."""
    monkeypatch.setenv("ENTK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compile_time, "_RATES", {})
    assert compile_time.predict_seconds(100) is None
    assert compile_time.compile_program(_FakeLowered(hit=False)) == "compiled"
    assert compile_time.predict_seconds(100) == pytest.approx(100 * 0.5 / 2)
    compile_time.compile_program(_FakeLowered(hit=True))  # a persistent-cache read
    (stored,) = tmp_path.glob("compile-rate-*.json")
    assert json.loads(stored.read_text()) == {"seconds_per_op": 0.25, "programs": 1}

    lowered = jax.jit(lambda u: jnp.tanh(u @ u.T) * 0.123).lower(jnp.ones((3, 3)))
    est = cost.Estimate(Strategy.JACOBIAN_CONTRACTION, 0.0, 0.0, 0.0, 0.0, lowered=lowered)
    cost.compile_in_background(est)
    assert callable(cost.compiled_program(est))
    assert json.loads(stored.read_text())["programs"] == 2
    compile_time.compile_program(lowered)  # compiled already: JAX's in-memory cache answers
    assert json.loads(stored.read_text())["programs"] == 2
    monkeypatch.setattr(compile_time, "_RATES", {})  # a new process reads the average back
    assert compile_time.predict_seconds(1) == json.loads(stored.read_text())["seconds_per_op"]


def test_first_call_takes_what_finishes_first_then_the_per_call_choice(monkeypatch, fresh_decisions):
    """JC is the per-call choice, but its compilation is predicted long and SD's short: the first call
    runs SD; JC compiles in the background and serves the calls after it is ready. Both exact."""
    f, params, x1, x2 = jax_models.make("conv_nhwc")
    model = entk.Model.from_function(f, params)
    run_s = {"sd": 1.0, "jc": 1e-3, "ntvp": 10.0}
    compile_s = {"sd": 0.0, "jc": 100.0, "ntvp": 100.0}
    real_estimate = cost.estimate

    def estimate(*args, **kwargs):
        est = real_estimate(*args, **kwargs)
        est.predicted_s = run_s[est.strategy.short_name]
        est.compile_predicted_s = compile_s[est.strategy.short_name]
        return est

    monkeypatch.setattr(cost, "estimate", estimate)
    expected = brute_force_ntk(f, x1, x2, params)
    assert_close(entk.ntk(model, x1, x2), expected)
    assert set(cost._DECISIONS.values()) == {Strategy.JACOBIAN_CONTRACTION}
    from entk import empirical
    (programs,) = empirical._COMPILED[id(model.apply_with_state)][1].values()
    ((signature, upgrade),) = programs.upgrades.items()
    assert upgrade.strategy is Strategy.JACOBIAN_CONTRACTION
    first = programs.executables[signature]
    upgrade.pending.result()  # wait for the background compilation
    assert_close(entk.ntk(model, x1, x2), expected)
    assert programs.executables[signature] is upgrade.compiled is not first
    assert not programs.upgrades
