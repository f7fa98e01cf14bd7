"""`aten.as_strided` in export mode, and the first line of the export fall-back warning.

`torch.as_strided` reaches exported graphs directly and through PyTorch's own decompositions:
`AdaptiveAvgPool2d` on a channels-last (permuted) tensor, as in torchvision's ConvNeXt, restrides
its result with it. The translation (`entk/adapters/torch/aten_strided.py`) must reproduce the
values (checked against torch) and the derivatives (the eNTK against `torch.func.jacrev`, float64,
for Jacobian contraction and structured derivatives), including a view of a non-contiguous input,
whose strides refer to the storage of the tensor it views.
"""

from __future__ import annotations

import importlib.util
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from entk.adapters.torch import ExportFallbackWarning, from_torch, to_jax  # noqa: E402
from entk.adapters.torch.aten_strided import gather_view, strided_index  # noqa: E402
from tests.torch_reference import assert_strategies_match, torch_func_ntk  # noqa: E402

HAS_SD = importlib.util.find_spec("entk.algorithms.structured") is not None
STRATEGIES = ("jc", "sd") if HAS_SD else ("jc",)


class DirectAsStrided(nn.Module):
    """`torch.as_strided` called by hand: a transpose, then a strided slice with an offset of that
    (non-contiguous) view, then an overlapping sliding window."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 12)
        self.out = nn.Linear(6 + 8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))                                # (N, 12)
        n = h.shape[0]
        t = torch.as_strided(h, (n, 4, 3), (12, 1, 4))             # (N, 4, 3): h.view(N, 3, 4).mT
        s = torch.as_strided(t, (n, 2, 3), (12, 1, 4), 1)          # rows 1..2 of t
        w = torch.as_strided(h, (n, 4, 2), (12, 2, 1), 2)          # overlapping windows
        return self.out(torch.cat([s.reshape(n, -1), w.reshape(n, -1)], dim=1))


class InPlaceOnStridedView(nn.Module):
    """An in-place op on a strided view and `torch.as_strided_scatter`: export functionalizes both
    into `aten.as_strided_scatter`.

    PyTorch's own backward of `as_strided_scatter` is wrong here (`torch.autograd.gradcheck` fails
    on it; the translation agrees with finite differences), so the reference eNTK comes from
    `indexed=True`, the same function written with an indexed assignment.
    """

    def __init__(self, indexed: bool = False):
        super().__init__()
        self.indexed = indexed
        self.inp = nn.Linear(5, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        h = self.inp(x).clone()
        n = h.shape[0]
        torch.as_strided(h, (n, 3, 2), (12, 4, 1), 1).mul_(3.0)
        if self.indexed:
            u = h.clone()
            u[:, [0, 5]] = torch.tanh(h[:, :2])
        else:
            u = torch.as_strided_scatter(h, torch.tanh(h[:, :2]), (n, 2), (12, 5), 0)
        return self.out(torch.sin(h + u))


class ChannelsLastPool(nn.Module):
    """ConvNeXt's head: a conv, a channels-last block, AdaptiveAvgPool2d of the permuted tensor."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.LayerNorm(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv(x).permute(0, 2, 3, 1)                       # (N, H, W, C)
        h = self.norm(h).permute(0, 3, 1, 2)                       # channels-last memory
        return self.head(self.pool(h).flatten(1))


def _forward(model, x):
    """The converted model's output, compiled at XLA's lowest optimization level (for these larger
    graphs compiling, not running, is what costs time on a test machine)."""
    args = (model.params, to_jax(x))
    compiled = jax.jit(model.apply).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    return np.asarray(compiled(*args))


def _export_without_fallback(module, x):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportFallbackWarning)
        model = from_torch(module, x, batch_axis=0)
    assert model.info["mode"] == "export"
    return model


@pytest.mark.parametrize("make, shape", [(DirectAsStrided, (5,)), (InPlaceOnStridedView, (5,)),
                                         (ChannelsLastPool, (2, 4, 5))],
                         ids=["direct", "scatter", "channels_last_pool"])
def test_as_strided_exports_and_matches_torch_fp64(make, shape):
    torch.manual_seed(0)
    module = make().double().eval()
    x1 = torch.randn(3, *shape, dtype=torch.float64)
    x2 = torch.randn(2, *shape, dtype=torch.float64)
    model = _export_without_fallback(module, x1)
    with torch.no_grad():
        expected = module(x1).numpy()
    np.testing.assert_allclose(np.asarray(model(to_jax(x1))), expected, rtol=0, atol=1e-12)
    if make is InPlaceOnStridedView:  # PyTorch's as_strided_scatter backward is wrong (above)
        indexed = InPlaceOnStridedView(indexed=True).double().eval()
        indexed.load_state_dict(module.state_dict())
        with torch.no_grad():
            np.testing.assert_allclose(indexed(x1).numpy(), expected, rtol=0, atol=1e-12)
        reference = torch_func_ntk(indexed, x1, x2)
    else:
        reference = torch_func_ntk(module, x1, x2)
    assert_strategies_match(model, x1, x2, reference, STRATEGIES)


