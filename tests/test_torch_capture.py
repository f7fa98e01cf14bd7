"""Dispatch capture (`entk/adapters/torch/dispatch_capture.py`): ordinary models are recorded from one
PyTorch run instead of torch.export, and the kernel is still torch's; what capture cannot record
exactly is refused (export mode then runs torch.export) without touching the module or its inputs.

References: torch.func's (or eager autograd's) float64 Jacobians of the module itself
(`tests/torch_reference.py`).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import entk  # noqa: E402
from entk.adapters.torch import dispatch_capture, from_torch  # noqa: E402
from tests.torch_reference import assert_strategies_match, torch_func_ntk  # noqa: E402


def _x(*shape):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


class Residual(nn.Module):
    """torchvision's habits: in-place ReLU, `out += identity`, BatchNorm in eval, pooling, flatten."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(3 * 2 * 2, 2)

    def forward(self, x):
        identity = self.relu(self.conv1(x))
        out = self.bn(self.conv2(identity))
        out += identity
        out = self.relu(out)
        return self.head(torch.flatten(nn.functional.max_pool2d(out, 2), 1))


class Literal(nn.Module):
    """A tensor made in forward (`torch.tensor`): a constant, recorded by value."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return torch.tanh(self.lin(x)) * torch.tensor([0.5, 2.0], dtype=x.dtype)


class NoGradView(nn.Module):
    """A view of a weight made under no_grad and used outside it: PyTorch gives it no gradient (the
    view is a leaf of its own), although it reports requires_grad=True."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        with torch.no_grad():
            frozen = self.a.weight.t()
        return self.b(torch.tanh(self.a(x) + x @ frozen))


