"""PyTorch's autograd semantics survive conversion: entk never differentiates what torch would not.

Each model below changes its gradients with a PyTorch construct (`detach`, a `no_grad` or
`inference_mode` block, a custom `torch.autograd.Function`); entk's float64 eNTK of every applicable
strategy must equal the one torch.func's `jacrev` gives (`tests/torch_reference.py`) to ~1e-10, or
the conversion must be refused with an error naming the construct. Plain aliases and views must
keep their gradient.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import entk  # noqa: E402
from entk.adapters.torch import ExportFallbackWarning, from_torch  # noqa: E402
from entk.adapters.torch import export as torch_export  # noqa: E402
from tests.torch_reference import torch_func_ntk  # noqa: E402

TOL = 1e-10
EXPORT_STRATEGIES = ("jc", "ntvp", "sd", "auto")
BRIDGE_STRATEGIES = ("jc", "ntvp", "auto")


# ---------------------------------------------------------------- models


class _TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)


class DetachBranch(_TwoLayer):
    """A stop-gradient branch, the straight-through trick, and an ordinary view side by side."""

    def forward(self, x):
        h = torch.tanh(self.a(x))
        straight_through = h + (torch.round(3 * h) / 3 - h).detach()
        return self.b(h * h.detach() + straight_through + h.view(-1, 4))


class InPlaceDetach(_TwoLayer):
    """`t.detach_()`: uses of `t` before it keep their gradient, uses after it do not."""

    def forward(self, x):
        h = torch.tanh(self.a(x))
        g = 2 * h
        before = 3 * g[:, :2]  # saves no tensor: torch's backward refuses in-place detached saves
        g.detach_()
        return before + self.b(h * g)


class NoGradBlock(_TwoLayer):
    def forward(self, x):
        h = torch.tanh(self.a(x))
        with torch.no_grad():
            target = 2 * self.b(h)
        return self.b(h) * target


class InferenceModeBlock(_TwoLayer):
    """torch.func cannot transform this one: its reference comes from eager torch.autograd."""

    def forward(self, x):
        h = torch.tanh(self.a(x))
        with torch.inference_mode():
            target = 2 * self.b(h)
        return self.b(h) * target.clone()


class PlainAliases(_TwoLayer):
    """Views and aliases only: every one of them must keep its gradient."""

    def forward(self, x):
        h = torch.tanh(self.a(x))
        g = torch.ops.aten.alias.default(h)[:, :].view_as(h).reshape(-1, 4)
        return self.b(g * h.expand_as(h))


class RoundSTE(torch.autograd.Function):
    """Straight-through rounding: round forward, identity backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.round(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


class OldStyleRoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class Quantizer(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function.apply(3 * x) / 3


class QuantNet(_TwoLayer):
    def __init__(self, function):
        super().__init__()
        self.quant = Quantizer(function)

    def forward(self, x):
        return self.b(self.quant(torch.tanh(self.a(x))))


def _build(make):
    torch.manual_seed(0)
    module = make().double().eval()
    x = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return module, x


def _assert_kernel(module, model_or_module, x, strategies):
    reference = torch_func_ntk(module, x, None, eager=isinstance(module, InferenceModeBlock))
    assert np.abs(reference).max() > 1e-3
    for implementation in strategies:
        kernel = entk.ntk(model_or_module, x, implementation=implementation)
        kernel = np.asarray(kernel.numpy() if isinstance(kernel, torch.Tensor) else kernel)
        assert kernel.dtype == np.float64
        err = np.abs(kernel - reference).max() / np.abs(reference).max()
        assert err <= TOL, (type(module).__name__, implementation, err)


# ---------------------------------------------------------------- detach / no_grad / inference_mode


@pytest.mark.parametrize("make", [DetachBranch, InPlaceDetach, NoGradBlock, InferenceModeBlock,
                                  PlainAliases])
def test_export_kernel_matches_torch_autograd(make):
    module, x = _build(make)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportFallbackWarning)
        model = from_torch(module, x)  # what entk.ntk(module, ...) converts (and caches)
    assert model.info["mode"] == "export"
    assert ("aten.detach.default" in model.info["ops"]) == (make is not PlainAliases)
    _assert_kernel(module, module, x, EXPORT_STRATEGIES)


def test_stop_gradient_changes_the_kernel():
    """The constructs matter: differentiating through them gives another kernel (the old bug)."""
    module, x = _build(NoGradBlock)

    class Through(NoGradBlock):
        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h) * (2 * self.b(h))

    through = Through().double()
    through.load_state_dict(module.state_dict())
    ours = np.asarray(entk.ntk(from_torch(module, x, mode="export"), x, implementation="jc"))
    wrong = torch_func_ntk(through, x, None)
    assert np.abs(ours - wrong).max() > 1e-2 * np.abs(wrong).max()


