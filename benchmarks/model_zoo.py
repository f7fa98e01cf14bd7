"""Model-zoo sweep: which real models export to JAX, and do outputs and eNTKs match PyTorch?

Covers every torchvision classification, segmentation and video model, ~30 timm architectures and
~30 Hugging Face configs (random init, tiny sizes: nothing is downloaded). For each model:

- export: does `entk.from_torch(mode="export")` succeed? If not, why (the untranslated ATen ops
  and the module paths they sit in, or the `torch.export` failure): that model falls back to the
  bridge in `mode="auto"`;
- out_err: max |output(JAX) - output(torch)| / max |output(torch)| (float32);
- ntk_err: the eNTK of the exported model vs the bridge (`mode="bridge"`, torch.func), float32,
  max |Θ_export - Θ_bridge| / max |Θ_bridge|; where that exceeds the tolerance, both float32 kernels
  are also compared with PyTorch's float64 eNTK (ntk_err_f64, ntk_bridge_err_f64), which then decides;
- times: conversion, first call (trace + compile + run), first eNTK call of each mode (compiled at
  XLA's lowest backend optimization level, as compile time dominates on a shared CPU: these are
  not the times of a default `jax.jit`).

Every model is wrapped so its traced output is small: `y[:, :4] + y.mean(1)` of the flattened
output `y` (N, -1), so the eNTK is `(N, N)` after tracing the 4 outputs, with N = 2. Models with more
than `--max-trainable` parameters are differentiated w.r.t. a spread of parameter tensors (first,
last and every k-th) within that budget, the rest frozen, to keep Jacobians in memory.

Resumable: results go to a JSON file (one entry per model, rewritten after each model). Models run
in a worker subprocess, one after the other; the parent restarts the worker after a crash or a
timeout (that model is recorded as failed) and skips models already done, so the sweep can be
interrupted and rerun.

    python -m benchmarks.model_zoo --stage export          # quick pass: export + outputs
    python -m benchmarks.model_zoo --stage ntk             # eNTK export vs bridge
    python -m benchmarks.model_zoo --report                # benchmarks/results/zoo.md from zoo.json
    python -m benchmarks.model_zoo --only 'convnext|swin' --redo   # re-run some models
    python -m benchmarks.model_zoo --only '^tv' --out /tmp/tv.json &      # parallel sweeps ...
    python -m benchmarks.model_zoo --merge /tmp/tv.json /tmp/other.json    # ... merged into zoo.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import selectors
import subprocess
import sys
import time
import warnings
from typing import Any, Callable, Iterator

RESULTS = os.path.join(os.path.dirname(__file__), "results")
N = 2            # batch
K = 4            # traced outputs per example
TOL = 1e-4


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


def _limit_trainable(module: Any, budget: int) -> int:
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


# ---------------------------------------------------------------- measuring one model


def _rel(a: Any, b: Any) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _compiled(fn: Callable, *args: Any) -> Any:
    """`jit(fn)(*args)` compiled at XLA's lowest backend optimization level: on a CPU shared by
    many jobs, compiling the larger graphs (not running them) is what takes the time."""
    import jax

    compiled = jax.jit(fn).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    return jax.block_until_ready(compiled(*args))


def measure(name: str, spec: dict, stage: str, max_trainable: int, implementation: str) -> dict:
    import jax
    import numpy as np
    import torch

    import entk
    from entk.adapters.torch import autograd_semantics, export

    entry: dict = {"family": spec["family"], "source": name.split("/")[0]}
    t = time.perf_counter()
    module, x = build(name, spec)
    entry["build_s"] = round(time.perf_counter() - t, 2)
    entry["params"] = sum(p.numel() for p in module.parameters())
    entry["input"] = list(x.shape)
    with torch.no_grad():
        reference = module(x).numpy()
    xj = jax.numpy.asarray(x.numpy())
    t = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = entk.from_torch(module, x, mode="export")
        entry["mode"] = "export"
    except export.UnsupportedOpsError as e:
        entry.update(mode="bridge", reason="untranslated ops", where={k: list(v) for k, v in e.where.items()})
    except (export.ExportError, export.TranslationError) as e:
        entry.update(mode="bridge", reason=f"{type(e).__name__}: {str(e).split(chr(10) + 'To use')[0][:600]}")
    entry["convert_s"] = round(time.perf_counter() - t, 2)
    if entry["mode"] != "export":
        return entry
    t = time.perf_counter()
    out = _compiled(model.apply_with_state, model.params, model.state, xj)
    entry["first_call_s"] = round(time.perf_counter() - t, 2)
    entry["out_err"] = _rel(out, reference)
    entry["out_max"] = float(np.max(np.abs(reference)))  # an all-zero output would prove nothing
    if stage == "export":
        return entry
    entry["trainable"] = _limit_trainable(module, max_trainable)
    kernels = _kernels(module, x, xj, implementation, entry)
    entry["ntk_impl"] = implementation
    entry["ntk_err"] = _rel(kernels["export"], kernels["bridge"])
    if entry["ntk_err"] > TOL:  # which of the two float32 kernels is off? PyTorch's float64 decides
        reference = (_autograd_kernel(module.double(), x.double()) if entry.get("ntk_reference")
                     else _kernel_float64(module, x, "bridge"))
        entry["ntk_err_f64"] = _rel(kernels["export"], reference)
        entry["ntk_bridge_err_f64"] = _rel(kernels["bridge"], reference)
        if entry["ntk_err_f64"] > TOL:  # float32 itself may be the limit: the export in float64
            entry["ntk_export64_err_f64"] = _rel(_kernel_float64(module, x, "export"), reference)
    elif entry["ntk_err"] == 0.0:
        # Bit-for-bit agreement usually means the kernel is dominated by the head's bias (whose
        # Jacobian both paths compute exactly) over a body with tiny outputs at random init: check
        # again without the trainable vectors (biases, norm scales) of the last layers.
        entry["ntk_err_body"] = _rel(*_kernels(_freeze_tail_vectors(module), x, xj, implementation,
                                               {}).values())
    return entry


def _kernels(module: Any, x: Any, xj: Any, implementation: str, entry: dict) -> dict:
    """`{"export": Θ, "bridge": Θ}` (float32, traced, `(N, N)`), timing each into `entry`."""
    import numpy as np

    import entk
    from entk.adapters.torch import autograd_semantics

    kernels = {}
    for mode in ("export", "bridge"):
        t = time.perf_counter()
        try:
            converted = entk.from_torch(module, x, mode=mode)
        except autograd_semantics.OldStyleAutogradFunctionError:  # torch.func cannot run it
            kernels[mode] = _autograd_kernel(module, x)
            entry["ntk_reference"] = "torch.autograd"
            entry[f"ntk_{mode}_s"] = round(time.perf_counter() - t, 2)
            continue
        impl = implementation if mode == "export" else "jc"
        t = time.perf_counter()

        def kernel(p: Any, state: Any, a: Any, converted: Any = converted, impl: str = impl) -> Any:
            # the state (frozen weights, buffers) as an argument, not constants baked into the
            # program: XLA's compile of a VGG's ~500 MB of constants needs many GB
            fn = entk.empirical_ntk_fn(converted.replace(state=state), implementation=impl,
                                       vmap_axes=None)
            return fn(a, None, p)

        kernels[mode] = np.asarray(_compiled(kernel, converted.params, converted.state, xj))
        entry[f"ntk_{mode}_s"] = round(time.perf_counter() - t, 2)
    return kernels


def _freeze_tail_vectors(module: Any) -> Any:
    """Freezes the trainable 1-D parameters after the last trainable matrix / kernel (the head's
    bias, a final norm's scale and shift); returns the module."""
    params = [p for p in module.parameters() if p.requires_grad]
    last = max((i for i, p in enumerate(params) if p.ndim >= 2), default=-1)
    for p in params[last + 1:]:
        p.requires_grad_(False)
    return module


def _autograd_kernel(module: Any, x: Any) -> Any:
    """The traced eNTK `(N, N)` from eager `torch.autograd` (one backward pass per output entry):
    the reference for models torch.func cannot transform (old-style autograd Functions)."""
    import numpy as np
    import torch

    params = [p for p in module.parameters() if p.requires_grad]
    out = module(x)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i, k], params, retain_graph=True)])
            for i in range(out.shape[0]) for k in range(out.shape[1])]
    jac = torch.stack(rows).reshape(out.shape[0], out.shape[1], -1).double()
    return (torch.einsum("ikp,jkp->ij", jac, jac) / out.shape[1]).detach().numpy()


