"""Export mode of the PyTorch adapter: torch.export → core ATen → plain JAX.

- Every model of the issue's coverage list runs through the translation (jitted once) and matches
  PyTorch's own forward pass in float32 to 1e-5 relative.
- On the small models, the float64 eNTK of every available strategy matches a torch.func reference
  (per-example `jacrev` under `vmap`, contracted by hand below) to 1e-10.
- Float32 eNTKs through a normalization's derivative (timm's weight-standardized convolutions) are as
  accurate as PyTorch's float32, i.e. `entk._xla_cpu`'s XLA:CPU work-around is in effect.
- Conversion details (parameter names, frozen/tied weights, buffers, train/eval mode, the conversion
  cache, torch tensors in and out) and the error messages.

Kept small for a shared 2-core machine: batch 1-3, tiny configs, one conversion and one jit per
model (module-scoped fixtures), static exports for the large networks.
"""

from __future__ import annotations

import importlib.util
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import entk  # noqa: E402
from entk.adapters.torch import ExportFallbackWarning, from_torch, to_jax, to_native  # noqa: E402
from entk.adapters.torch import export as torch_export  # noqa: E402
from tests.torch_reference import torch_func_ntk  # noqa: E402

HAS_SD = importlib.util.find_spec("entk.algorithms.structured") is not None


# ---------------------------------------------------------------- small models


class SmallCNN(nn.Module):
    """Conv2d, BatchNorm2d, ReLU, max/avg pooling, Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.avg(self.pool(torch.relu(self.bn(self.conv(x))))).flatten(1))


class Layers(nn.Module):
    """Op coverage: Conv1d/2d, ConvTranspose2d, BatchNorm1d/2d, GroupNorm, LayerNorm, max/avg pooling
    (ceil mode, padding), adaptive pooling, nearest and bilinear upsampling, Hardswish, GELU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, groups=1)
        self.bn = nn.BatchNorm2d(4)
        self.deconv = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.gn = nn.GroupNorm(2, 4)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.avgpool = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.nearest = nn.Upsample(scale_factor=2, mode="nearest")
        self.bilinear = nn.Upsample(size=(9, 7), mode="bilinear", align_corners=False)
        self.bilinear_ac = nn.Upsample(size=(9, 7), mode="bilinear", align_corners=True)
        self.adaptive_avg = nn.AdaptiveAvgPool2d((3, 2))
        self.adaptive_max = nn.AdaptiveMaxPool2d((2, 3))
        self.conv1d = nn.Conv1d(4, 5, 3, stride=2, padding=2, dilation=2)
        self.bn1d = nn.BatchNorm1d(5)
        self.ln = nn.LayerNorm(6)
        self.act = nn.Hardswish()

    def forward(self, x):
        h = self.act(self.bn(self.conv(x)))
        h = self.gn(self.deconv(h))
        h = self.avgpool(self.maxpool(h))
        h = self.nearest(h)
        h = self.bilinear(h) + 0.5 * self.bilinear_ac(h)
        a = self.adaptive_avg(h).flatten(2)
        m = self.adaptive_max(h).flatten(2)
        s = self.bn1d(self.conv1d(torch.cat([a, m], dim=2)))
        return self.ln(nn.functional.gelu(s))


