"""Benchmark models as `(f, params, x)` builders, pure JAX, float32, NHWC images."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _keys(n, seed=0):
    return iter(jax.random.split(jax.random.PRNGKey(seed), n))


def _dense(key, a, b):
    return {"w": jax.random.normal(key, (a, b)) / jnp.sqrt(a), "b": jnp.zeros(b)}


def mlp(n, outputs, width=512, depth=2, input_size=256):
    keys = _keys(depth + 2)
    sizes = [input_size] + [width] * depth + [outputs]
    params = [_dense(next(keys), a, b) for a, b in zip(sizes[:-1], sizes[1:])]

    def f(p, x):
        for layer in p[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        return x @ p[-1]["w"] + p[-1]["b"]

    return f, params, jax.random.normal(next(keys), (n, input_size))


def cnn(n, outputs, channels=32, size=16, pool=True, depthwise=False):
    keys = _keys(5)
    dims = ("NHWC", "HWIO", "NHWC")
    params = {"c1": jax.random.normal(next(keys), (3, 3, 3, channels)) / 3,
              "c2": (jax.random.normal(next(keys), (3, 3, 1, channels)) / 3 if depthwise else
                     jax.random.normal(next(keys), (3, 3, channels, channels)) / (3 * channels ** 0.5))}
    spatial = (size // 4) ** 2 if pool else 1
    params["out"] = _dense(next(keys), channels * spatial, outputs)

    def f(p, x):
        y = jax.nn.relu(lax.conv_general_dilated(x, p["c1"], (1, 1), "SAME", dimension_numbers=dims))
        if pool:
            y = lax.reduce_window(y, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
        y = jax.nn.relu(lax.conv_general_dilated(y, p["c2"], (1, 1), "SAME", dimension_numbers=dims,
                                                 feature_group_count=channels if depthwise else 1))
        if pool:
            y = lax.reduce_window(y, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
            y = y.reshape(y.shape[0], -1)
        else:
            y = y.mean(axis=(1, 2))
        return y @ p["out"]["w"] + p["out"]["b"]

    return f, params, jax.random.normal(next(keys), (n, size, size, 3))


def _layer_norm(x):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)


def transformer(n, outputs, tokens=16, width=64, heads=4, vocab=None):
    """One pre-LN transformer block; integer tokens through an embedding when `vocab` is given."""
    keys = _keys(10)
    params = {name: _dense(next(keys), width, width) for name in ("q", "k", "v", "o")}
    params["mlp1"] = _dense(next(keys), width, 4 * width)
    params["mlp2"] = _dense(next(keys), 4 * width, width)
    params["out"] = _dense(next(keys), width, outputs)
    if vocab:
        params["embed"] = jax.random.normal(next(keys), (vocab, width))

    def f(p, x):
        if vocab:
            x = p["embed"][x]
        b, t, d = x.shape
        h = _layer_norm(x)
        q, k, v = ((h @ p[c]["w"] + p[c]["b"]).reshape(b, t, heads, d // heads) for c in "qkv")
        att = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(d // heads), axis=-1)
        x = x + jnp.einsum("bhts,bshd->bthd", att, v).reshape(b, t, d) @ p["o"]["w"]
        h = jax.nn.gelu(_layer_norm(x) @ p["mlp1"]["w"] + p["mlp1"]["b"])
        x = x + h @ p["mlp2"]["w"] + p["mlp2"]["b"]
        return x.mean(axis=1) @ p["out"]["w"] + p["out"]["b"]

    key = next(keys)
    x = (jax.random.randint(key, (n, tokens), 0, vocab) if vocab
         else jax.random.normal(key, (n, tokens, width)))
    return f, params, x