def _kernel_float64(module: Any, x: Any, mode: str) -> Any:
    """The eNTK in float64 (`mode="bridge"`: PyTorch's own, the reference when the float32 export
    and bridge disagree; `"export"`: the translation's), the same trainable subset. The module is
    left in float64."""
    import jax
    import numpy as np

    import entk

    jax.config.update("jax_enable_x64", True)
    try:
        module.double()
        x64 = x.double()
        converted = entk.from_torch(module, x64, mode=mode)
        kernel_fn = entk.empirical_ntk_fn(converted, implementation="jc", vmap_axes=None)
        return np.asarray(kernel_fn(jax.numpy.asarray(x64.numpy()), None, converted.params))
    finally:
        jax.config.update("jax_enable_x64", False)


# ---------------------------------------------------------------- results file, worker, parent


def load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def save(path: str, results: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _done(entry: dict | None, stage: str) -> bool:
    if not entry:
        return False
    if "error" in entry or entry.get("mode") in ("bridge", "refused"):
        return True
    return "out_err" in entry if stage == "export" else "ntk_err" in entry


def worker(args: argparse.Namespace) -> None:
    specs = all_specs()
    for name in args.names:
        print(f"START {name}", flush=True)
        try:
            entry = measure(name, specs[name], args.stage, args.max_trainable, args.implementation)
        except Exception as e:  # noqa: BLE001 - one model's failure is a result, not the sweep's end
            entry = {"family": specs[name]["family"], "source": name.split("/")[0],
                     "error": f"{type(e).__name__}: {str(e)[:400]}"}
        results = load(args.out)
        results[name] = entry  # each stage measures everything it reports
        save(args.out, results)
        print(f"DONE {name} {json.dumps(entry, default=str)[:300]}", flush=True)


def parent(args: argparse.Namespace) -> None:
    specs = all_specs()
    names = [n for n in specs if re.search(args.only, n)] if args.only else list(specs)
    results = load(args.out)
    if args.redo:
        for n in names:
            results.pop(n, None)
        save(args.out, results)
    todo = [n for n in names if not _done(results.get(n), args.stage)]
    print(f"{len(todo)} of {len(names)} models to run (stage {args.stage})", flush=True)
    while todo:
        cmd = [sys.executable, "-m", "benchmarks.model_zoo", "--worker", "--stage", args.stage,
               "--out", args.out, "--max-trainable", str(args.max_trainable),
               "--implementation", args.implementation, "--names", *todo]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        current, started = None, time.time()
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        timed_out = False
        while True:
            if not selector.select(timeout=5):
                if current and time.time() - started > args.timeout:
                    os.killpg(proc.pid, 9)
                    timed_out = True
                    break
                continue
            line = proc.stdout.readline()
            if not line:
                break
            print(line.rstrip(), flush=True)
            if line.startswith("START "):
                current, started = line.split()[1], time.time()
            elif line.startswith("DONE "):
                todo.remove(line.split()[1])
                current = None
        proc.wait()
        if current is not None:  # died or hung on `current`
            results = load(args.out)
            why = f"timeout after {args.timeout} s" if timed_out else f"worker died (exit {proc.returncode})"
            results[current] = {**results.get(current, {}), "family": specs[current]["family"],
                                "source": current.split("/")[0], "error": why}
            save(args.out, results)
            print(f"FAILED {current}: {why}", flush=True)
            todo.remove(current)
        elif proc.returncode != 0:
            break
    report(args.out)


# ---------------------------------------------------------------- report


# What the sweep found out about a model's failure, shown next to it in zoo.md.
NOTES = {
}


def _ntk_error(e: dict) -> float:
    """The export's eNTK error against the reference: the float32 bridge; where the two float32
    kernels disagree, PyTorch's float64 eNTK (the more accurate reference); and where float32 itself
    is the limit (the export's float32 kernel off from it, PyTorch's as well), the export computed in
    float64 against it, which checks the translation rather than float32 arithmetic."""
    return min(e.get("ntk_err_f64", e["ntk_err"]), e.get("ntk_export64_err_f64", math.inf))


def report(path: str) -> None:
    results = load(path)
    rows, fallbacks, failures, mismatches = {}, [], [], []
    for name, e in sorted(results.items()):
        fam = rows.setdefault(e["source"], {})
        counts = fam.setdefault(e["family"], [0, 0, 0, 0])  # models, exported, outputs ok, ntk ok
        counts[0] += 1
        if "error" in e:
            failures.append(f"- `{name}`: {e['error']}")
            continue
        if e.get("mode") != "export":
            why = e.get("reason", "")
            if e.get("where"):
                why += ": " + "; ".join(f"`{op}` at {', '.join(w[:2])}" for op, w in e["where"].items())
            fallbacks.append(f"- `{name}` ({e.get('mode')}): {NOTES.get(name, why)}")
            continue
        counts[1] += 1
        out_ok = e.get("out_err", 1.0) <= TOL
        counts[2] += out_ok
        ntk_ok = out_ok and "ntk_err" in e and _ntk_error(e) <= TOL and e.get("ntk_err_body", 0) <= TOL
        counts[3] += ntk_ok
        if not out_ok or ("ntk_err" in e and not ntk_ok):
            note = f": {NOTES[name]}" if name in NOTES else ""
            mismatches.append(f"- `{name}`: out_err {e.get('out_err'):.2e}, "
                              f"ntk_err {e.get('ntk_err', float('nan')):.2e}{note}")
    total = sum(c[0] for fams in rows.values() for c in fams.values())
    tot = [sum(c[i] for fams in rows.values() for c in fams.values()) for i in range(4)]
    has_ntk = sum("ntk_err" in e for e in results.values())
    lines = ["# Model-zoo sweep: export to JAX, outputs and eNTK vs PyTorch", "",
             "`python -m benchmarks.model_zoo --stage export && python -m benchmarks.model_zoo --stage ntk`",
             "(random init, float32, N = 2, traced output `y[:, :4] + mean(y)`; eNTK of the export vs the "
             f"bridge, tolerance {TOL:g}, relative to the largest entry). Float32 eNTKs are compiled with "
             "`import entk`'s XLA:CPU work-around (`entk/_xla_cpu.py`: jaxlib 0.10's YNNPACK reduce fusion "
             "miscompiles normalization derivatives; it made `timm/nf_resnet26` 5.8e-3 and "
             "`timm/swinv2_tiny_window8_256` 8.2e-4 off). Inputs are the smallest each model accepts; "
             "torchvision's MViT builders fix a 16 x 224 x 224 clip, so the sweep builds the same "
             "architecture for 4 x 64 x 64 (`_mvit_size`). Models over 5M parameters are differentiated "
             "w.r.t. a spread of parameter tensors within 5M (`--max-trainable`).", "",
             f"**{tot[0]} models: {tot[1]} exported ({100 * tot[1] / max(total, 1):.1f}%), "
             f"{tot[2]} with outputs within {TOL:g}, {tot[3]} with outputs and eNTK within {TOL:g} "
             f"({100 * tot[3] / max(total, 1):.1f}% of all) "
             f"(eNTK measured on {has_ntk} of the exported models: {tot[3]} of {has_ntk} within, "
             f"{100 * tot[3] / max(has_ntk, 1):.1f}%).**", "",
             "| source | family | models | exported | outputs ok | outputs + eNTK ok (where measured) |", "|---|---|---|---|---|---|"]
    for source, fams in rows.items():
        for family, c in sorted(fams.items()):
            lines.append(f"| {source} | {family} | {c[0]} | {c[1]} | {c[2]} | {c[3]} |")
    lines += ["", "## Not exported (bridge: falls back to the bridge; refused: neither mode can run "
              "it faithfully)", ""] + (fallbacks or ["none"])
    lines += ["", "## Failures (the model or the sweep, not the export)", ""] + (failures or ["none"])
    lines += ["", "## Exported but outside tolerance", ""] + (mismatches or ["none"])
    judged = [f"- `{n}`: export vs float32 bridge {e['ntk_err']:.1e}; against PyTorch's float64 eNTK the "
              f"export's float32 eNTK is {e['ntk_err_f64']:.1e} off and the bridge's {e['ntk_bridge_err_f64']:.1e}"
              + (f"; the export computed in float64 is {e['ntk_export64_err_f64']:.1e} off"
                 if "ntk_export64_err_f64" in e else "")
              for n, e in sorted(results.items()) if "ntk_err_f64" in e]
    lines += ["", "## Float32 kernels that disagree: PyTorch's float64 eNTK decides", ""] + (judged or ["none"])
    exact = sorted(n for n, e in results.items() if e.get("ntk_err") == 0.0)
    checked = [n for n in exact if "ntk_err_body" in results[n]]
    lines += ["", "## Kernels that agree bit for bit", "",
              f"{len(exact)} models have ntk_err exactly 0: their float32 kernels are dominated by the "
              "head's bias (whose Jacobian both paths compute exactly) over a body with tiny outputs at "
              "random init. The sweep checks these again with the trainable vectors after the last "
              "weight matrix frozen (the head's bias, a final norm's scale and shift), so the kernel "
              "comes from the body: "
              + (", ".join(f"`{n}` {results[n]['ntk_err_body']:.1e}" for n in checked) or "none checked")
              + (f". Not re-checked yet: {', '.join(f'`{n}`' for n in exact if n not in checked)}"
                 if len(checked) < len(exact) else "") + "."
              + (f" {sum(results[n]['ntk_err_body'] == 0.0 for n in checked)} of them agree bit for bit "
                 "even then; why was not investigated further (their outputs agree to out_err, and the "
                 "same families' other sizes differ by ~1e-7 as expected)." if checked else "")]
    unmeasured = [n for n, e in sorted(results.items())
                  if e.get("mode") == "export" and "error" not in e and "ntk_err" not in e]
    lines += ["", "## Exported, eNTK not measured (export stage only: outputs checked)", "",
              ", ".join(f"`{n}`" + (f" (eNTK stage: {results[n]['ntk_error']})" if "ntk_error" in
                                    results[n] else "") for n in unmeasured) or "none"]
    lines += ["", "## Per model", "", "| model | params | input | mode | out_err | ntk_err | convert s | "
              "first call s | eNTK s (export / bridge) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, e in sorted(results.items()):
        def f(key, fmt="{:.1e}"):
            text = fmt.format(e[key]) if key in e else "-"
            return text + (f" (float64 reference: {e['ntk_err_f64']:.1e})"
                           if key == "ntk_err" and "ntk_err_f64" in e else "")
        lines.append(f"| {name} | {e.get('params', '-')} | {'×'.join(map(str, e.get('input', [])))} | "
                     f"{e.get('mode', 'error')} | {f('out_err')} | {f('ntk_err')} | {f('convert_s', '{}')} | "
                     f"{f('first_call_s', '{}')} | {f('ntk_export_s', '{}')} / {f('ntk_bridge_s', '{}')} |")
    with open(os.path.join(os.path.dirname(path), "zoo.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("export", "ntk"), default="export")
    p.add_argument("--only", default="", help="regex on model names (tv/..., timm/..., hf/...)")
    p.add_argument("--redo", action="store_true", help="forget earlier results of the selected models")
    p.add_argument("--out", default=os.path.join(RESULTS, "zoo.json"))
    p.add_argument("--timeout", type=float, default=300, help="seconds per model")
    p.add_argument("--max-trainable", type=int, default=5_000_000)
    p.add_argument("--implementation", default="jc", help="eNTK strategy for the exported model")
    p.add_argument("--report", action="store_true")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="merge these results files (sweeps run in parallel) into --out, then report")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--names", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.merge:
        results = load(args.out)
        for path in args.merge:
            for name, entry in load(path).items():
                old = results.get(name, {})
                if "error" in entry and "out_err" in old:  # an eNTK-stage failure keeps the export's
                    entry = {**old, "ntk_error": entry["error"]}
                results[name] = entry
        save(args.out, results)
        report(args.out)
    elif args.report:
        report(args.out)
    elif args.worker:
        worker(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