class OpZoo(nn.Module):
    """Less common ops in one graph: padding modes, pixel (un)shuffle, nearest-exact resizing,
    top-k, sort, gather/scatter, cumulative and statistical reductions, masking, einsum."""

    def __init__(self):
        super().__init__()
        self.reflect = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.replicate = nn.Conv2d(4, 4, 3, padding=2, padding_mode="replicate", dilation=2,
                                   groups=2)
        self.circular = nn.Conv1d(4, 4, 3, padding=1, padding_mode="circular")
        self.proj = nn.Linear(6, 6)

    def forward(self, x):  # x: (N, 2, 6, 6)
        F = nn.functional
        h = F.elu(self.replicate(F.leaky_relu(self.reflect(x), 0.1)))  # (N, 4, 6, 6)
        h = F.interpolate(F.pixel_shuffle(h, 2), size=(6, 6), mode="nearest-exact")
        h = self.circular(F.pixel_unshuffle(h, 2).flatten(2))[..., :6]  # (N, 4, 6)
        h = (self.proj(F.silu(h)) + F.softplus(h) - F.log_softmax(h, -1)
             + torch.logsumexp(h, -1, keepdim=True))
        values, index = torch.topk(h, 3, dim=-1)
        ordered, _ = torch.sort(h, dim=1, descending=True)
        scattered = torch.zeros_like(h).scatter_add(2, index, values)
        masked = h.masked_fill(h > 0.5, -1.0).clamp(-0.8, 0.9)
        stats = torch.cumsum(h, 2) * h.std(dim=2, keepdim=True) + h.var(dim=1, keepdim=True)
        moved = torch.roll(h.flip(1), 2, dims=2) + h.amax(1, keepdim=True) + torch.tril(h).sum()
        a, b = h.chunk(2, dim=1)
        products = torch.einsum("nij,nkj->nik", a, b).repeat(1, 2, 1)
        picked = torch.cat([values, torch.gather(h, 2, index), h.index_select(2, torch.tensor(
            [0, 2, 4]))], -1)
        mixed = (ordered + scattered + masked + stats + moved + F.normalize(h, dim=-1)
                 + torch.where(h > 0, h, 0.5 * h))
        return picked, mixed, products, F.hardtanh(h) * F.relu6(h) + F.mish(h)


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 5, num_layers=2, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


class GRUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 3, batch_first=True, bidirectional=True)

    def forward(self, x):
        return self.rnn(x)[0]


class MHANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class EmbeddingGroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6, padding_idx=0)
        self.norm = nn.GroupNorm(2, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.norm(self.embed(ids).transpose(1, 2)).transpose(1, 2)
        return self.out(torch.tanh(h))


class HFLastHidden(nn.Module):
    """A Hugging Face model returning one tensor (`last_hidden_state` or `logits`)."""

    def __init__(self, model, field):
        super().__init__()
        self.model, self.field = model, field

    def forward(self, ids):
        return getattr(self.model(input_ids=ids), self.field)


def _bert(layers=2):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=16,
                                     max_position_embeddings=16)
    return transformers.BertModel(config)


def _gpt2(layers=2):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=30, n_embd=8, n_layer=layers, n_head=2,
                                     n_positions=16, use_cache=False, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _randomize(module: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics (so eval mode differs from identity) and no zero-init
    heads (torchvision's ViT head starts at 0)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)
        for name, p in module.named_parameters():
            if p.ndim >= 1 and not p.abs().sum():
                p.normal_(0, 0.05, generator=generator)
    return module


def _ints(*shape, high=10):
    return torch.randint(1, high, shape, generator=torch.Generator().manual_seed(2))


def _normal(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=dtype)


# ---------------------------------------------------------------- outputs match PyTorch (fp32)


def _torchvision(name, **kw):
    tv = pytest.importorskip("torchvision")
    return getattr(tv.models, name)(**kw)


def _timm_vit():
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10)


IMAGE = (1, 3, 32, 32)
FORWARD_CASES = {
    # name: (module factory, input factory); exported with static shapes (the dynamic batch is
    # exercised by the NTK tests, whose x1 and x2 batches differ)
    "resnet18": (lambda: _torchvision("resnet18", num_classes=10), lambda: _normal(*IMAGE)),
    "resnet50": (lambda: _torchvision("resnet50", num_classes=10), lambda: _normal(*IMAGE)),
    "mobilenet_v3_small": (lambda: _torchvision("mobilenet_v3_small", num_classes=10),
                           lambda: _normal(*IMAGE)),
    "vit_b_16": (lambda: _torchvision("vit_b_16", image_size=32, num_classes=10),
                 lambda: _normal(*IMAGE)),
    "timm_vit_tiny": (_timm_vit, lambda: _normal(*IMAGE)),
    "bert": (_bert, lambda: _ints(2, 5, high=30)),  # dict output (last_hidden_state, pooler)
    "gpt2": (_gpt2, lambda: _ints(2, 5, high=30)),
    "layers": (Layers, lambda: _normal(2, 3, 6, 5)),
    "op_zoo": (OpZoo, lambda: _normal(2, 2, 6, 6)),
    "lstm": (lambda: nn.LSTM(4, 5, num_layers=2), lambda: _normal(3, 2, 4)),  # (out, (h, c))
    "gru": (GRUNet, lambda: _normal(2, 3, 4)),
    "transformer_layer": (lambda: nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
                          lambda: _normal(2, 3, 8)),
    "mha": (MHANet, lambda: _normal(2, 3, 8)),
    "embedding_groupnorm": (EmbeddingGroupNorm, lambda: _ints(2, 5) - 1),  # padding index 0 too
}


def _compiled(fn, *args):
    """`jax.jit(fn)(*args)` compiled at XLA's lowest optimization level: these graphs are tiny, so
    compilation, not running, is what costs time on a test machine."""
    return jax.jit(fn).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})(*args)


