"""The networks of the peer benchmark (`benchmarks/run.py`), built the same way in entk and neural-tangents.

This module runs under two JAX versions: today's (entk) and 0.4.24 (neural-tangents 0.6.5, in its own
virtualenv; see `benchmarks/peer_nt.py`). It therefore imports neither entk nor neural-tangents: the
four convolutional/dense networks are written against a `stax` module passed in (`entk.stax` or
`neural_tangents.stax`, which share layer names, arguments, NTK parameterisation and parameter layout),
and the transformer block, which `entk.stax` has no attention layer for, is a plain JAX function that
both tools receive unchanged.

Every builder returns `(init_fn, apply_fn, input_shape)`: `init_fn(key, input_shape) -> (out_shape,
params)`, `apply_fn(params, x) -> (N, O)` logits, and the shape of one batch (N first). Images are NHWC.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

W_STD, B_STD = 1.0, 0.05

# model name -> (short description used in tables, builder)
Builder = Callable[[Any, int, int], tuple[Callable, Callable, tuple[int, ...]]]


def _dense(stax, outputs):
    return stax.Dense(outputs, W_std=W_STD, b_std=B_STD)


def _conv(stax, channels, size=3, strides=(1, 1)):
    return stax.Conv(channels, (size, size), strides=strides, padding="SAME", W_std=W_STD,
                     b_std=B_STD)


def mlp(stax, n: int, outputs: int):
    """256 → 512 → 512 → O, ReLU."""
    init_fn, apply_fn, _ = stax.serial(_dense(stax, 512), stax.Relu(), _dense(stax, 512),
                                       stax.Relu(), _dense(stax, outputs))[:3]
    return init_fn, apply_fn, (n, 256)


def cnn(stax, n: int, outputs: int):
    """Two 3×3 SAME convs with 32 channels and ReLU on 16×16×3 images, flatten, dense to O."""
    init_fn, apply_fn, _ = stax.serial(_conv(stax, 32), stax.Relu(), _conv(stax, 32), stax.Relu(),
                                       stax.Flatten(), _dense(stax, outputs))[:3]
    return init_fn, apply_fn, (n, 16, 16, 3)


def _wide_resnet_block(stax, channels, strides=(1, 1), project=False):
    main = stax.serial(stax.Relu(), _conv(stax, channels, strides=strides), stax.Relu(),
                       _conv(stax, channels))
    shortcut = _conv(stax, channels, strides=strides) if project else stax.Identity()
    return stax.serial(stax.FanOut(2), stax.parallel(main, shortcut), stax.FanInSum())


def wrn_block(stax, n: int, outputs: int):
    """A WideResNet group on 16×16×3 images: 3×3 conv stem (32 ch), a block of 32 channels and a
    strided block of 64 (3×3 conv shortcut), global average pooling, dense to O."""
    init_fn, apply_fn, _ = stax.serial(
        _conv(stax, 32), _wide_resnet_block(stax, 32),
        _wide_resnet_block(stax, 64, strides=(2, 2), project=True),
        stax.Relu(), stax.GlobalAvgPool(), _dense(stax, outputs))[:3]
    return init_fn, apply_fn, (n, 16, 16, 3)


def _basic_block(stax, channels, strides=(1, 1), project=False):
    main = stax.serial(_conv(stax, channels, strides=strides), stax.Relu(), _conv(stax, channels))
    shortcut = _conv(stax, channels, size=1, strides=strides) if project else stax.Identity()
    return stax.serial(stax.FanOut(2), stax.parallel(main, shortcut), stax.FanInSum(), stax.Relu())


def resnet18(stax, n: int, outputs: int):
    """ResNet-18 for CIFAR-sized (32×32×3) images: 3×3 stem with 64 channels, four stages of two basic
    blocks (64, 128, 256, 512 channels; stride 2 and a 1×1 projection entering stages 2-4), global
    average pooling, dense to O. No normalisation layers (stax has none that is per-example)."""
    layers = [_conv(stax, 64), stax.Relu()]
    for i, channels in enumerate((64, 128, 256, 512)):
        strides = (1, 1) if i == 0 else (2, 2)
        layers += [_basic_block(stax, channels, strides, project=i > 0), _basic_block(stax, channels)]
    layers += [stax.GlobalAvgPool(), _dense(stax, outputs)]
    init_fn, apply_fn, _ = stax.serial(*layers)[:3]
    return init_fn, apply_fn, (n, 32, 32, 3)


TOKENS, WIDTH, HEADS = 16, 64, 4


def transformer(stax, n: int, outputs: int):
    """One pre-LayerNorm transformer block (4-head softmax attention, GELU MLP of width 256) on 16
    tokens of width 64, mean over tokens, dense to O. Plain JAX (`stax` is unused)."""
    del stax

    def init_fn(key, input_shape):
        rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 31 - 1)))

        def dense(a, b):
            return {"w": jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), jnp.float32),
                    "b": jnp.zeros((b,), jnp.float32)}

        params = {name: dense(WIDTH, WIDTH) for name in ("q", "k", "v", "o")}
        params.update(mlp1=dense(WIDTH, 4 * WIDTH), mlp2=dense(4 * WIDTH, WIDTH),
                      out=dense(WIDTH, outputs))
        return (input_shape[0], outputs), params

    def layer_norm(x):
        mean = x.mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)

    def apply_fn(p, x, **kwargs):
        b, t, d = x.shape
        h = layer_norm(x)
        q, k, v = ((h @ p[c]["w"] + p[c]["b"]).reshape(b, t, HEADS, d // HEADS) for c in "qkv")
        att = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d // HEADS), axis=-1)
        x = x + jnp.einsum("bhts,bshd->bthd", att, v).reshape(b, t, d) @ p["o"]["w"] + p["o"]["b"]
        h = jax.nn.gelu(layer_norm(x) @ p["mlp1"]["w"] + p["mlp1"]["b"])
        x = x + h @ p["mlp2"]["w"] + p["mlp2"]["b"]
        return x.mean(axis=1) @ p["out"]["w"] + p["out"]["b"]

    return init_fn, apply_fn, (n, TOKENS, WIDTH)


MODELS: dict[str, Builder] = {"mlp": mlp, "cnn": cnn, "wrn_block": wrn_block, "resnet18": resnet18,
                              "transformer": transformer}


def build(stax, model: str, n: int, outputs: int) -> tuple[Callable, Any, tuple[int, ...]]:
    """`(apply_fn, params_treedef_example, input_shape)`: the network and a freshly initialised
    parameter tree (its structure; values are replaced by the shared ones)."""
    init_fn, apply_fn, input_shape = MODELS[model](stax, n, outputs)
    _, params = init_fn(jax.random.PRNGKey(0), input_shape)
    return apply_fn, params, input_shape


def set_leaves(params: Any, leaves: list[np.ndarray]) -> Any:
    """`params` with its leaves replaced, in order, by `leaves`. Sizes must agree; shapes may differ by
    unit axes (neural-tangents keeps biases as `(1, ..., 1, C)`, entk as `(C,)`)."""
    old, treedef = jax.tree_util.tree_flatten(params)
    if len(old) != len(leaves):
        raise ValueError(f"parameter trees differ: {len(old)} leaves here, {len(leaves)} given")
    for i, (a, b) in enumerate(zip(old, leaves)):
        if np.size(a) != np.size(b):
            raise ValueError(f"parameter leaf {i}: shape {np.shape(a)} here, {np.shape(b)} given")
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(b).reshape(np.shape(a)) for a, b in zip(old, leaves)])
