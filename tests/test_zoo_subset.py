"""One small model per zoo family, exported to JAX: outputs and eNTK against PyTorch, float64.

The representative subset of `benchmarks/model_zoo.py` (which sweeps ~190 models and is too long for
the unit suite): each model is built from its library at a tiny size (random init, no downloads),
exported without falling back to the bridge, and its outputs and eNTK (Jacobian contraction, every
parameter) compared with PyTorch's own (`torch.func.jacrev` in float64, `tests/torch_reference.py`).
Families already covered elsewhere (torchvision ConvNeXt, Hugging Face Swin: `test_torch_as_strided.py`)
are not repeated.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import entk  # noqa: E402
from entk.adapters.torch import ExportFallbackWarning, from_torch, to_jax  # noqa: E402
from tests.torch_reference import torch_func_ntk  # noqa: E402


class Head(nn.Module):
    """The zoo sweep's wrapper: `y[:, :3] + mean(y)` of the flattened main output y, (N, 3)."""

    def __init__(self, model: nn.Module, call):
        super().__init__()
        self.model, self.call = model, call

    def forward(self, x):
        y = self.call(self.model, x)
        y = y.reshape(y.shape[0], -1)
        return y[:, :3] + y.mean(1, keepdim=True)


def _check(module: nn.Module, x: torch.Tensor, tol: float = 1e-10, eager: bool = False) -> None:
    """Exports `module` (no fall-back), then outputs and the eNTK against torch in float64, within
    `tol` relative to the largest entry (`eager`: the reference from eager torch.autograd, for
    models torch.func cannot transform)."""
    module = module.double().eval()
    if x.is_floating_point():
        x = x.double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportFallbackWarning)
        model = from_torch(module, x)
    assert model.info["mode"] == "export"
    with torch.no_grad():
        expected = module(x).numpy()
    assert np.max(np.abs(expected)) > 1e-3  # a non-trivial output
    xj = to_jax(x)
    kernel_fn = entk.empirical_ntk_fn(model, implementation="jc")
    out, kernel = jax.jit(lambda p, a: (model.apply(p, a), kernel_fn(a, None, p)))(model.params, xj)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=tol * np.max(np.abs(expected)))
    reference = torch_func_ntk(module, x, None, eager=eager)
    assert kernel.shape == reference.shape == (x.shape[0], x.shape[0])
    np.testing.assert_allclose(np.asarray(kernel), reference, rtol=0,
                               atol=tol * np.max(np.abs(reference)))


def _hf(model_cls: str, config_cls: str, **config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()


TEXT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=24, max_position_embeddings=32)


def test_hf_bloom_old_style_autograd_function():
    """Bloom's GeLU is an old-style custom `autograd.Function` (`GeLUFunction`, a hand-written
    tanh-GeLU derivative): exported with its own backward (torch.func cannot run it at all)."""
    bloom = _hf("BloomModel", "BloomConfig", vocab_size=50, hidden_size=16, n_layer=1, n_head=2)
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    _check(Head(bloom, lambda m, v: m(input_ids=v).last_hidden_state), tokens, eager=True)


def test_hf_llama_decoder():
    """Rotary embeddings, grouped-query attention, RMSNorm, causal mask. Llama computes its
    rotary angles in float32 whatever the model's dtype (`.float()`, autocast off), so torch and
    XLA's float32 sin/cos set the tolerance."""
    llama = _hf("LlamaModel", "LlamaConfig", **TEXT, num_key_value_heads=1)
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    _check(Head(llama, lambda m, v: m(input_ids=v).last_hidden_state), tokens, tol=1e-5)


def test_hf_t5_encoder_decoder():
    """Relative position buckets, cross-attention, T5's RMS layer norm (which takes its variance in
    float32 whatever the model's dtype: that sets the tolerance)."""
    t5 = _hf("T5Model", "T5Config", vocab_size=50, d_model=16, d_kv=8, d_ff=24, num_layers=1,
             num_heads=2)
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    _check(Head(t5, lambda m, v: m(input_ids=v, decoder_input_ids=v).last_hidden_state), tokens,
           tol=1e-5)


def test_hf_wav2vec2_audio():
    """A strided conv feature extractor with group norm, a weight-normalized positional conv."""
    wav2vec = _hf("Wav2Vec2Model", "Wav2Vec2Config", hidden_size=16, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=24, conv_dim=(8, 8), conv_stride=(5, 2),
                  conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)
    audio = torch.randn(2, 200, generator=torch.Generator().manual_seed(1))
    _check(Head(wav2vec, lambda m, v: m(input_values=v).last_hidden_state), audio)


def test_timm_vit():
    """A timm ViT (patch embedding, class token, learned positions, pre-norm blocks)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=5)
    _check(Head(vit, lambda m, v: m(v)), torch.randn(2, 3, 16, 16))


def test_torchvision_mobilenet_v3():
    """Depthwise convs, squeeze-excitation, hardswish, BatchNorm on running statistics (set to
    trained-looking values, read from the buffers at every call), the first four blocks."""
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    net = models.mobilenet_v3_small(width_mult=0.25, num_classes=5)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    _check(Head(net.features[:5], lambda m, v: m(v)), torch.randn(2, 3, 32, 32))
