"""A small zoo of pure-JAX architectures `(f, params, x1, x2)` for kernel tests (float64, tiny sizes).

Every model maps a batch to outputs with the batch on axis 0 and treats examples independently, so the
same cases serve `vmap_axes=0`. `x1` has 3 examples and `x2` has 2 (`make(name, n2=3)` for diagonal tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DTYPE = jnp.float64


def _rng(key) -> np.random.Generator:
    return np.random.default_rng(np.asarray(key).tolist())


def _normal(key, shape, scale=1.0, dtype=DTYPE):
    """Gaussian array from NumPy (a float64 jax.random call compiles once per shape: slow in tests).

    Under tracing (e.g. `jax.eval_shape` of a builder, to get parameter shapes) the key is abstract,
    so jax.random stands in: only shapes are computed then.
    """
    if isinstance(key, jax.core.Tracer):
        return scale * jax.random.normal(key, shape, dtype)
    return jnp.asarray(scale * _rng(key).standard_normal(shape), dtype)


def _dense_params(key, n_in, n_out):
    k1, k2 = jax.random.split(key)
    return {"w": _normal(k1, (n_in, n_out), n_in ** -0.5), "b": _normal(k2, (n_out,), 0.1)}


def _dense(p, x):
    return x @ p["w"] + p["b"]


def mlp(keys):
    params = [_dense_params(keys[0], 5, 8), _dense_params(keys[1], 8, 3)]

    def f(p, x):
        return _dense(p[1], jnp.tanh(_dense(p[0], x)))

    return f, params, (5,), "float"


def _conv(x, w, strides, padding, dims, groups=1, dilation=None):
    return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                    dimension_numbers=dims, feature_group_count=groups)


def conv_nhwc(keys):
    """NHWC: strided SAME grouped conv, then a depthwise VALID conv, then a dense readout."""
    params = {"c1": _normal(keys[0], (3, 3, 2, 6), 0.4),      # HWIO, 2 groups: 4 -> 6 channels
              "c2": _normal(keys[1], (2, 2, 1, 6), 0.5),      # depthwise
              "out": _dense_params(keys[2], 2 * 2 * 6, 3)}

    def f(p, x):
        dims = ("NHWC", "HWIO", "NHWC")
        y = jax.nn.relu(_conv(x, p["c1"], (2, 2), "SAME", dims, groups=2))
        y = jnp.tanh(_conv(y, p["c2"], (1, 1), "VALID", dims, groups=6))
        return _dense(p["out"], y.reshape(y.shape[0], -1))

    return f, params, (6, 6, 4), "float"


def conv_nchw(keys):
    """NCHW/OIHW: dilated conv with asymmetric explicit padding, global mean, dense readout."""
    params = {"c": _normal(keys[0], (4, 3, 3, 3), 0.3), "cb": _normal(keys[1], (4, 1, 1), 0.1),
              "out": _dense_params(keys[2], 4, 2)}

    def f(p, x):
        y = _conv(x, p["c"], (1, 2), ((1, 1), (0, 2)), ("NCHW", "OIHW", "NCHW"), dilation=(2, 1))
        y = jnp.tanh(y + p["cb"])
        return _dense(p["out"], y.mean(axis=(2, 3)))

    return f, params, (3, 7, 7), "float"


def pooling(keys):
    """Conv, then max pooling and average pooling (reduce_window), concatenated."""
    params = {"c": _normal(keys[0], (3, 3, 2, 4), 0.4), "out": _dense_params(keys[1], 2 * 2 * 4 * 2, 3)}

    def f(p, x):
        y = jnp.tanh(_conv(x, p["c"], (1, 1), "SAME", ("NHWC", "HWIO", "NHWC")))
        window, strides = (1, 2, 2, 1), (1, 2, 2, 1)
        mx = lax.reduce_window(y, -jnp.inf, lax.max, window, strides, "VALID")
        avg = lax.reduce_window(y, 0.0, lax.add, window, strides, "VALID") / 4
        z = jnp.concatenate([mx, avg], axis=-1)
        return _dense(p["out"], z.reshape(z.shape[0], -1))

    return f, params, (4, 4, 2), "float"


def _layer_norm(p, x, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def layer_norm(keys):
    params = {"d1": _dense_params(keys[0], 5, 6),
              "ln": {"scale": 1 + _normal(keys[1], (6,), 0.1), "bias": _normal(keys[2], (6,), 0.1)},
              "d2": _dense_params(keys[3], 6, 3)}

    def f(p, x):
        return _dense(p["d2"], jax.nn.gelu(_layer_norm(p["ln"], _dense(p["d1"], x))))

    return f, params, (5,), "float"


def residual(keys):
    params = {"a": _dense_params(keys[0], 5, 7), "b": _dense_params(keys[1], 7, 5),
              "out": _dense_params(keys[2], 5, 3)}

    def f(p, x):
        h = x + _dense(p["b"], jax.nn.relu(_dense(p["a"], x)))
        return _dense(p["out"], h)

    return f, params, (5,), "float"


def _attention(p, x, heads=2):
    n, t, d = x.shape
    q, k, v = (_dense(p[name], x).reshape(n, t, heads, d // heads) for name in ("q", "k", "v"))
    logits = jnp.einsum("nthd,nshd->nhts", q, k) / jnp.sqrt(d // heads)
    y = jnp.einsum("nhts,nshd->nthd", jax.nn.softmax(logits, axis=-1), v).reshape(n, t, d)
    return _dense(p["o"], y)


def attention(keys):
    """Multi-head self-attention over 4 tokens of width 6, mean-pooled to 3 outputs."""
    params = {name: _dense_params(k, 6, 6) for name, k in zip("qkvo", keys[:4])}
    params["out"] = _dense_params(keys[4], 6, 3)

    def f(p, x):
        return _dense(p["out"], _attention(p, x).mean(axis=1))

    return f, params, (4, 6), "float"


def embedding(keys):
    """Integer tokens (vocabulary 7) looked up in an embedding table, mean-pooled, dense readout."""
    params = {"table": _normal(keys[0], (7, 4)), "out": _dense_params(keys[1], 4, 3)}

    def f(p, x):
        return _dense(p["out"], jnp.tanh(p["table"][x]).mean(axis=1))

    return f, params, (5,), "int"


def scan_rnn(keys):
    """Elman RNN over 4 time steps with lax.scan; the recurrent weights are reused at every step."""
    params = {"w": _normal(keys[0], (3, 5), 0.5), "u": _normal(keys[1], (5, 5), 0.4),
              "b": _normal(keys[2], (5,), 0.1), "out": _dense_params(keys[3], 5, 2)}

    def f(p, x):
        def step(h, x_t):
            h = jnp.tanh(x_t @ p["w"] + h @ p["u"] + p["b"])
            return h, h

        h0 = jnp.zeros((x.shape[0], 5), x.dtype)
        h, _ = lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
        return _dense(p["out"], h)

    return f, params, (4, 3), "float"


def dict_outputs(keys):
    params = {"a": _dense_params(keys[0], 5, 3), "b": _normal(keys[1], (5, 2, 2), 0.4)}

    def f(p, x):
        return {"logits": _dense(p["a"], x), "pair": jnp.tanh(jnp.einsum("ni,ijk->njk", x, p["b"]))}

    return f, params, (5,), "float"


def scalar_param(keys):
    params = {"w": _normal(keys[0], (5, 3), 0.5), "scale": jnp.asarray(1.3, DTYPE)}

    def f(p, x):
        return p["scale"] * jnp.tanh(x @ p["w"])

    return f, params, (5,), "float"


def multi_axis(keys):
    """Output (N, A=3, B=2): a per-token readout of a small attention layer."""
    params = {name: _dense_params(k, 4, 4) for name, k in zip("qkvo", keys[:4])}
    params["out"] = _dense_params(keys[4], 4, 2)

    def f(p, x):
        return _dense(p["out"], jnp.tanh(_attention(p, x)))

    return f, params, (3, 4), "float"


ZOO = {fn.__name__: fn for fn in (mlp, conv_nhwc, conv_nchw, pooling, layer_norm, residual, attention,
                                  embedding, scan_rnn, dict_outputs, scalar_param, multi_axis)}


def make(name: str, n1: int = 3, n2: int = 2, seed: int = 0):
    """`(f, params, x1, x2)` for zoo entry `name`."""
    keys = [np.array([seed, i], np.uint32) for i in range(8)]
    f, params, shape, kind = ZOO[name](keys)
    if kind == "int":
        x1 = jnp.asarray(_rng(keys[6]).integers(0, 7, (n1,) + shape), jnp.int32)
        x2 = jnp.asarray(_rng(keys[7]).integers(0, 7, (n2,) + shape), jnp.int32)
    else:
        x1 = _normal(keys[6], (n1,) + shape)
        x2 = _normal(keys[7], (n2,) + shape)
    return f, params, x1, x2
