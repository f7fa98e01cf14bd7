"""Convolutions on feature maps no larger than their kernel, in export mode.

Where a kernel's window spans the whole input or output map (a 3x3 kernel on the 2x2 and 1x1 maps of
a ResNet's last stages on small images), `aten.convolution` is translated as one matrix product over
(input channel, kernel tap) (`entk/adapters/torch/aten_nn.py::_conv_by_taps`) instead of a
convolution, which XLA:CPU differentiates on a slow path. It must be the same function with the same
derivatives: values against torch and the eNTK of every strategy against torch.func, in float64, on
each form the rule accepts (the window spanning the input, or only the output through a stride;
dilation; no bias; 1-D and 3-D), with an ordinary convolution on a larger map beside them.
"""

from __future__ import annotations

import importlib.util

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import entk  # noqa: E402
from entk.adapters.torch import from_torch, to_jax  # noqa: E402
from tests.torch_reference import assert_strategies_match, torch_func_ntk  # noqa: E402

HAS_SD = importlib.util.find_spec("entk.algorithms.structured") is not None
STRATEGIES = ("jc", "ntvp", "sd") if HAS_SD else ("jc", "ntvp")


class SmallMaps(nn.Module):
    """x (N, 3, 4, 4) → a convolution on the 4x4 map (stays one), then convolutions whose 3x3
    windows span their maps: 4x4 → 2x2 through stride 2 (the output is spanned), 2x2 → 2x2, 2x2 →
    1x1 (stride 2, no bias), 1x1 → 1x1 dilated; a 1-D one on length 2 and a 3-D one on 3x2x1."""

    def __init__(self):
        super().__init__()
        self.big = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.same = nn.Conv2d(5, 6, 3, padding=1)
        self.last = nn.Conv2d(6, 4, 3, stride=2, padding=1, bias=False)
        self.dilated = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.line = nn.Conv1d(2, 3, 3, padding=1)
        self.volume = nn.Conv3d(1, 2, 3, padding=1)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.tanh(self.big(x))
        h = torch.tanh(self.down(h))
        h = torch.tanh(self.same(h))
        h = torch.tanh(self.last(h))
        h = torch.tanh(self.dilated(h))                      # (N, 4, 1, 1)
        h = torch.tanh(self.line(h.reshape(-1, 2, 2)))       # (N, 3, 2)
        h = torch.tanh(self.volume(h.reshape(-1, 1, 3, 2, 1)))  # (N, 2, 3, 2, 1)
        return self.head(h.flatten(1))


def _primitives(model, x) -> list[str]:
    jaxpr = jax.make_jaxpr(model.apply)(model.params, to_jax(x))
    return [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]


def test_small_map_convolutions_match_torch_and_torch_func_fp64():
    torch.manual_seed(0)
    module = SmallMaps().double().eval()
    x1 = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    x2 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    model = from_torch(module, x1)
    assert model.info["mode"] == "export"
    # Only the convolution on the 4x4 map is left a convolution; the six others are products.
    assert _primitives(model, x1).count("conv_general_dilated") == 1
    with torch.no_grad():
        expected = module(x1).numpy()
    np.testing.assert_allclose(np.asarray(model(to_jax(x1))), expected, rtol=0, atol=1e-12)
    assert_strategies_match(model, x1, x2, torch_func_ntk(module, x1, x2), STRATEGIES, vmap_axes=0)


def test_entk_ntk_proves_small_map_models_per_example():
    """`vmap_axes="auto"` still proves the translated model batch-independent (the patches are a
    `jnp.stack`, which the batch-independence analysis has a rule for) and gives torch.func's
    kernel."""
    torch.manual_seed(1)
    module = SmallMaps().double().eval()
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    from entk.algorithms import batch_independence

    model = from_torch(module, x)
    verdict = batch_independence.analyse(model.apply, to_jax(x), model.params, {}, 0, {},
                                         lambda *_: "")
    assert verdict.independent, verdict.reason
    kernel = entk.ntk(module, x)
    np.testing.assert_allclose(kernel.numpy(), torch_func_ntk(module, x, None), rtol=0,
                               atol=1e-10 * float(kernel.abs().max()))