class HooksAndParametrizations(nn.Module):
    """A weight-normed layer (its weight computed from two parameters in forward) and a forward hook."""

    def __init__(self):
        super().__init__()
        self.a = nn.utils.parametrizations.weight_norm(nn.Linear(3, 4))
        self.b = nn.Linear(4, 2)
        self.a.register_forward_hook(lambda module, args, out: torch.sin(out) + out)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class BranchesOnOne(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        if x.shape[0] == 1:
            return 2.0 * torch.tanh(self.lin(x))
        return torch.tanh(self.lin(x))


def _module(cls):
    torch.manual_seed(0)
    module = cls().double().eval()
    for b in module.buffers():
        if b.is_floating_point():
            b.uniform_(0.5, 1.5)
    return module


@pytest.mark.parametrize("cls, x_shape", [(Residual, (3, 2, 4, 4)), (Literal, (3, 3)),
                                          (NoGradView, (3, 3)), (HooksAndParametrizations, (3, 3))])
def test_captured_models_give_torchs_kernel(cls, x_shape):
    module, x = _module(cls), _x(*x_shape)
    model = from_torch(module, x, mode="export")
    assert model.info["program_cache"] == "captured"
    reference = torch_func_ntk(module, x, None, eager=cls is NoGradView)
    assert_strategies_match(model, x, None, reference, ("jc", "ntvp", "sd"))
    kernel = entk.ntk(module, x)  # the one-liner, defaults
    np.testing.assert_allclose(kernel.numpy(), reference, rtol=1e-10, atol=1e-12)


def test_each_input_shape_is_captured_as_pytorch_runs_it():
    """Shapes are static: the per-example batch of one is captured on its own, so a model that
    computes something else at batch size 1 gets that program (torch.func calls it on batches of one
    too)."""
    module, x = _module(BranchesOnOne), _x(4, 3)
    reference = torch_func_ntk(module, x, None)
    for vmap_axes in (0, "auto"):
        kernel = entk.ntk(module, x, vmap_axes=vmap_axes, implementation="jc")
        np.testing.assert_allclose(kernel.numpy(), reference, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- refusals


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)


class DataDependent(_Two):
    def forward(self, x):
        h = self.a(x)
        return self.b(h if h.sum() > 0 else -h)


class NumpyRead(_Two):
    def forward(self, x):
        scale = float(np.abs(x.detach().numpy()).max())
        return self.b(self.a(x) / scale)


class DataAttribute(_Two):
    def forward(self, x):
        return self.b(torch.tanh(x @ self.a.weight.data.t()))


class TensorAttribute(_Two):
    def __init__(self):
        super().__init__()
        self.scale = torch.full((4,), 0.5, dtype=torch.float64)

    def forward(self, x):
        return self.b(self.a(x) * self.scale)


class InPlaceOnInput(_Two):
    def forward(self, x):
        x.mul_(2.0)
        return self.b(self.a(x))


class WriteThroughView(_Two):
    """`view.mul_` changes `h` too; reading `h` afterwards needs functionalization."""

    def forward(self, x):
        h = self.a(x) + 1.0
        corner = h[:, :2]
        corner.mul_(3.0)
        return self.b(torch.tanh(h))


class InPlaceDetach(_Two):
    def forward(self, x):
        h = torch.tanh(self.a(x))
        g = 2 * h
        g.detach_()
        return self.b(h * g)


class ForcedBatchStatistics(_Two):
    """Batch norm forced into training mode in eval: PyTorch updates the running statistics."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        return self.b(nn.functional.batch_norm(self.a(x), self.mean, self.var, training=True))


class Random(_Two):
    def forward(self, x):
        return self.b(self.a(x) + 0 * torch.randn_like(self.a(x)))


class GradientHook(_Two):
    def forward(self, x):
        h = torch.tanh(self.a(x))
        h.register_hook(lambda g: 2 * g)
        return self.b(h)


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        return 3 * grad * ctx.saved_tensors[0]  # deliberately not the derivative of x²


class CustomFunction(_Two):
    def forward(self, x):
        return self.b(_Square.apply(self.a(x)))


class GradInForward(_Two):
    def forward(self, x):
        x = x.detach().requires_grad_(True)
        h = torch.tanh(self.a(x))
        (g,) = torch.autograd.grad(h.sum(), x, create_graph=True)
        return self.b(h) + g.sum(-1, keepdim=True)


REFUSED = [
    (DataDependent, "depends on tensor values"),
    (NumpyRead, "reads tensor data"),
    (DataAttribute, "reads tensor data"),
    (TensorAttribute, "outside its parameters and buffers"),
    (InPlaceOnInput, "parameter, buffer or input"),
    (WriteThroughView, "another view"),
    (InPlaceDetach, "autograd level"),
    (Random, "random"),
    (ForcedBatchStatistics, "running statistics"),
    (GradientHook, "autograd level"),
    (CustomFunction, "autograd Function or calls the autograd engine"),
    (GradInForward, "autograd"),
]


@pytest.mark.parametrize("cls, reason", REFUSED, ids=[c.__name__ for c, _ in REFUSED])
def test_what_capture_cannot_record_is_refused_untouched(cls, reason):
    module, x = _module(cls), _x(3, 3)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x_before = x.clone()
    with pytest.raises(dispatch_capture.Refused, match=reason):
        dispatch_capture.capture(module, (x,), {})
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("cls", [WriteThroughView, InPlaceDetach, TensorAttribute, CustomFunction])
def test_refused_models_still_give_torchs_kernel(cls):
    """torch.export takes over where capture refuses: the kernel is torch's, not the recording's."""
    module, x = _module(cls), _x(3, 3)
    model = from_torch(module, x, mode="export")
    assert model.info["program_cache"] != "captured"
    reference = torch_func_ntk(module, x, None)
    kernel = np.asarray(entk.ntk(model, x, implementation="jc"))
    np.testing.assert_allclose(kernel, reference, rtol=1e-10, atol=1e-12)


def test_capture_refused_when_asked_for_torch_export(monkeypatch):
    monkeypatch.setenv("ENTK_TORCH_CAPTURE", "export")
    module, x = _module(Literal), _x(3, 3)
    assert from_torch(module, x, mode="export").info["program_cache"] != "captured"


def test_a_fresh_process_computes_its_first_kernel_without_torch_dynamo(tmp_path):
    """What a user meets: `import torch, entk; entk.ntk(module, x)` in a new process. Capture keeps
    torch.export's ~1 s import of torch._dynamo out of it (checked before the reference is made)."""
    script = textwrap.dedent("""
        import json, sys
        import torch
        import entk
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(inplace=True),
                                     torch.nn.Linear(8, 3)).eval()
        x = torch.randn(4, 5)
        kernel = entk.ntk(module, x)
        dynamo = "torch._dynamo" in sys.modules
        from tests.torch_reference import torch_func_ntk
        reference = torch_func_ntk(module, x, None)
        print(json.dumps({"dynamo": dynamo, "kernel": kernel.tolist(), "reference": reference.tolist()}))
    """)
    env = {**os.environ, "ENTK_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=str(pathlib.Path(__file__).resolve().parents[1]), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["dynamo"] is False
    np.testing.assert_allclose(result["kernel"], result["reference"], rtol=1e-4, atol=1e-6)
