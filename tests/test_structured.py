"""Structured derivatives (SD) against a brute-force float64 Jacobian contraction.

The reference is `jax.jacrev` (`jacfwd` for a `while` loop) of the flattened parameters, contracted by
hand in NumPy and reduced with neural-tangents' axis semantics written out independently here. The
zoo of `tests/jax_models.py` provides the standard architectures; the models below add what SD must
see through: transposed convolutions, tied embeddings, an embedding + transformer block, a GRU scan, a
scan over stacked layer parameters, nested `jit`, `custom_jvp` / `custom_vjp` functions of parameters,
a learned input image, `cond`, `while` and a primitive without a rule.
"""

from __future__ import annotations

import functools
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.flatten_util import ravel_pytree

import entk
from entk.algorithms import structured
from entk.algorithms.axes import KernelAxes, VmapAxes
from tests import jax_models
from tests.reference import reduce_axes

F64 = jnp.float64


# --- reference -------------------------------------------------------------------------------------


ZOO_VOCABULARY = 7  # integer inputs of tests/jax_models.py lie in [0, 7)


@functools.lru_cache(maxsize=None)
def case(name: str, n2: int = 2):
    """`(f, params, x1, x2)` of a zoo model or of one of the models below (3 and `n2` examples).

    Values come from NumPy (compiling `jax.random` for every parameter shape would dominate the
    run time); the zoo's own parameter structure and input shapes are read with `jax.eval_shape`.
    """
    rng = np.random.default_rng(zlib.crc32(name.encode()) + n2)

    def normal(shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), F64)

    if name in jax_models.ZOO:
        box = {}

        def build():
            f, params, x1, x2 = jax_models.make(name, n2=n2)
            box["f"] = f
            return params, x1, x2

        params, x1, x2 = jax.eval_shape(build)
        params = jax.tree_util.tree_map(lambda s: normal(s.shape, 0.5), params)
        f, shape, vocab = box["f"], x1.shape[1:], (ZOO_VOCABULARY if x1.dtype.kind == "i" else 0)
    else:
        f, params, shape, vocab = MODELS[name](normal)
    if vocab:
        return (f, params, jnp.asarray(rng.integers(0, vocab, (3,) + shape)),
                jnp.asarray(rng.integers(0, vocab, (n2,) + shape)))
    return f, params, normal((3,) + shape), normal((n2,) + shape)


# Models whose examples interact (a branch or an index on whole-batch data): their x1 and x2 Jacobians
# are computed separately; for the others one Jacobian of the concatenated batch serves both.
COUPLED = {"conditional", "mixed_views"}


@functools.lru_cache(maxsize=None)
def jacobians(name: str, n2: int = 2) -> tuple[list, list]:
    """Per output leaf, the flattened-parameter Jacobians at x1 and x2 (NumPy)."""
    f, params, x1, x2 = case(name, n2)
    flat, unravel = ravel_pytree(params)
    transform = jax.jacfwd if name == "while_loop" else jax.jacrev
    jac = jax.jit(lambda v, x: transform(lambda w: f(unravel(w), x))(v))
    if name in COUPLED:
        return ([np.asarray(j) for j in jax.tree_util.tree_leaves(jac(flat, x1))],
                [np.asarray(j) for j in jax.tree_util.tree_leaves(jac(flat, x2))])
    both = [np.asarray(j) for j in jax.tree_util.tree_leaves(jac(flat, jnp.concatenate([x1, x2])))]
    n1 = x1.shape[0]
    return [j[:n1] for j in both], [j[n1:] for j in both]


def expected(name: str, trace_axes=(-1,), diagonal_axes=(), same: bool = False, n2: int = 2) -> list:
    j1, j2 = jacobians(name, n2)
    j2 = j1 if same else j2
    return [reduce_axes(np.tensordot(a, b, axes=([-1], [-1])), a.ndim - 1, trace_axes, diagonal_axes)
            for a, b in zip(j1, j2)]


