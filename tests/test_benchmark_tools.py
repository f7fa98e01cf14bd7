"""The peer benchmark's own logic: shared parameters between the tools, and the report's arithmetic."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import networks, report


def test_set_leaves_takes_the_other_tools_bias_layout():
    """neural-tangents keeps biases as (1, C), entk as (C,): the values must land unchanged."""
    params = ((jnp.zeros((4, 3)), jnp.zeros((3,))), ())
    leaves = [np.arange(12.0).reshape(4, 3), np.array([[7.0, 8.0, 9.0]])]
    out = networks.set_leaves(params, leaves)
    np.testing.assert_array_equal(out[0][0], leaves[0])
    assert out[0][1].shape == (3,)
    np.testing.assert_array_equal(out[0][1], [7.0, 8.0, 9.0])
    with pytest.raises(ValueError, match="parameter leaf 1"):
        networks.set_leaves(params, [leaves[0], np.zeros(4)])
    with pytest.raises(ValueError, match="2 leaves here, 1 given"):
        networks.set_leaves(params, leaves[:1])


def _case(name: str, ratios: dict) -> dict:
    strategies = {}
    for strategy in report.STRATEGIES:
        if strategy in ratios:
            strategies[strategy] = {"entk": {"median_s": ratios[strategy], "compile_s": 1.0},
                                    "nt": {"median_s": 1.0, "compile_s": 1.0},
                                    "entk_over_nt": ratios[strategy], "skipped": None}
        else:
            strategies[strategy] = {"skipped": "predicted too slow"}
    return {"case": name, "n_params": 10, "strategies": strategies}


def test_summary_counts_and_geometric_means():
    rep = {"jax": [_case("a", {"jc": 0.5, "ntvp": 2.0, "sd": 0.25, "auto": 0.25}),
                   _case("b", {"jc": 2.0, "sd": 1.0, "auto": 0.5})], "torch": []}
    summary = report.ratio_summary(rep)
    assert summary["jc"]["cases"] == 2 and summary["jc"]["no_slower"] == 1
    assert math.isclose(summary["jc"]["geomean"], 1.0)
    assert summary["ntvp"]["cases"] == 1 and summary["ntvp"]["worst"] == 2.0
    assert math.isclose(summary["sd"]["geomean"], 0.5) and summary["sd"]["no_slower"] == 2
    table = "\n".join(report._summary_lines(rep) + report._jax_lines(rep))
    assert "| jc | 2 | 1/2 | 1.00 | 0.50 | 2.00 | **no** (1 above 1.0) |" in table
    assert "| sd | 2 | 2/2 | 0.50 | 0.25 | 1.00 | yes |" in table
    assert "| b | 10 | ntvp | skipped: predicted too slow |" in table
    assert "**2.00**" in table  # a ratio above 1.0 is flagged in the per-case table


@pytest.mark.parametrize("block", [1, 3])
def test_first_kernel_torch_func_tiles_give_the_whole_kernel(block):
    """`bench_first_kernel`'s torch.func reference made in tiles of examples (where its whole
    Jacobians do not fit) is the tutorial's whole-Jacobian kernel, with x2 = x1 and with another x2."""
    torch = pytest.importorskip("torch")
    from benchmarks import bench_torch
    from benchmarks.bench_first_kernel import _func_trace_kernel

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                                 torch.nn.Linear(7, 3)).double()
    params = {k: v.detach() for k, v in module.named_parameters()}
    f = bench_torch.single_example_fn(module)
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    for x2 in (x, y):
        whole = _func_trace_kernel(f, params, x, x2)
        assert whole.shape == (7, x2.shape[0])
        torch.testing.assert_close(_func_trace_kernel(f, params, x, x2, block), whole,
                                   rtol=1e-12, atol=1e-12)