def _relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape
    return float(np.max(np.abs(ours - reference)) / max(np.max(np.abs(reference)), 1e-30))


def _torch_leaves(out):
    return [t.detach().numpy() for t in torch.utils._pytree.tree_leaves(out)]


@pytest.mark.parametrize("name", list(FORWARD_CASES))
def test_forward_matches_torch_fp32(name):
    make_module, make_input = FORWARD_CASES[name]
    torch.manual_seed(0)
    module = _randomize(make_module()).eval()
    x = make_input()
    model = from_torch(module, x, mode="export", batch_axis=None)
    assert model.capabilities == frozenset({"jc", "ntvp", "sd"})
    ours = _compiled(model.apply_with_state, model.params, model.state, to_jax(x))
    with torch.no_grad():
        reference = module(x)
    ours_leaves = jax.tree_util.tree_leaves(ours)
    reference_leaves = _torch_leaves(reference)
    assert len(ours_leaves) == len(reference_leaves)
    for a, b in zip(ours_leaves, reference_leaves):
        assert a.dtype == jnp.float32
        assert _relative_error(a, b) <= 1e-5, name


# ---------------------------------------------------------------- eNTK vs torch.func (fp64)

NTK_CASES = {
    # name: (module factory, x1 factory, x2 factory or None for Θ(x1, x1)); where x2 is given it
    # has another batch size, and one dynamic-batch export serves both (else: a static export)
    "small_cnn": (SmallCNN, lambda: _normal(2, 3, 4, 4, dtype=torch.float64),
                  lambda: _normal(3, 3, 4, 4, dtype=torch.float64).flip(0)),
    "lstm": (LSTMNet, lambda: _normal(2, 2, 4, dtype=torch.float64), None),
    "gru": (GRUNet, lambda: _normal(2, 2, 4, dtype=torch.float64), None),
    "transformer_layer": (lambda: nn.TransformerEncoderLayer(8, 2, 12, batch_first=True),
                          lambda: _normal(2, 3, 8, dtype=torch.float64), None),
    "mha": (MHANet, lambda: _normal(2, 3, 8, dtype=torch.float64),
            lambda: _normal(3, 3, 8, dtype=torch.float64).flip(0)),
    "embedding_groupnorm": (EmbeddingGroupNorm, lambda: _ints(2, 4),
                            lambda: _ints(3, 4).flip(0) - 1),  # index 0 is the padding row
    "bert": (lambda: HFLastHidden(_bert(layers=1), "last_hidden_state"),
             lambda: _ints(2, 4, high=30), None),
    "gpt2": (lambda: HFLastHidden(_gpt2(layers=1), "logits"), lambda: _ints(2, 4, high=30), None),
}
# Structured derivatives join once entk.algorithms.structured exists (see test_sd_is_available).
STRATEGIES = ("jc", "ntvp", "sd") if HAS_SD else ("jc", "ntvp")


@pytest.fixture(scope="module")
def ntk_problem():
    """name → (module, x1, x2, model, reference), built once per model."""
    cache = {}

    def get(name):
        if name not in cache:
            make_module, make_x1, make_x2 = NTK_CASES[name]
            torch.manual_seed(0)
            module = _randomize(make_module()).double().eval()
            x1, x2 = make_x1(), (None if make_x2 is None else make_x2())
            model = from_torch(module, x1, mode="export", batch_axis=None if x2 is None else 0)
            cache[name] = (module, x1, x2, model, torch_func_ntk(module, x1, x2))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(NTK_CASES))