def assert_matches(actual, reference: list, rtol: float = 1e-10, what: str = "") -> None:
    leaves = jax.tree_util.tree_leaves(actual)
    assert len(leaves) == len(reference), what
    for a, e in zip(leaves, reference):
        assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
        scale = float(np.max(np.abs(e))) or 1.0
        err = float(np.max(np.abs(np.asarray(a, np.float64) - e))) / scale
        assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


def sd(f, x1, x2, params, trace_axes=(-1,), diagonal_axes=(), vmap_axes=None, **kwargs):
    return structured.empirical_ntk(f, x1, x2, params, kwargs, kwargs,
                                    KernelAxes.create(trace_axes, diagonal_axes),
                                    VmapAxes.create(vmap_axes))


def check(name, trace_axes=(-1,), diagonal_axes=(), vmap_axes=None, same=False, n2=2):
    f, params, x1, x2 = case(name, n2)
    kernel = sd(f, x1, None if same else x2, params, trace_axes, diagonal_axes, vmap_axes)
    assert_matches(kernel, expected(name, trace_axes, diagonal_axes, same, n2),
                   what=f"{name} trace={trace_axes} diag={diagonal_axes} vmap={vmap_axes}")


# --- models ----------------------------------------------------------------------------------------


def _dense_params(normal, n_in, n_out):
    return {"w": normal((n_in, n_out), n_in ** -0.5), "b": normal((n_out,), 0.1)}


def _dense(p, x):
    return x @ p["w"] + p["b"]


