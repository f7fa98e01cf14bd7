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


class QuantLinear(torch.autograd.Function):
    """Old-style, several inputs and outputs: a parameter passed in directly, a float argument,
    saved tensors, a ctx attribute; the backward is not the derivative of the forward (rounding,
    a mask output, a halved input gradient), so only the Function's own rule gives torch's kernel."""

    @staticmethod
    def forward(ctx, x, w, scale):
        ctx.save_for_backward(x, w)
        ctx.half = 0.5
        return torch.round(x @ w.t() * scale) / scale, (x.abs() > 0.5).to(x.dtype)

    @staticmethod
    def backward(ctx, g, g_mask):
        x, w = ctx.saved_tensors
        return ctx.half * g @ w, g.t() @ x, None


class QuantLinearNew(torch.autograd.Function):
    """The same as a new-style Function, its mask output marked non-differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, scale):
        return torch.round(x @ w.t() * scale) / scale, (x.abs() > 0.5).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, g, g_mask):
        x, w = ctx.saved_tensors
        return 0.5 * g @ w, g.t() @ x, None


class CubeOnce(torch.autograd.Function):
    """A `@once_differentiable` backward, and another Function applied inside the forward (where
    autograd does not record it: only this Function's backward counts)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3 + RoundSTE.apply(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g + 0.25 * g


class QuantLinearNet(_TwoLayer):
    def __init__(self, function):
        super().__init__()
        self.function = function
        self.w = nn.Parameter(torch.randn(5, 4))
        self.c = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        y, mask = self.function.apply(h, self.w, 4.0)
        return self.c(torch.tanh(y)) * (1 + mask.sum(-1, keepdim=True))


@pytest.mark.parametrize("make", [lambda: QuantNet(RoundSTE), lambda: QuantNet(OldStyleRoundSTE),
                                  lambda: QuantLinearNet(QuantLinear),
                                  lambda: QuantLinearNet(QuantLinearNew), lambda: QuantNet(CubeOnce)],
                         ids=["ste", "ste-old-style", "quant-linear-old-style", "quant-linear",
                              "once-differentiable-nested"])
def test_custom_function_keeps_its_backward_in_export_mode(make):
    """Every strategy, the default mode included (no fall-back), against eager torch.autograd; and a
    batch size the conversion did not see (its forward and backward are exported again)."""
    module, x = _build(make)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportFallbackWarning)
        model = from_torch(module, x)
    assert model.info["mode"] == "export" and "entk_autograd.apply.default" in model.info["ops"]
    reference = torch_func_ntk(module, x, None, eager=True)
    assert np.abs(reference).max() > 1e-3
    for implementation in EXPORT_STRATEGIES:
        kernel = np.asarray(entk.ntk(model, x, implementation=implementation))
        assert np.abs(kernel - reference).max() <= TOL * np.abs(reference).max(), implementation
    x5 = torch.randn(5, 3, dtype=torch.float64)
    kernel = np.asarray(entk.ntk(model, x5, implementation="jc"))
    reference = torch_func_ntk(module, x5, None, eager=True)
    assert np.abs(kernel - reference).max() <= TOL * np.abs(reference).max()


def test_custom_function_rule_changes_the_kernel():
    """Differentiating the Function's forward instead (what export mode did before) is wrong here."""
    module, x = _build(lambda: QuantLinearNet(QuantLinearNew))
    ours = np.asarray(entk.ntk(from_torch(module, x, mode="export"), x, implementation="jc"))
    assert np.abs(ours - torch_func_ntk(module, x, None)).max() <= TOL * np.abs(ours).max()

    class Inlined(QuantLinearNet):
        def forward(self, x):
            h = torch.tanh(self.a(x))
            y = torch.round(h @ self.w.t() * 4.0) / 4.0
            return self.c(torch.tanh(y)) * (1 + (h.abs() > 0.5).to(h.dtype).sum(-1, keepdim=True))

    inlined = Inlined(QuantLinearNew).double()
    inlined.load_state_dict(module.state_dict())
    wrong = torch_func_ntk(inlined, x, None)
    assert np.abs(ours - wrong).max() > 1e-2 * np.abs(wrong).max()


class ClosureScale(torch.autograd.Function):
    """Reads a module parameter it is not given (through a closure over the module)."""

    generate_vmap_rule = True
    owner = None

    @staticmethod
    def forward(x):
        return x * ClosureScale.owner.scale

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * ClosureScale.owner.scale


class ClosureNet(_TwoLayer):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))
        ClosureScale.owner = self

    def forward(self, x):
        return self.b(ClosureScale.apply(torch.tanh(self.a(x))))