def test_ntk_matches_torch_func_fp64(ntk_problem, name):
    """Every available strategy, compiled together (one XLA compilation per model)."""
    module, x1, x2, model, reference = ntk_problem(name)
    kernel_fns = [entk.empirical_ntk_fn(model, implementation=s) for s in STRATEGIES]
    kernels = _compiled(lambda a, b, p: [fn(a, b, p) for fn in kernel_fns],
                        to_jax(x1), None if x2 is None else to_jax(x2), model.params)
    for strategy, kernel in zip(STRATEGIES, kernels):
        assert kernel.dtype == jnp.float64, strategy
        assert kernel.shape == reference.shape, strategy
        np.testing.assert_allclose(np.asarray(kernel), reference, rtol=0,
                                   atol=1e-10 * np.max(np.abs(reference)), err_msg=strategy)


# Every case runs in bridge mode too. Torch's fused attention kernels have no forward-mode AD, so on
# the attention models the bridge's JVPs (used by NTVP) come from its double-VJP fallback.
BRIDGE_NTK_CASES = list(NTK_CASES)
ATTENTION_CASES = ("transformer_layer", "mha", "bert", "gpt2")


@pytest.mark.parametrize("name", BRIDGE_NTK_CASES)
def test_bridge_mode_ntk_matches_torch_func_fp64(ntk_problem, name):
    """The same models kept in torch (mode="bridge"): JC and NTVP against the same reference."""
    module, x1, x2, _, reference = ntk_problem(name)
    model = from_torch(module, x1, mode="bridge")
    strategies = ("jc", "ntvp")
    kernel_fns = [entk.empirical_ntk_fn(model, implementation=s) for s in strategies]
    kernels = _compiled(lambda a, b, p: [fn(a, b, p) for fn in kernel_fns],  # one compilation
                        to_jax(x1), None if x2 is None else to_jax(x2), model.params)
    for strategy, kernel in zip(strategies, kernels):
        np.testing.assert_allclose(np.asarray(kernel), reference, rtol=0,
                                   atol=1e-10 * np.max(np.abs(reference)), err_msg=strategy)
    expected = "double vjp" if name in ATTENTION_CASES else "torch.func.jvp"
    assert model.info["forward_mode"].method == expected, model.info["forward_mode"]


def test_sd_is_available():
    if not HAS_SD:
        pytest.skip("entk.algorithms.structured (structured derivatives) is not in this build; "
                    "the eNTK tests above then check jc and ntvp only")
    assert "sd" in STRATEGIES


def test_ntk_with_vmap_axes_exports_single_examples(ntk_problem):
    """With vmap_axes the strategies call the model on batches of one (the dynamic-batch program
    covers them, or the module is exported again for that shape, once)."""
    module, x1, x2, model, reference = ntk_problem("small_cnn")
    kernel_fn = entk.empirical_ntk_fn(model, vmap_axes=0, implementation="jc")
    kernel = _compiled(kernel_fn, to_jax(x1), to_jax(x2), model.params)
    np.testing.assert_allclose(np.asarray(kernel), reference, rtol=0,
                               atol=1e-10 * np.max(np.abs(reference)))


def test_entk_ntk_takes_and_returns_torch_tensors_and_reuses_the_conversion(ntk_problem,
                                                                             monkeypatch):
    module, x1, x2, model, reference = ntk_problem("small_cnn")
    exports = []
    original = torch_export.export_module
    monkeypatch.setattr(torch_export, "export_module",
                        lambda *a, **k: exports.append(a[1][0].shape[0]) or original(*a, **k))
    for call in range(2):
        kernel = entk.ntk(module, x1, x2)
        assert isinstance(kernel, torch.Tensor) and kernel.dtype == torch.float64
        np.testing.assert_allclose(kernel.numpy(), reference, rtol=0,
                                   atol=1e-10 * np.max(np.abs(reference)))
        # converted by the fixture already, and its dynamic batch axis covers batch 1 (the
        # per-example program): nothing is exported again
        assert exports == [], exports
        exports.clear()
    # the fixture's conversion, read again (a new Model holding the current weights)
    assert from_torch(module, x1, mode="export").apply_with_state is model.apply_with_state