def test_conversion_under_no_grad_keeps_gradients():
    """A caller inside `torch.no_grad()` still gets the model's own gradients."""
    module, x = _build(DetachBranch)
    with torch.no_grad():
        model = from_torch(module, x, mode="export", batch_axis=None)
    _assert_kernel(module, model, x, ("jc",))


def test_enable_grad_inside_no_grad_block():
    """torch.export splits nested grad modes into sequential blocks; only the no-grad ones stop
    gradients (here: the input side of `b`, not `b` itself)."""

    class Nested(_TwoLayer):
        def forward(self, x):
            with torch.no_grad():
                h = torch.tanh(self.a(x))
                with torch.enable_grad():
                    out = self.b(h)
            return out

    module, x = _build(Nested)
    _assert_kernel(module, from_torch(module, x, mode="export"), x, ("jc", "sd"))


# ---------------------------------------------------------------- custom autograd Functions


def test_custom_function_export_mode_is_refused():
    module, x = _build(lambda: QuantNet(RoundSTE))
    with pytest.raises(torch_export.AutogradFunctionError) as info:
        from_torch(module, x, mode="export")
    message = str(info.value)
    assert "test_torch_autograd.RoundSTE" in message
    assert "module 'quant' (Quantizer)" in message
    assert "mode='bridge'" in message


def test_custom_function_auto_mode_falls_back_to_bridge():
    module, x = _build(lambda: QuantNet(RoundSTE))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = from_torch(module, x, mode="auto")
    fallbacks = [w for w in caught if issubclass(w.category, ExportFallbackWarning)]
    assert len(fallbacks) == 1 and "RoundSTE" in str(fallbacks[0].message)
    assert model.info["mode"] == "bridge"
    _assert_kernel(module, model, x, BRIDGE_STRATEGIES)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportFallbackWarning)  # converted once: no second warning
        _assert_kernel(module, module, x, ("jc",))


@pytest.mark.parametrize("make", [NoGradBlock, DetachBranch])
def test_bridge_mode_keeps_no_grad_and_detach(make):
    """torch.func.jvp ignores no_grad blocks (forward AD does not honour grad mode): the bridge's probe
    notices that forward mode disagrees with reverse mode and computes JVPs by double VJP instead."""
    module, x = _build(make)
    model = from_torch(module, x, mode="bridge")
    expected = "double vjp" if make is NoGradBlock else "torch.func.jvp"
    assert model.info["forward_mode"].method == expected
    _assert_kernel(module, model, x, BRIDGE_STRATEGIES)


@pytest.mark.parametrize("mode", ["auto", "export", "bridge"])
def test_old_style_custom_function_is_refused(mode):
    module, x = _build(lambda: QuantNet(OldStyleRoundSTE))
    with pytest.raises(torch_export.OldStyleAutogradFunctionError) as info:
        from_torch(module, x, mode=mode)
    message = str(info.value)
    assert "test_torch_autograd.OldStyleRoundSTE" in message
    assert "module 'quant' (Quantizer)" in message and "setup_context" in message