def _layer_norm(p, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def transposed_conv(normal):
    """conv_transpose (input dilation, flipped kernel), then an asymmetrically padded conv."""
    params = {"t": normal((3, 3, 3, 2), 0.4), "c": normal((2, 2, 3, 2), 0.4),
              "out": _dense_params(normal, 2 * 8 * 8, 3)}
    dims = ("NHWC", "HWIO", "NHWC")

    def f(p, x):
        y = jnp.tanh(lax.conv_transpose(x, p["t"], (2, 2), "SAME", dimension_numbers=dims,
                                        transpose_kernel=True))
        y = lax.conv_general_dilated(y, p["c"], (1, 1), ((1, 0), (0, 1)), dimension_numbers=dims)
        return _dense(p["out"], jnp.tanh(y).reshape(y.shape[0], -1))

    return f, params, (4, 4, 2), 0


def tied_embedding(normal):
    """One table for the token lookup and, transposed, for the output projection."""
    params = {"emb": normal((7, 4)), "h": _dense_params(normal, 4, 4)}

    def f(p, x):
        h = jnp.tanh(_dense(p["h"], p["emb"][x])).mean(1)
        return h @ p["emb"].T

    return f, params, (5,), 7


def transformer(normal, heads=2, d=8, vocab=11, t=5):
    """Token + position embedding, pre-LN block (multi-head attention, GELU MLP), mean-pool readout."""
    params = {"emb": normal((vocab, d)), "pos": normal((t, d), 0.1),
              "ln1": {"scale": 1 + normal((d,), 0.1), "bias": normal((d,), 0.1)},
              "qkv": normal((d, 3 * d), d ** -0.5), "o": _dense_params(normal, d, d),
              "ln2": {"scale": 1 + normal((d,), 0.1), "bias": normal((d,), 0.1)},
              "m1": _dense_params(normal, d, 2 * d), "m2": _dense_params(normal, 2 * d, d),
              "out": _dense_params(normal, d, 3)}

    def f(p, x):
        n = x.shape[0]
        h = p["emb"][x] + p["pos"]
        q, k, v = jnp.split(_layer_norm(p["ln1"], h) @ p["qkv"], 3, axis=-1)
        q, k, v = (a.reshape(n, t, heads, d // heads) for a in (q, k, v))
        att = jax.nn.softmax(jnp.einsum("nthd,nshd->nhts", q, k) / (d // heads) ** 0.5, axis=-1)
        h = h + _dense(p["o"], jnp.einsum("nhts,nshd->nthd", att, v).reshape(n, t, d))
        h = h + _dense(p["m2"], jax.nn.gelu(_dense(p["m1"], _layer_norm(p["ln2"], h))))
        return _dense(p["out"], h.mean(1))

    return f, params, (t,), vocab


def gru(normal, d_in=3, d_h=4):
    """A GRU over 4 steps with lax.scan (fused gate weights, split per gate)."""
    params = {"wx": normal((d_in, 3 * d_h), 0.5), "wh": normal((d_h, 3 * d_h), 0.5),
              "b": normal((3 * d_h,), 0.1), "out": _dense_params(normal, d_h, 2)}

    def f(p, x):
        def step(h, x_t):
            zx, rx, nx = jnp.split(x_t @ p["wx"] + p["b"], 3, -1)
            zh, rh, nh = jnp.split(h @ p["wh"], 3, -1)
            z, r = jax.nn.sigmoid(zx + zh), jax.nn.sigmoid(rx + rh)
            h = (1 - z) * jnp.tanh(nx + r * nh) + z * h
            return h, h

        h, hs = lax.scan(step, jnp.zeros((x.shape[0], d_h), x.dtype), jnp.swapaxes(x, 0, 1))
        return _dense(p["out"], h + hs.mean(0))

    return f, params, (4, d_in), 0


@jax.custom_jvp
def _softplus_scaled(w, x):
    return jnp.logaddexp(x * w, 0.0)


@_softplus_scaled.defjvp
def _softplus_scaled_jvp(primals, tangents):
    (w, x), (dw, dx) = primals, tangents
    return _softplus_scaled(w, x), jax.nn.sigmoid(x * w) * (dw * x + dx * w)


@jax.custom_vjp
def _gate(w, x):
    """A quantized gate, straight-through: its custom VJP is not the derivative of its primal (zero
    almost everywhere), so structured derivatives must use the rule, not inline the primal."""
    return x * jnp.round(4 * jnp.tanh(w)) / 4


_gate.defvjp(lambda w, x: (_gate(w, x), (w, x)),
             lambda res, ct: ((ct * res[1] / jnp.cosh(res[0]) ** 2).sum(0), ct * jnp.tanh(res[0])))


def nested_calls(normal):
    """Parameters inside a rematerialised nested jax.jit, a custom_jvp and a custom_vjp function of
    parameters."""
    params = {"a": _dense_params(normal, 5, 6), "s": normal((6,), 0.5),
              "g": normal((6,), 0.5), "out": _dense_params(normal, 6, 3)}
    layer = jax.checkpoint(jax.jit(lambda p, x: jnp.tanh(_dense(p, x))))

    def f(p, x):
        h = _softplus_scaled(p["s"], layer(p["a"], x))
        return jax.jit(_dense)(p["out"], _gate(p["g"], h))

    return f, params, (5,), 0


def learned_input(normal):
    """A learned 5x5 image convolved with a learned kernel, read out against each input."""
    params = {"img": normal((1, 5, 5, 2)), "k": normal((3, 3, 2, 3), 0.4),
              "w": normal((4, 27), 0.3)}

    def f(p, x):
        y = lax.conv_general_dilated(p["img"], p["k"], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(x @ p["w"]) * jnp.tanh(y).reshape(1, 27)

    return f, params, (4,), 0


def layer_scan(normal, depth=3, d=4):
    """lax.scan over stacked layer parameters, then a fori_loop indexing a parameter per step."""
    params = {"ws": normal((depth, d, d), 0.5), "bs": normal((depth, d), 0.1),
              "u": normal((depth, d), 0.3)}

    def f(p, x):
        h, _ = lax.scan(lambda h, wb: (jnp.tanh(h @ wb[0] + wb[1]), None), x, (p["ws"], p["bs"]))
        return lax.fori_loop(0, depth, lambda i, h: h + p["u"][i] * h.mean(-1, keepdims=True), h)

    return f, params, (d,), 0


def while_loop(normal):
    """A while loop (trip count known only at run time) applying a parameterised layer."""
    params = {"w": normal((4, 4), 0.3), "b": normal((4,), 0.1)}

    def f(p, x):
        n = (jnp.abs(x).max() < 1e9).astype(jnp.int32) + 1
        body = lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["w"] + p["b"]))
        return lax.while_loop(lambda c: c[0] < n, body, (0, x))[1]

    return f, params, (4,), 0


def conditional(normal):
    """lax.cond with a static branch index (inlined) and with a data-dependent one (generic rule)."""
    params = {"a": _dense_params(normal, 4, 4), "b": normal((4, 3), 0.5)}

    def f(p, x):
        h = lax.cond(True, lambda h: jnp.tanh(_dense(p["a"], h)), lambda h: h, x)
        return lax.cond(x.sum() > 0, lambda h: h @ p["b"], lambda h: jnp.sin(h) @ p["b"], h)

    return f, params, (4,), 0


def mixed_views(normal):
    """Disjoint slices of a fused weight, a padded parameter, a parameter concatenated with activations
    and stacked with data (`jnp.stack`, a primitive of its own since JAX 0.10), a table read at a
    data-dependent row and through a static slice, one scalar in several roles."""
    params = {"fused": normal((4, 6), 0.5), "p": normal((3,), 0.5), "table": normal((5, 4), 0.5),
              "s": normal((), 0.5)}

    def f(p, x):
        h = jnp.concatenate([jnp.tanh(x @ p["fused"][:, :3]), jnp.sin(x @ p["fused"][:, 3:])], -1)
        h = h[:, :5] * jnp.pad(p["p"], (1, 1)) * p["s"]
        z = jnp.concatenate([h, jnp.broadcast_to(p["p"], (x.shape[0], 3))], -1)
        row = lax.dynamic_index_in_dim(p["table"], (jnp.abs(x[0, 0]) * 10).astype(jnp.int32) % 5,
                                       keepdims=False)
        g = jnp.stack([p["p"], jnp.full((3,), 0.3)], axis=1)  # (3, 2): a view of p beside data
        return jnp.tanh(z[:, :4] * row + z[:, 4:] @ p["table"][:4] + p["s"] ** 2
                        + jnp.sum(x[:, :3] @ g, -1, keepdims=True))

    return f, params, (4,), 0


def unsupported(normal):
    """`cumprod` (no rule) consumes a parameter, twice."""
    params = {"w": normal((5, 3), 0.5), "c": normal((3,), 0.5)}

    def f(p, x):
        return jnp.tanh(x @ p["w"]) * jnp.cumprod(p["c"]) + jnp.cumprod(p["c"][::-1])

    return f, params, (5,), 0


MODELS = {fn.__name__: fn for fn in (transposed_conv, tied_embedding, transformer, gru, nested_calls,
                                      learned_input, layer_scan, while_loop, conditional, mixed_views,
                                      unsupported)}


# --- tests -----------------------------------------------------------------------------------------

# One configuration per architecture, rotating through trace / vmap settings; x2=None on every other.
ARCHITECTURES = [
    ("conv_nhwc", (-1,), 0), ("conv_nchw", (), None), ("pooling", (-1,), 0), ("residual", (), 0),
    ("scan_rnn", (-1,), None), ("dict_outputs", (), 0), ("scalar_param", (-1,), None),
    ("transposed_conv", (), 0), ("tied_embedding", (), None), ("transformer", (-1,), 0),
    ("gru", (), None), ("nested_calls", (), 0), ("learned_input", (), None), ("layer_scan", (), 0),
    ("while_loop", (-1,), 0), ("conditional", (), None), ("mixed_views", (), None),
]
"""(model, trace_axes, vmap_axes); MLP and embedding are in the axis grid, self-attention in the
multi-axis model and the transformer, layer norm in the float32 test."""


@pytest.mark.parametrize("index", range(len(ARCHITECTURES)),
                         ids=[f"{n}-trace{t}-vmap{v}" for n, t, v in ARCHITECTURES])
def test_architecture(index):
    name, trace_axes, vmap_axes = ARCHITECTURES[index]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", structured.NoStructureRuleWarning)
        check(name, trace_axes, (), vmap_axes, same=bool(index % 2))


@pytest.mark.parametrize("vmap_axes", [None, 0], ids=["novmap", "vmap0"])
@pytest.mark.parametrize("diagonal_axes", [(), (0,)], ids=["nodiag", "diag0"])
@pytest.mark.parametrize("trace_axes", [(), (-1,)], ids=["full", "traced"])
@pytest.mark.parametrize("name", ["mlp", "embedding"])
def test_axis_grid(name, trace_axes, diagonal_axes, vmap_axes):
    same = (len(trace_axes) + len(diagonal_axes)) % 2 == 1
    check(name, trace_axes, diagonal_axes, vmap_axes, same=same, n2=3)


@pytest.mark.parametrize("trace_axes, diagonal_axes, vmap_axes", [
    ((1,), (2,), None), ((2,), (0,), 0), ((), (0, 1), 0),
])
def test_multi_axis_outputs(trace_axes, diagonal_axes, vmap_axes):
    """Outputs (N, A, B) of a self-attention layer, with traced and diagonal inner axes."""
    check("multi_axis", trace_axes, diagonal_axes, vmap_axes, n2=3)


def test_float32():
    """Layer norm, GELU MLP in float32: float32 kernel, float64 reference."""
    f, params, x1, x2 = case("layer_norm")
    to32 = functools.partial(jax.tree_util.tree_map, lambda a: a.astype(jnp.float32))
    kernel = sd(f, to32(x1), to32(x2), to32(params), trace_axes=(), vmap_axes=0)
    assert kernel.dtype == jnp.float32
    assert_matches(kernel, expected("layer_norm", ()), rtol=1e-4)


def test_under_jit():
    f, params, x1, x2 = case("residual")
    fn = jax.jit(lambda a, b, p: sd(f, a, b, p, trace_axes=(), vmap_axes=None))
    assert_matches(fn(x1, x2, params), expected("residual", ()))


def test_primitive_without_rule_warns_once_and_is_exact():
    f, params, x1, x2 = case("unsupported")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = sd(f, x1, x2, params, trace_axes=())
    messages = [str(w.message) for w in caught if issubclass(w.category, structured.NoStructureRuleWarning)]
    assert len(messages) == 1 and "'cumprod'" in messages[0], messages
    assert_matches(kernel, expected("unsupported", ()))


def test_keyword_arguments_static_and_batched():
    """Array kwargs batched with vmap_axes, a static flag closed over, f(params, x, **kw)."""
    f0, params, x1, x2 = case("mlp")
    scale1 = jnp.linspace(0.5, 1.5, 3)[:, None]

    def f(p, x, scale, flip=False):
        return f0(p, (-x if flip else x) * scale)

    vmap = VmapAxes.create((0, 0, {"scale": 0}))
    kw = {"scale": scale1, "flip": True}
    kernel = structured.empirical_ntk(f, x1, None, params, kw, kw, KernelAxes.create((), ()), vmap)
    flat, unravel = ravel_pytree(params)
    j = np.asarray(jax.jit(jax.jacrev(lambda v: f(unravel(v), x1, scale1, True)))(flat))
    assert_matches(kernel, [reduce_axes(np.tensordot(j, j, ([-1], [-1])), 2, (), ())])


def test_end_to_end_through_empirical_ntk_fn():
    f, params, x1, x2 = case("tied_embedding")
    fn = entk.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation="sd")
    assert_matches(fn(x1, x2, params), expected("tied_embedding", ()))


def test_parameter_output_and_unused_parameter():
    """A parameter returned (reshaped) as an output, next to a parameter nothing uses."""
    params = {"w": jnp.arange(6.0, dtype=F64).reshape(2, 3) / 5, "unused": jnp.ones((2,), F64)}
    x = jnp.linspace(-1.0, 1.0, 6, dtype=F64).reshape(3, 2)

    def f(p, x):
        return {"y": jnp.tanh(x @ p["w"]), "w": jnp.broadcast_to(p["w"].T.reshape(1, 6), (3, 6))}

    kernel = sd(f, x, None, params, trace_axes=())
    flat, unravel = ravel_pytree(params)
    jac = jax.jit(jax.jacrev(lambda v: f(unravel(v), x)))
    j = [np.asarray(a) for a in jax.tree_util.tree_leaves(jac(flat))]
    assert_matches(kernel, [reduce_axes(np.tensordot(a, a, ([-1], [-1])), a.ndim - 1, (), ())
                            for a in j])


def test_integer_constant_folding_matches_xla():
    """Index arithmetic folded with NumPy while flattening equals XLA's result, wrap-around included."""
    from entk.algorithms.structured.graph import eval_eqn, fold

    big = np.int32(2**31 - 5)

    def index_math(i, v):
        j = jnp.clip(i * 3 - 1, 0, 5) + big  # wraps around in int32
        k = jnp.where((i > 1) & ~(i == 4) | (i < 0), j, -i) ^ 3
        grid = lax.broadcasted_iota(jnp.int32, (2, 3), 1) + jnp.maximum(i, 1)
        w = jnp.concatenate([grid.T.reshape(-1), lax.rev(v, (0,))[1:3], lax.dynamic_slice(v, (i,), (2,))])
        return (k, jnp.minimum(w, 7).astype(jnp.int16), (w != 2).astype(jnp.int32), grid[None, :, 1:],
                lax.select_n(i % 2 == 0, v[:3], v[3:6]), jnp.squeeze(grid[:1], 0))

    for i in (-3, 2, 4, 9):
        v = jnp.arange(7, dtype=jnp.int32) * 5 - 11
        closed = jax.make_jaxpr(index_math)(jnp.int32(i), v)
        env = dict(zip(closed.jaxpr.invars, [np.int32(i), np.asarray(v)]))
        env.update(zip(closed.jaxpr.constvars, closed.consts))
        numpy_folded = set()
        for eqn in closed.jaxpr.eqns:
            invals = [a.val if isinstance(a, jax.extend.core.Literal) else env[a] for a in eqn.invars]
            with jax.ensure_compile_time_eval():
                reference = eval_eqn(eqn, invals)
            got = fold(eqn, invals)
            if isinstance(got[0], np.ndarray):
                numpy_folded.add(eqn.primitive.name)
            for g, r in zip(got, reference):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(r), err_msg=str(eqn))
                assert np.asarray(g).dtype == np.asarray(r).dtype, eqn
            env.update(zip(eqn.outvars, reference))
        assert {"add", "mul", "sub", "and", "or", "not", "xor", "select_n", "iota", "concatenate",
                "dynamic_slice", "convert_element_type", "transpose", "rev"} <= numpy_folded


def test_views_bounds_and_overlaps_match_their_index_maps():
    """The cheap summaries of parameter views (lazy whole-leaf maps, bounds, overlaps) against
    brute force on the index maps themselves."""
    from entk.algorithms.structured.views import analyze

    params = {"a": jnp.ones((3, 4)), "b": jnp.ones((4,)), "c": jnp.ones((2, 3, 2))}

    def f(p, x):
        a, b, c = p["a"], p["b"], p["c"]
        pieces = [x @ a.T, a @ x.T, a[:, ::2].sum() * x, b * x, jnp.broadcast_to(b, (2, 4)) * x,
                  jnp.pad(b, (1, 0))[:4] * x, jnp.concatenate([b[:2], x[0, :2]]) * x[0],
                  jnp.transpose(c, (2, 0, 1)).reshape(-1)[:4] * x,
                  x[:, :3] @ jnp.swapaxes(c, 0, 2)[0]]
        return sum(jnp.sum(jnp.asarray(q)) for q in pieces)

    closed = jax.make_jaxpr(f)(params, jnp.ones((2, 4)))
    views = [use.view for use in analyze(closed, 3).uses]
    assert any(v.leaf_perm is not None for v in views) and any(v.leaf_perm is None for v in views)
    for v in views:
        idx = np.asarray(v.idx)
        assert idx.shape == v.shape
        touched = np.unique(idx[idx >= 0])
        np.testing.assert_array_equal(v.flat_params, touched)
        assert v.bounds == ((int(touched[0]), int(touched[-1])) if touched.size else (0, -1))
        assert v.clean == bool(np.all(idx >= 0) and touched.size == idx.size)
        for w in views:
            other = np.asarray(w.idx)
            assert v.overlaps(w) == bool(np.intersect1d(touched, other[other >= 0]).size)
            if v.key == w.key:
                np.testing.assert_array_equal(idx, other)
