"""The model-zoo sweep's models: which ones, and how each is built small (random init, no downloads).

`all_specs()` lists every torchvision classification / segmentation / video model, ~45 timm
architectures and ~30 Hugging Face configurations as `{name: spec}`; `build(name, spec)` makes the
module (eval mode, float32) wrapped to return `y[:, :K] + mean(y)` of its flattened output, with an
example input of batch `N` at the smallest size the model accepts. Used by `benchmarks/model_zoo.py`.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator

N = 2            # batch
K = 4            # traced outputs per example


# ---------------------------------------------------------------- the models


def _torchvision_specs() -> dict[str, dict]:
    import torchvision.models as tvm

    special = {  # builder kwargs / input sizes that keep these small
        "vit_b_16": {"kwargs": {"image_size": 32}}, "vit_b_32": {"kwargs": {"image_size": 32}},
        "vit_l_16": {"kwargs": {"image_size": 32}}, "vit_l_32": {"kwargs": {"image_size": 32}},
        "vit_h_14": {"kwargs": {"image_size": 28}, "size": 28},
        "maxvit_t": {"size": 224},  # its 7x7 partitions need 224 (the builder fixes the size)
        "inception_v3": {"kwargs": {"aux_logits": False, "init_weights": True}, "size": 75},
        "googlenet": {"kwargs": {"aux_logits": False, "init_weights": True}},
    }
    specs = {}
    for name in tvm.list_models(module=tvm):
        specs[f"tv/{name}"] = {"family": _family(name), "build": ("torchvision", name), **special.get(name, {})}
    for name in tvm.list_models(module=tvm.segmentation):
        specs[f"tv-seg/{name}"] = {"family": "segmentation", "build": ("torchvision", name),
                                   "kwargs": {"weights_backbone": None, "aux_loss": False}}
    video = {  # (frames, size) that these builders fix (positional embeddings, final pooling);
        # MViT's builders fix 16 x 224 x 224, which `_build` overrides (see `_mvit_size`)
        "mvit_v1_b": {"frames": 4, "size": 64, "mvit": True},
        "mvit_v2_s": {"frames": 4, "size": 64, "mvit": True},
        "s3d": {"frames": 16, "size": 224}}
    for name in tvm.list_models(module=tvm.video):
        specs[f"tv-video/{name}"] = {"family": "video", "build": ("torchvision", name),
                                     "video": True, **video.get(name, {})}
    return specs


TIMM = {  # name: create_model kwargs (img_size where the model takes it, to stay small)
    "resnet18": {}, "resnet50d": {}, "resnext26ts": {}, "seresnet18": {}, "efficientnet_b0": {},
    "efficientnetv2_rw_t": {}, "mobilenetv3_small_100": {}, "mobilenetv2_050": {}, "ghostnet_100": {},
    "convnext_atto": {}, "convnextv2_atto": {}, "regnetx_002": {}, "regnety_002": {}, "densenet121": {},
    "dla34": {}, "cspresnet50": {}, "res2net50_14w_8s": {}, "resnest14d": {}, "repvgg_a0": {},
    "nf_resnet26": {}, "hrnet_w18_small": {}, "rexnet_100": {},
    "vit_tiny_patch16_224": {"img_size": 32}, "deit_tiny_patch16_224": {"img_size": 32},
    "deit_tiny_distilled_patch16_224": {"img_size": 32}, "cait_xxs24_224": {"img_size": 32},
    "beit_base_patch16_224": {"img_size": 32}, "eva02_tiny_patch14_224": {"img_size": 28},
    "swin_tiny_patch4_window7_224": {"img_size": 56}, "swinv2_tiny_window8_256": {"img_size": 64},
    "mixer_s16_224": {"img_size": 32}, "resmlp_12_224": {"img_size": 32}, "poolformer_s12": {},
    "coatnet_0_rw_224": {"img_size": 64}, "maxvit_tiny_rw_224": {"img_size": 64},
    "levit_128s": {"img_size": 64}, "efficientformer_l1": {"img_size": 224},
    "mobilevit_xxs": {"img_size": 64}, "edgenext_xx_small": {}, "xcit_nano_12_p16_224": {"img_size": 32},
    "pit_ti_224": {"img_size": 64}, "tnt_s_patch16_224": {"img_size": 32}, "fastvit_t8": {},
    "efficientvit_b0": {}, "crossvit_tiny_240": {"img_size": 240},
}


def _timm_specs() -> dict[str, dict]:
    return {f"timm/{name}": {"family": _family(name), "build": ("timm", name), "kwargs": kw,
                             "size": kw.get("img_size", 32)} for name, kw in TIMM.items()}


_TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=37, max_position_embeddings=64)
HF = {  # name: (model class, config class, config kwargs, input kind)
    "bert": ("BertModel", "BertConfig", _TEXT, "tokens"),
    "roberta": ("RobertaModel", "RobertaConfig", _TEXT, "tokens"),
    "deberta-v2": ("DebertaV2Model", "DebertaV2Config", _TEXT, "tokens"),
    "electra": ("ElectraModel", "ElectraConfig", {**_TEXT, "embedding_size": 16}, "tokens"),
    "albert": ("AlbertModel", "AlbertConfig", {**_TEXT, "embedding_size": 16}, "tokens"),
    "distilbert": ("DistilBertModel", "DistilBertConfig",
                   dict(vocab_size=99, dim=32, n_layers=2, n_heads=2, hidden_dim=37,
                        max_position_embeddings=64), "tokens"),
    "gpt2": ("GPT2Model", "GPT2Config", dict(vocab_size=99, n_embd=32, n_layer=2, n_head=2,
                                             n_positions=64), "tokens"),
    "llama": ("LlamaModel", "LlamaConfig", {**_TEXT, "num_key_value_heads": 1}, "tokens"),
    "mistral": ("MistralModel", "MistralConfig", {**_TEXT, "num_key_value_heads": 1}, "tokens"),
    "qwen2": ("Qwen2Model", "Qwen2Config", {**_TEXT, "num_key_value_heads": 1}, "tokens"),
    "gemma": ("GemmaModel", "GemmaConfig", {**_TEXT, "num_key_value_heads": 1, "head_dim": 16},
              "tokens"),
    "phi": ("PhiModel", "PhiConfig", _TEXT, "tokens"),
    "gpt-neox": ("GPTNeoXModel", "GPTNeoXConfig", _TEXT, "tokens"),
    "opt": ("OPTModel", "OPTConfig", dict(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, ffn_dim=37, word_embed_proj_dim=32,
                                          max_position_embeddings=64), "tokens"),
    "bloom": ("BloomModel", "BloomConfig", dict(vocab_size=99, hidden_size=32, n_layer=2, n_head=2),
              "tokens"),
    "falcon": ("FalconModel", "FalconConfig", dict(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2), "tokens"),
    "t5": ("T5Model", "T5Config", dict(vocab_size=99, d_model=32, d_kv=16, d_ff=37, num_layers=2,
                                       num_heads=2), "seq2seq"),
    "bart": ("BartModel", "BartConfig", dict(vocab_size=99, d_model=32, encoder_layers=2,
                                             decoder_layers=2, encoder_attention_heads=2,
                                             decoder_attention_heads=2, encoder_ffn_dim=37,
                                             decoder_ffn_dim=37, max_position_embeddings=64),
             "seq2seq"),
    "vit": ("ViTModel", "ViTConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=37, image_size=32, patch_size=8), "image"),
    "convnext": ("ConvNextModel", "ConvNextConfig", dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]),
                 "image"),
    "swin": ("SwinModel", "SwinConfig", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                             num_heads=[2, 2], window_size=4), "image"),
    "dinov2": ("Dinov2Model", "Dinov2Config", dict(hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, image_size=32, patch_size=8),
               "image"),
    "clip-vision": ("CLIPVisionModel", "CLIPVisionConfig", dict(hidden_size=32, num_hidden_layers=2,
                                                                num_attention_heads=2,
                                                                intermediate_size=37, image_size=32,
                                                                patch_size=8), "image"),
    "resnet": ("ResNetModel", "ResNetConfig", dict(embedding_size=8, hidden_sizes=[8, 16],
                                                   depths=[1, 1]), "image"),
    "segformer": ("SegformerModel", "SegformerConfig", dict(num_encoder_blocks=2, depths=[1, 1],
                                                            sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                                            num_attention_heads=[1, 2],
                                                            patch_sizes=[7, 3], strides=[4, 2],
                                                            mlp_ratios=[2, 2]), "image"),
    "wav2vec2": ("Wav2Vec2Model", "Wav2Vec2Config",
                 dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                      conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2), "audio"),
    "hubert": ("HubertModel", "HubertConfig",
               dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                    conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2), "audio"),
    "whisper-encoder": ("WhisperModel", "WhisperConfig",
                        dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                             decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37,
                             num_mel_bins=8, max_source_positions=16, vocab_size=99, pad_token_id=1,
                             bos_token_id=2, eos_token_id=3, decoder_start_token_id=2), "mel"),
    "mobilebert": ("MobileBertModel", "MobileBertConfig",
                   dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, embedding_size=16, intra_bottleneck_size=16,
                        true_hidden_size=16), "tokens"),
    "xlm-roberta": ("XLMRobertaModel", "XLMRobertaConfig", _TEXT, "tokens"),
}


def _hf_specs() -> dict[str, dict]:
    return {f"hf/{name}": {"family": _family(name), "build": ("hf", name)} for name in HF}


FAMILIES = ["convnext", "swin", "vit", "deit", "beit", "eva", "cait", "resnext", "wide_resnet", "resnet",
            "efficientnet", "mobilenet", "mnasnet", "regnet", "densenet", "vgg", "shufflenet",
            "squeezenet", "maxvit", "coatnet", "mixer", "resmlp", "poolformer", "levit",
            "efficientformer", "efficientvit", "inception", "googlenet", "alexnet", "ghostnet",
            "mobilevit", "edgenext", "xcit", "pit", "tnt", "fastvit", "crossvit", "dla", "csp",
            "res2net", "resnest", "repvgg", "nf_", "hrnet", "rexnet", "seresnet"]


def _family(name: str) -> str:
    lowered = name.lower()
    for family in ("seresnet", "resnext", "wide_resnet", "res2net", "resnest", "convnext", "swin"):
        if family in lowered:
            return family
    return next((f for f in FAMILIES if lowered.startswith(f)), lowered.split("_")[0])


def all_specs() -> dict[str, dict]:
    specs = {}
    for source in (_torchvision_specs, _timm_specs, _hf_specs):
        try:
            specs.update(source())
        except ImportError as e:  # a zoo not installed
            print(f"skipping {source.__name__}: {e}", file=sys.stderr)
    return specs


# ---------------------------------------------------------------- building one model


def _head(module: Any, call: Callable) -> Any:
    """`module` wrapped to return `y[:, :K] + mean(y)` of its flattened main output y: (N, K)."""
    import torch

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = module

        def forward(self, x):
            out = call(self.model, x)
            if isinstance(out, dict):
                out = out["out"] if "out" in out else next(iter(out.values()))
            elif isinstance(out, (tuple, list)):
                out = out[0]
            y = out.reshape(out.shape[0], -1)
            return y[:, :K] + y.mean(1, keepdim=True)

    return Head().eval()


def build(name: str, spec: dict) -> tuple[Any, Any]:
    """`(wrapped module, example input)` for one zoo entry, random init, float32, eval mode.

    Weight matrices initialized to zero (torchvision ViT's head, ...) get small random values, so
    that outputs are not identically zero (which any translation would match)."""
    import torch

    torch.manual_seed(0)
    module, x = _build(spec)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0, 0.02)
    return module, x


def _build(spec: dict) -> tuple[Any, Any]:
    import torch

    kind, arch = spec["build"]
    if kind == "hf":
        return _build_hf(arch)
    if kind == "timm":
        import timm

        module = timm.create_model(arch, pretrained=False, **spec.get("kwargs", {}))
    else:
        import torchvision.models as tvm

        with _mvit_size(spec):
            module = tvm.get_model(arch, weights=None, **spec.get("kwargs", {}))
    sizes = [spec["size"]] if "size" in spec else [32, 64, 96, 128, 224]
    module.eval()
    for size in sizes:  # the smallest input the model accepts
        shape = (N, 3, spec.get("frames", 4), size, size) if spec.get("video") else (N, 3, size, size)
        x = torch.randn(shape)
        try:
            with torch.no_grad():
                module(x)
        except Exception:  # noqa: BLE001 - too small for this model: try the next size
            if size == sizes[-1]:
                raise
            continue
        return _head(module, lambda m, v: m(v)), x
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _mvit_size(spec: dict) -> Iterator[None]:
    """For MViT specs: torchvision's `mvit_v1_b` / `mvit_v2_s` hard-code a 16 x 224 x 224 clip (too
    large for a 2-core sweep); their shared `_mvit` takes the size, so it is set there (the same
    architecture, positional embeddings sized for `frames` x `size` x `size`)."""
    if not spec.get("mvit"):
        yield
        return
    import torchvision.models.video.mvit as mvit

    original = mvit._mvit

    def sized(*args: Any, **kwargs: Any) -> Any:
        kwargs.update(spatial_size=(spec["size"], spec["size"]), temporal_size=spec["frames"])
        return original(*args, **kwargs)

    mvit._mvit = sized
    try:
        yield
    finally:
        mvit._mvit = original


def _build_hf(arch: str) -> tuple[Any, Any]:
    import torch
    import transformers

    model_cls, config_cls, config_kwargs, kind = HF[arch]
    config = getattr(transformers, config_cls)(**config_kwargs)
    module = getattr(transformers, model_cls)(config).eval()
    if kind == "tokens":
        x = torch.randint(0, 99, (N, 8))
        return _head(module, lambda m, v: m(input_ids=v).last_hidden_state), x
    if kind == "seq2seq":
        x = torch.randint(0, 99, (N, 8))
        return _head(module, lambda m, v: m(input_ids=v, decoder_input_ids=v).last_hidden_state), x
    if kind == "image":
        x = torch.randn(N, 3, 32, 32)
        return _head(module, lambda m, v: m(pixel_values=v).last_hidden_state), x
    if kind == "audio":
        x = torch.randn(N, 400)
        return _head(module, lambda m, v: m(input_values=v).last_hidden_state), x
    x = torch.randn(N, 8, 32)  # Whisper log-mel features (N, mel bins, 2 * max_source_positions)
    return _head(module, lambda m, v: m.encoder(input_features=v).last_hidden_state), x


def limit_trainable(module: Any, budget: int) -> int:
    """Freezes parameter tensors beyond `budget` numbers (keeping first, last and a spread)."""
    params = [p for p in module.parameters() if p.requires_grad]
    total = sum(p.numel() for p in params)
    if total <= budget:
        return total
    keep, used = set(), 0
    order = [0, len(params) - 1] + list(range(1, len(params) - 1, 3)) + list(range(len(params)))
    for i in order:
        if i not in keep and used + params[i].numel() <= budget:
            keep.add(i)
            used += params[i].numel()
    for i, p in enumerate(params):
        p.requires_grad_(i in keep)
    return used