def test_one_export_serves_batch_one_unless_the_code_treats_it_differently(monkeypatch):
    """The batch axis is exported dynamic from size 1 (per-example computation needs batch 1); a
    module that computes something else at batch size 1 gets the sizes ≥ 2 program and a batch-1
    export (torch.func's reference calls it on batches of one too)."""
    monkeypatch.setenv("ENTK_PROGRAM_CACHE", "0")  # count real exports
    monkeypatch.setenv("ENTK_TORCH_CAPTURE", "export")  # dispatch capture records each shape anyway
    exports = []
    original = torch_export.export_module
    monkeypatch.setattr(torch_export, "export_module",
                        lambda *a, **k: exports.append(a[1][0].shape[0]) or original(*a, **k))

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return torch.tanh(self.lin(x))

    class BranchesOnOne(Plain):
        def forward(self, x):
            if x.shape[0] == 1:  # torch.export assumes it is not taken for sizes ≥ 1
                return 2.0 * torch.tanh(self.lin(x[0]))[None]
            return super().forward(x)

    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    for cls, exported in ((Plain, [4]), (BranchesOnOne, [4, 1])):
        module = cls().double()
        kernel = entk.ntk(module, x, vmap_axes=0, implementation="jc")
        assert exports == exported, (cls.__name__, exports)
        reference = torch_func_ntk(module, x, x)
        np.testing.assert_allclose(kernel.numpy(), reference, rtol=1e-12, atol=1e-12)
        exports.clear()


# ---------------------------------------------------------------- conversion details


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    module = _randomize(SmallCNN()).eval()
    x = _normal(2, 3, 4, 4)
    return module, x


def test_params_are_named_parameters_and_buffers_are_state(cnn):
    module, x = cnn
    model = from_torch(module, x, mode="export")
    assert list(model.params) == [name for name, _ in module.named_parameters()]
    for name, p in module.named_parameters():
        np.testing.assert_array_equal(np.asarray(model.params[name]), p.detach().numpy())
        assert model.params[name].dtype == jnp.float32
    assert set(model.state["buffers"]) == {name for name, _ in module.named_buffers()}
    assert model.source == "torch" and model.info["mode"] == "export"
    assert model.info["training"] is False


def test_cache_refreshes_parameters_without_exporting_again(cnn, monkeypatch):
    torch.manual_seed(0)
    module, x = SmallCNN().eval(), cnn[1]
    first = from_torch(module, x, mode="export")
    monkeypatch.setattr(torch_export, "export_module",
                        lambda *a, **k: pytest.fail("exported again"))
    assert from_torch(module, x, mode="export").apply_with_state is first.apply_with_state
    with torch.no_grad():
        module.fc.weight.mul_(2.0)
    second = from_torch(module, x, mode="export")
    assert second is not first
    assert second.info["exported_program"] is first.info["exported_program"]
    np.testing.assert_array_equal(np.asarray(second.params["fc.weight"]),
                                  module.fc.weight.detach().numpy())
    with torch.no_grad():
        expected = module(x).numpy()
    assert _relative_error(second(to_jax(x)), expected) <= 1e-5


def test_frozen_parameters_go_to_state_unless_included(cnn):
    torch.manual_seed(0)
    module, x = SmallCNN().eval(), cnn[1]
    module.conv.weight.requires_grad_(False)
    model = from_torch(module, x, mode="export", batch_axis=None)
    assert "conv.weight" not in model.params and "conv.weight" in model.state["frozen"]
    assert model.info["frozen_param_names"] == ("conv.weight",)
    with_frozen = from_torch(module, x, mode="export", batch_axis=None, include_frozen=True)
    assert "conv.weight" in with_frozen.params
    with torch.no_grad():
        expected = module(x).numpy()
    for m in (model, with_frozen):
        assert _relative_error(m(to_jax(x)), expected) <= 1e-5


