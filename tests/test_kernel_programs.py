"""`entk.ntk`'s compiled programs (`entk/kernel_programs.py`): auto's winner is run as select lowered it,
its compilation started while the other candidates lower, and the result is the exact kernel."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import entk
from entk.algorithms import Strategy, background, cost, device
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
    compiled, _ = cost._compile_in_background(lowered).result()
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
