"""Example models for `entk compare` / `entk ntk` (SPEC examples/jax_models.py:mlp)."""

import jax
import jax.numpy as jnp


def mlp(outputs: int = 10, width: int = 64, depth: int = 2, input_size: int = 32):
    """A tanh MLP as `(f, params)`; examples are flat vectors of `input_size`."""
    sizes = [input_size] + [width] * depth + [outputs]
    keys = jax.random.split(jax.random.PRNGKey(0), len(sizes) - 1)
    params = [{"w": jax.random.normal(k, (a, b)) / jnp.sqrt(a), "b": jnp.zeros(b)}
              for k, a, b in zip(keys, sizes[:-1], sizes[1:])]

    def f(params, x):
        x = x.reshape(x.shape[0], -1)
        for layer in params[:-1]:
            x = jnp.tanh(x @ layer["w"] + layer["b"])
        return x @ params[-1]["w"] + params[-1]["b"]

    return f, params


def cnn(outputs: int = 10, channels: int = 16):
    """Two 3x3 convs (NHWC) and a dense readout, as `(f, params)`."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"c1": jax.random.normal(k1, (3, 3, 3, channels)) / 3,
              "c2": jax.random.normal(k2, (3, 3, channels, channels)) / (3 * channels ** 0.5),
              "out": jax.random.normal(k3, (channels, outputs)) / channels ** 0.5}

    def f(params, x):
        dims = ("NHWC", "HWIO", "NHWC")
        y = jax.nn.relu(jax.lax.conv_general_dilated(x, params["c1"], (1, 1), "SAME",
                                                     dimension_numbers=dims))
        y = jax.nn.relu(jax.lax.conv_general_dilated(y, params["c2"], (1, 1), "SAME",
                                                     dimension_numbers=dims))
        return y.mean(axis=(1, 2)) @ params["out"]

    return f, params