def test_tied_weights_map_to_one_parameter(ntk_problem):
    module, _, _, model, _ = ntk_problem("gpt2")
    assert module.model.lm_head.weight is module.model.transformer.wte.weight
    assert list(model.params) == [name for name, _ in module.named_parameters()]
    assert "model.lm_head.weight" not in model.params


def test_eval_mode_by_default_and_train_mode_on_request(cnn):
    torch.manual_seed(0)
    module, x = _randomize(SmallCNN()), cnn[1]
    module.train()
    model = from_torch(module, x, mode="export", batch_axis=None)
    assert module.training and model.info["training"] is False
    module.eval()
    with torch.no_grad():
        eval_out = module(x).numpy()
    module.train()
    assert _relative_error(model(to_jax(x)), eval_out) <= 1e-5

    trained = from_torch(module, x, mode="export", batch_axis=None, training=True)
    assert trained.info["training"] is True and trained.info["train_mode_batch_norm"] is True
    with torch.no_grad():
        train_out = module(x).numpy()  # batch statistics
    assert _relative_error(trained(to_jax(x)), train_out) <= 1e-5
    assert _relative_error(train_out, eval_out) > 1e-3
    assert module.training
    # Batch statistics couple the examples: the kernel functions refuse per-example vmap_axes.
    with pytest.raises(ValueError, match="BatchNorm"):
        entk.empirical_ntk_fn(trained, vmap_axes=0)(to_jax(x), None, trained.params)


def test_dict_and_tuple_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, x, y):
            return {"sum": self.a(x) + self.b(y), "parts": (self.a(x), self.b(y))}

    torch.manual_seed(0)
    module = TwoInputs()
    x, y = _normal(2, 3), _normal(2, 4)
    with torch.no_grad():
        expected = module(x, y)
    for example, call in (((x, y), (to_jax(x), to_jax(y))),
                          ({"y": y, "x": x}, {"x": to_jax(x), "y": to_jax(y)})):
        model = from_torch(module, example, mode="export", batch_axis=None)
        out = model(call)
        assert set(out) == {"sum", "parts"} and isinstance(out["parts"], tuple)
        assert _relative_error(out["sum"], expected["sum"].numpy()) <= 1e-6
        assert _relative_error(out["parts"][1], expected["parts"][1].numpy()) <= 1e-6


def test_to_jax_keeps_float64_and_to_native_follows_like():
    t = _normal(2, 3, dtype=torch.float64)
    a = to_jax(t)
    assert a.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(a), t.numpy())
    back = to_native(jnp.asarray(np.ones((2, 2), np.float32)), t)
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float64
    assert back.device == t.device


# ---------------------------------------------------------------- errors


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        h = self.proj(x)
        return torch.cdist(h, h).sum(-1) + torch.special.bessel_j0(h).sum(-1)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        h = self.proj(x)
        if h.sum() > 0:
            return h * 2
        return h


def test_unsupported_ops_are_all_listed_with_their_module():
    with pytest.raises(torch_export.UnsupportedOpsError) as info:
        from_torch(Unsupported(), _normal(2, 3, 4), mode="export", batch_axis=None)
    message = str(info.value)
    assert "aten._cdist_forward" in message and "aten.special_bessel_j0" in message
    assert "mode='bridge'" in message
    assert "test_torch_export.py" in message  # the source line of each op
    assert set(info.value.ops) == {"aten._cdist_forward.default", "aten.special_bessel_j0.default"}


def test_data_dependent_control_flow_points_to_bridge_mode():
    with pytest.raises(torch_export.ExportError, match="data-dependent") as info:
        from_torch(DataDependent(), _normal(2, 4), mode="export", batch_axis=None)
    assert "mode='bridge'" in str(info.value)