def test_strided_views_become_view_ops_and_other_layouts_a_gather():
    """Random layouts against torch.as_strided; a permutation / slice / broadcast is emitted as view
    ops (no gather, so structured derivatives see a view), an overlapping window as one gather."""
    base = torch.arange(120.0, dtype=torch.float64).reshape(2, 3, 4, 5)
    cases = [  # (input, size, stride, offset, is a plain view)
        (base, (2, 3, 1, 1), (60, 20, 60, 60), 0, True),
        (base, (2, 5, 3, 4), (60, 1, 20, 5), 0, True),
        (base, (2, 3, 2, 5), (60, 20, 10, 1), 0, True),
        (base, (3, 4), (20, 5), 7, True),
        (base, (4, 3), (0, 1), 0, True),
        (base, (5, 3), (2, 3), 0, False),
        (base.permute(0, 3, 1, 2), (2, 3, 4, 5), (60, 20, 5, 1), 0, True),  # undoes the permute
        (base[:, 1:], (4, 5), (5, 1), None, True),
        (base.transpose(2, 3), (3, 7), (7, 1), 3, False),
    ]
    for x, size, stride, offset, is_view in cases:
        off = x.storage_offset() if offset is None else offset
        expected = torch.as_strided(x, size, stride, off).numpy()
        index = strided_index(x.shape, x.stride(), x.storage_offset(), size, stride, off)
        value = jnp.asarray(x.contiguous().numpy())
        np.testing.assert_array_equal(np.asarray(gather_view(value, index)), expected)
        jaxpr = str(jax.make_jaxpr(lambda v: gather_view(v, index))(value))  # nested jaxprs too
        assert ("gather" not in jaxpr) == is_view, (size, stride, jaxpr)


def test_view_outside_the_input_is_refused_naming_the_node():
    class Outside(nn.Module):
        def forward(self, x):
            return torch.as_strided(x[:, :2], (2, 4), (4, 1))   # reads past the slice it views

    with pytest.raises(Exception, match=r"aten\.as_strided.*no element of its input"):
        from_torch(Outside(), torch.randn(2, 4), mode="export", batch_axis=None)


class Bessel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x):
        return torch.special.bessel_j0(self.layer(x))


def test_fallback_warning_names_the_op_and_module_on_its_first_line():
    pytest.importorskip("entk.adapters.torch.bridge")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_torch(nn.Sequential(nn.Linear(3, 3), Bessel()), torch.randn(2, 3), batch_axis=None)
    fallbacks = [w for w in caught if issubclass(w.category, ExportFallbackWarning)]
    assert len(fallbacks) == 1
    first = str(fallbacks[0].message).splitlines()[0]
    assert first.startswith("entk.from_torch: no JAX translation for aten.special_bessel_j0")
    assert "'1'" in first and "test_torch_as_strided.py" in first and "bridge mode" in first


def test_torchvision_convnext_exports_and_matches_torch():
    """ConvNeXt-tiny end to end at 32x32 (float32): its head pools a channels-last tensor."""
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    module = models.convnext_tiny(num_classes=10).eval()
    with torch.no_grad():  # layer scale starts at 1e-6 (every block ~identity): make blocks count
        for name, p in module.named_parameters():
            if name.endswith("layer_scale"):
                p.fill_(0.1)
    x = torch.randn(1, 3, 32, 32)
    model = from_torch(module, x, mode="export", batch_axis=None)
    with torch.no_grad():
        expected = module(x).numpy()
    assert np.max(np.abs(expected)) > 0.1  # a non-trivial output
    np.testing.assert_allclose(_forward(model, x), expected, rtol=0, atol=1e-4)


def test_huggingface_swin_exports_and_matches_torch():
    """A two-stage Swin (window partitioning, shifted windows) exports instead of falling back."""
    transformers = pytest.importorskip("transformers")
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                     num_heads=[2, 2], window_size=4, num_labels=3)
    torch.manual_seed(0)
    swin = transformers.SwinForImageClassification(config).double().eval()

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.swin = swin

        def forward(self, x):
            return self.swin(pixel_values=x).logits

    module = Logits()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model = _export_without_fallback(module, x)
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(_forward(model, x), expected, rtol=0, atol=1e-10)