def test_function_reading_parameters_by_closure_is_refused_and_auto_uses_the_bridge():
    """Export would freeze the parameter's value into the translation: refused, naming the Function;
    `mode="auto"` falls back to the bridge, whose torch.func kernel is torch's."""
    module, x = _build(ClosureNet)
    with pytest.raises(torch_export.AutogradFunctionError) as info:
        from_torch(module, x, mode="export")
    message = str(info.value)
    assert "test_torch_autograd.ClosureScale" in message and "module '<root>'" in message
    assert "not among its inputs" in message and "mode='bridge'" in message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = from_torch(module, x, mode="auto")
    fallbacks = [w for w in caught if issubclass(w.category, ExportFallbackWarning)]
    assert len(fallbacks) == 1 and "ClosureScale" in str(fallbacks[0].message)
    assert model.info["mode"] == "bridge"
    _assert_kernel(module, model, x, BRIDGE_STRATEGIES)


@pytest.mark.parametrize("make", [NoGradBlock, DetachBranch])
def test_bridge_mode_keeps_no_grad_and_detach(make):
    """torch.func.jvp ignores no_grad blocks (forward AD does not honour grad mode): the bridge's probe
    notices that forward mode disagrees with reverse mode and computes JVPs by double VJP instead."""
    module, x = _build(make)
    model = from_torch(module, x, mode="bridge")
    expected = "double vjp" if make is NoGradBlock else "torch.func.jvp"
    assert model.info["forward_mode"].method == expected
    _assert_kernel(module, model, x, BRIDGE_STRATEGIES)


def test_old_style_custom_function_is_refused_by_bridge_mode():
    module, x = _build(lambda: QuantNet(OldStyleRoundSTE))
    with pytest.raises(torch_export.OldStyleAutogradFunctionError) as info:
        from_torch(module, x, mode="bridge")
    message = str(info.value)
    assert "test_torch_autograd.OldStyleRoundSTE" in message
    assert "module 'quant' (Quantizer)" in message and "mode='export'" in message


class ReentrantCheckpoint(_TwoLayer):
    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Linear(4, 4), nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        inner = torch.utils.checkpoint.checkpoint(lambda v: torch.tanh(self.c(v)), h, use_reentrant=True)
        # no input of this one requires grad: PyTorch gives `d` no gradient
        skip = torch.utils.checkpoint.checkpoint(lambda v: self.d(v), x, use_reentrant=True)
        return self.b(inner) + skip


def test_reentrant_checkpoint_exports_with_pytorchs_gradients():
    """`checkpoint(..., use_reentrant=True)` is an old-style Function reading the parameters by
    closure: export mode traces through it, with PyTorch's gradients (none for the parameters of a
    checkpoint none of whose inputs requires grad, with a warning); eager torch.autograd is the
    reference (torch.func cannot run it)."""
    module, x = _build(ReentrantCheckpoint)
    with pytest.warns(UserWarning, match="use_reentrant=False"):
        model = from_torch(module, x)
    assert model.info["mode"] == "export"
    params = list(module.parameters())
    with pytest.warns(UserWarning, match="None of the inputs"):  # PyTorch's own warning
        out = module(x)
    rows = []
    for i in range(3):
        for k in range(2):
            module.zero_grad(set_to_none=True)
            out[i, k].backward(retain_graph=True)  # the reentrant form refuses torch.autograd.grad
            rows.append(torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                                   for p in params]))
    jac = torch.stack(rows).reshape(3, 2, -1)
    assert not jac[:, :, -8:].any()  # d's weight and bias: no gradient in PyTorch
    reference = (torch.einsum("ikp,jkp->ij", jac, jac) / 2).detach().numpy()
    assert np.abs(reference).max() > 1e-3
    for implementation in ("jc", "sd"):
        kernel = np.asarray(entk.ntk(model, x, implementation=implementation))
        assert np.abs(kernel - reference).max() <= TOL * np.abs(reference).max()


class OldStyleClosureScale(torch.autograd.Function):
    owner = None

    @staticmethod
    def forward(ctx, x):
        return x * OldStyleClosureScale.owner.scale

    @staticmethod
    def backward(ctx, g):
        return g * OldStyleClosureScale.owner.scale


class OldStyleClosureNet(ClosureNet):
    def __init__(self):
        super().__init__()
        OldStyleClosureScale.owner = self

    def forward(self, x):
        return self.b(OldStyleClosureScale.apply(torch.tanh(self.a(x))))


def test_auto_mode_names_both_failures_when_neither_mode_can_run_the_model():
    """An old-style Function export mode cannot keep: auto's bridge cannot run it either, and the
    error says why each mode failed (not just "use export mode")."""
    module, x = _build(OldStyleClosureNet)
    with pytest.raises(torch_export.OldStyleAutogradFunctionError) as info:
        from_torch(module, x, mode="auto")
    message = str(info.value)
    assert message.startswith("export mode failed") and "not among its inputs" in message
    assert "bridge mode cannot run this model either" in message
    assert "test_torch_autograd.OldStyleClosureScale" in message