def test_auto_mode_falls_back_to_bridge_with_one_warning():
    pytest.importorskip("entk.adapters.torch.bridge")
    module = DataDependent()
    x = _normal(2, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = from_torch(module, x, batch_axis=None)
    fallbacks = [w for w in caught if issubclass(w.category, ExportFallbackWarning)]
    assert len(fallbacks) == 1 and "data-dependent" in str(fallbacks[0].message)
    assert model.info["mode"] == "bridge" and "sd" not in model.capabilities
    with torch.no_grad():
        expected = module(x).numpy()
    assert _relative_error(model(to_jax(x)), expected) <= 1e-6


def test_non_float_inputs_are_refused_clearly(cnn):
    module, x = cnn
    with pytest.raises(torch_export.InputDtypeError, match="floating-point"):
        from_torch(module, x.long(), batch_axis=None)  # auto mode: no bridge fallback for this
    model = from_torch(module, x, mode="export")
    with pytest.raises(TypeError, match="floating-point"):
        model(jnp.zeros(x.shape, jnp.int32))


class WeightStandardizedConv(nn.Module):
    """timm's ScaledStdConv2d (NF-ResNets): the weight is batch-normalized per output channel,
    `F.batch_norm(weight.reshape(1, out, -1), training=True)`, before a 1x1 convolution."""

    def __init__(self, c_in=256, c_out=512):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, c_out))

    def forward(self, x):
        w = torch.nn.functional.batch_norm(self.conv.weight.reshape(1, self.conv.out_channels, -1),
                                           None, None, weight=self.gain, training=True, eps=1e-5)
        y = torch.nn.functional.conv2d(x, w.reshape_as(self.conv.weight), self.conv.bias)
        y = y.reshape(y.shape[0], -1)
        return y[:, :4] + y.mean(1, keepdim=True)


def test_float32_ntk_of_weight_standardized_conv_matches_torch_float64():
    """A float32 eNTK through a normalization's derivative, jitted, is as accurate as PyTorch's own
    float32 (~1e-6 of the float64 value): XLA:CPU's YNNPACK reduce fusion (jaxlib 0.10) miscompiles
    its reduce -> broadcast -> reduce chain (17% off for this module), which `entk._xla_cpu` turns off
    at `import entk`."""
    torch.manual_seed(0)
    module = WeightStandardizedConv().eval()
    x = _normal(2, 256, 4, 4)
    model = from_torch(module, x, mode="export")
    kernel_fn = entk.empirical_ntk_fn(model, implementation="jc", vmap_axes=None)
    kernel = jax.jit(lambda p, a: kernel_fn(a, None, p))(model.params, to_jax(x))
    assert kernel.dtype == jnp.float32
    reference = torch_func_ntk(module.double(), x.double(), None)
    assert _relative_error(kernel, reference) <= 1e-5


def test_xla_cpu_reduce_broadcast_reduce_chain_is_exact_in_float32():
    """The XLA:CPU pattern itself, in plain JAX: `sum(c * sum(g, -1), -1)` jitted in float32 against
    float64 (without the work-around: NaN / 1e32 entries on jaxlib 0.10.2)."""
    def chain(g, c):
        return jnp.sum(c * jnp.sum(g, -1, keepdims=True), -1)

    rng = np.random.default_rng(0)
    g, c = rng.normal(size=(8, 1, 64, 64)), rng.normal(size=(1, 64, 64))
    out = jax.jit(chain)(g.astype(np.float32), c.astype(np.float32))
    assert _relative_error(out, chain(g, c)) <= 1e-5



class NormalizeWithZeroRows(nn.Module):
    """`F.normalize` of rows that are exactly zero for some examples (as SwinV2's zero-padded
    attention windows are): PyTorch's norm has derivative 0 at a zero vector."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        keys = self.a(x) * (x[:, :1] > 0)
        return self.b(torch.nn.functional.normalize(keys, dim=-1))


@pytest.mark.parametrize("implementation", ["jc", "ntvp", "sd"])
def test_norm_of_a_zero_vector_has_pytorchs_derivative(implementation):
    """torch.export's decomposition of `linalg_vector_norm`, `pow(sum(x²), 0.5)`, differentiates to
    0·∞ = NaN at a zero row (torchvision's swin_v2_t eNTK had NaN entries); the op is translated whole."""
    torch.manual_seed(0)
    module = NormalizeWithZeroRows().double()
    x = _normal(4, 4, dtype=torch.float64)
    x[0, 0], x[1, 0] = 1.0, -1.0
    kernel = entk.ntk(module, x, implementation=implementation)
    assert torch.isfinite(kernel).all()
    assert _relative_error(kernel, torch_func_ntk(module, x, None)) <= 1e-12
