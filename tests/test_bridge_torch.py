"""PyTorch bridge mode ("via torch.func") and the shared foreign-function machinery.

References are PyTorch itself: outputs of the module, `torch.func.jvp` / `vjp` / `vmap`, and eNTKs
from `torch.func.jacrev` Jacobians contracted by hand, all in float64.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import entk

torch = pytest.importorskip("torch")

from entk.adapters._foreign import ForeignFunction, infer_out_specs_by_running  # noqa: E402
from entk.adapters.torch.bridge import TORCH_BACKEND, bridge_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

TOL = 1e-10


class LSTMHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(3, 4, batch_first=True)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        h, _ = self.lstm(x)
        return self.head(h[:, -1])


class EmbedMean(torch.nn.Module):
    """Integer inputs (token ids) and a frozen parameter."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(7, 4)
        self.scale = torch.nn.Parameter(torch.tensor(1.5), requires_grad=False)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids).mean(1) * self.scale))


class TwoOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 2)
        self.b = torch.nn.Linear(3, 1)

    def forward(self, x, y):
        return {"sum": self.a(x) + self.a(y), "pair": (torch.sin(self.b(x)), self.b(y))}


def _cnn():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                              torch.nn.Dropout(0.5), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(12, 2))
    with torch.no_grad():  # non-trivial running statistics, so eval mode is visible
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net


MAKERS = {
    "mlp": (lambda: torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)),
            lambda g, n: torch.randn(n, 3, generator=g, dtype=torch.float64)),
    "cnn": (_cnn, lambda g, n: torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64)),
    "lstm": (LSTMHead, lambda g, n: torch.randn(n, 4, 3, generator=g, dtype=torch.float64)),
    "embed": (EmbedMean, lambda g, n: torch.randint(0, 7, (n, 5), generator=g)),
}


@functools.lru_cache(maxsize=None)
def case(name):
    """(module, bridged model, x1, x2, reference NTK) — built once per test session."""
    make_module, make_input = MAKERS[name]
    torch.manual_seed(0)
    module = make_module().double().eval()
    g = torch.Generator().manual_seed(1)
    x1, x2 = make_input(g, 3), make_input(g, 2)
    return module, bridge_model(module, x1), x1, x2, torch_reference_ntk(module, x1, x2)


def torch_reference_ntk(module, x1, x2):
    """Θ(x1, x2), last output axis traced: Σ_o J1[:, o] J2[:, o]ᵀ / O, J from torch.func.jacrev."""
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    fixed = {**{n: p.detach() for n, p in module.named_parameters() if not p.requires_grad},
             **dict(module.named_buffers())}

    def jacobian(x):
        jac = torch.func.jacrev(lambda p: torch.func.functional_call(module, (p, fixed), (x,)))(params)
        n, o = x.shape[0], module(x[:1]).shape[-1]
        return torch.cat([j.reshape(n, o, -1) for j in jac.values()], -1)

    j1, j2 = jacobian(x1), jacobian(x2)
    return torch.einsum("iop,jop->ij", j1, j2).numpy() / j1.shape[1]


def jx(t):
    return jnp.asarray(t.numpy())


def assert_close(actual, expected, tol=TOL, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(actual - expected).max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}"


# ----------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_outputs_match_torch(name):
    module, model, x1, x2, _ = case(name)
    with torch.no_grad():
        assert_close(model(jx(x1)), module(x1), what=name)
        assert_close(model.apply(model.params, x2), module(x2), what=f"{name} (torch tensor input)")


def test_model_fields():
    module, model, *_ = case("cnn")
    assert list(model.params) == [n for n, _ in module.named_parameters()]
    assert set(model.state["buffers"]) == {n for n, _ in module.named_buffers()}
    assert model.state["frozen"] == {}
    assert model.capabilities == frozenset({"jc", "ntvp"})
    assert model.source == "torch" and model.info["mode"] == "bridge"
    assert "opaque to JAX" in model.info["sd"]
    assert_close(model.params["0.weight"], module[0].weight.detach())

    embed_module, embed, *_ = case("embed")
    assert "scale" not in embed.params and set(embed.state["frozen"]) == {"scale"}
    with_frozen = bridge_model(embed_module, case("embed")[2], include_frozen=True)
    assert "scale" in with_frozen.params


def test_structured_outputs_and_several_inputs():
    torch.manual_seed(0)
    module = TwoOutputs().double()
    x, y = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    model = bridge_model(module, (x, y))
    out = model((jx(x), jx(y)))
    expected = module(x, y)
    assert set(out) == {"sum", "pair"} and isinstance(out["pair"], tuple)
    assert_close(out["sum"], expected["sum"].detach())
    assert_close(out["pair"][0], expected["pair"][0].detach())
    ntk_fn = jax.jit(entk.empirical_ntk_fn(model, implementation="jc"))
    kernel = ntk_fn((jx(x), jx(y)), None, model.params)
    assert kernel["sum"].shape == (2, 2) and kernel["pair"][1].shape == (2, 2)


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.out = torch.nn.Linear(3, 5, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.embed(ids).mean(1)))


def test_tied_weights_are_one_parameter():
    torch.manual_seed(0)
    module = Tied().double()
    ids = torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(0))
    model = bridge_model(module, ids)
    assert list(model.params) == ["embed.weight"]
    zero = {"embed.weight": jnp.zeros_like(model.params["embed.weight"])}
    assert_close(model.apply(zero, ids), np.zeros((3, 5)))  # both uses read the one parameter
    kernel = jax.jit(entk.empirical_ntk_fn(model, implementation="ntvp"))(jx(ids), None, model.params)
    assert_close(kernel, torch_reference_ntk(module, ids, ids))


def test_train_mode_module_runs_in_eval_and_is_restored():
    module = _cnn().double().train()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    model = bridge_model(module, x)
    out = model(jx(x))
    assert module.training and all(m.training for m in module.modules())
    module.eval()
    with torch.no_grad():
        assert_close(out, module(x))


# ----------------------------------------------------------------------------------------------
# Kernels


@pytest.mark.parametrize("name, implementation, vmap_axes", [
    (name, implementation, vmap_axes) for name in ("mlp", "cnn", "lstm")
    for implementation in ("jc", "ntvp") for vmap_axes in (None, 0)
] + [("embed", "jc", None), ("embed", "ntvp", None)])
def test_kernel_matches_torch_func_reference(name, implementation, vmap_axes):
    _, model, x1, x2, reference = case(name)
    ntk_fn = jax.jit(entk.empirical_ntk_fn(model, implementation=implementation, vmap_axes=vmap_axes))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to a Python loop
        kernel = ntk_fn(jx(x1), jx(x2), model.params)
    assert_close(kernel, reference, what=f"{name}/{implementation}/{vmap_axes}")


def test_structured_derivatives_refused():
    _, model, x1, *_ = case("mlp")
    with pytest.raises(ValueError, match="not supported by this model"):
        entk.empirical_ntk_fn(model, implementation="sd")


# ----------------------------------------------------------------------------------------------
# Transforms of the foreign function against torch.func


def _torch_f(module, x):
    buffers = dict(module.named_buffers())
    return lambda p: torch.func.functional_call(module, (p, buffers), (x,))


def _as_torch(tree):
    return {k: torch.from_numpy(np.array(v)) for k, v in tree.items()}


def test_broadcast_operands_reach_torch_without_a_copy():
    """The vmap retry batches the parameters as broadcast views; torch gets them expanded, not copied
    (a copy per kernel column of every weight would not fit for a large bridged model)."""
    from entk.adapters.torch.bridge import _to_torch

    weights = np.arange(6.0).reshape(2, 3)
    view = np.broadcast_to(weights, (1000, 2, 3))
    tensor = _to_torch(view)
    assert tensor.shape == (1000, 2, 3) and tensor.stride()[0] == 0
    assert tensor.data_ptr() == torch.from_dlpack(weights).data_ptr()  # weights' own memory
    np.testing.assert_array_equal(tensor.numpy(), view)


@pytest.mark.parametrize("name", ["cnn", "lstm"])
def test_jvp_vjp_vmap_match_torch_func(name):
    module, model, x1, *_ = case(name)
    params, xj = model.params, jx(x1)
    rng = np.random.default_rng(0)
    tangent = {k: jnp.asarray(rng.standard_normal(v.shape)) for k, v in params.items()}
    f = lambda p: model.apply(p, xj)  # noqa: E731

    out, jvp_out = jax.jit(lambda p, t: jax.jvp(f, (p,), (t,)))(params, tangent)
    _, torch_jvp = torch.func.jvp(_torch_f(module, x1), (_as_torch(params),), (_as_torch(tangent),))
    assert_close(jvp_out, torch_jvp.detach(), what="jvp")

    cotangent = jnp.asarray(rng.standard_normal(out.shape))
    (vjp_out,) = jax.jit(lambda p, c: jax.vjp(f, p)[1](c))(params, cotangent)
    _, pullback = torch.func.vjp(_torch_f(module, x1), _as_torch(params))
    (torch_vjp,) = pullback(torch.from_numpy(np.array(cotangent)))
    for k in params:
        assert_close(vjp_out[k], torch_vjp[k], what=f"vjp {k}")

    # vmap over examples. torch.func.vmap has no batching rule for aten::lstm, so the LSTM's primal
    # loops (with a warning); its JVP / VJP decompose the LSTM and do vectorize.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch bridge of LSTMHead: torch's vmap failed on the primal")
        per_example = jax.jit(jax.vmap(lambda x: model.apply(params, x[None])[0]))(xj)
    with torch.no_grad():
        assert_close(per_example, module(x1), what="vmap")

    # Linearity of the linear maps: linearize, linear_transpose, forward-over-transpose.
    @jax.jit
    def linear_maps(params, tangent, cotangent):
        _, f_lin = jax.linearize(f, params)
        (transposed,) = jax.linear_transpose(f_lin, params)(cotangent)
        vjp_fn = jax.vjp(f, params)[1]
        _, again = jax.jvp(lambda c: vjp_fn(c)[0], (cotangent,), (cotangent,))
        return f_lin(tangent), transposed, again

    linearized, transposed, again = linear_maps(params, tangent, cotangent)
    assert_close(linearized, jvp_out, what="linearize")
    for k in params:
        assert_close(transposed[k], vjp_out[k], what=f"linear_transpose {k}")
    for k in params:
        assert_close(again[k], vjp_out[k], what=f"jvp of the vjp {k}")


def test_jacobians_and_input_derivatives():
    module, model, x1, *_ = case("mlp")
    params, xj = model.params, jx(x1)
    rev = jax.jit(jax.jacrev(model.apply))(params, xj)
    fwd = jax.jit(jax.jacfwd(model.apply))(params, xj)
    torch_jac = torch.func.jacrev(_torch_f(module, x1))(_as_torch(params))
    for k in params:
        assert_close(rev[k], torch_jac[k], what=f"jacrev {k}")
        assert_close(fwd[k], torch_jac[k], what=f"jacfwd {k}")
    # Derivatives with respect to the input, and the summed gradient of a vmapped loss.
    dx = jax.jit(jax.jacrev(lambda x: model.apply(params, x)))(xj)
    weights = dict(module.named_parameters())
    torch_dx = torch.func.jacrev(lambda x: torch.func.functional_call(module, weights, (x,)))(x1)
    assert_close(dx, torch_dx.detach(), what="d/dx")
    loss = lambda p: jax.vmap(lambda x: model.apply(p, x[None]))(xj).sum()  # noqa: E731
    grad = jax.jit(jax.grad(loss))(params)
    for k in params:
        assert_close(grad[k], torch_jac[k].sum((0, 1)), what=f"grad of vmapped loss {k}")


def test_second_derivatives_raise_clearly():
    _, model, x1, *_ = case("mlp")
    with pytest.raises(NotImplementedError, match="second derivative.*first-order"):
        jax.jit(jax.hessian(lambda p: model.apply(p, jx(x1)).sum()))(model.params)


# ----------------------------------------------------------------------------------------------
# The machinery: one framework vmap call per batched op; loop fallback


def _counting_function(vmap):
    """tanh(x @ w) as a ForeignFunction whose backend counts vmapped and unbatched calls."""
    calls = {"vmapped": 0, "direct": 0}

    def counted_vmap(fn, in_axes):
        batched = vmap(fn, in_axes)

        def run(*ops):
            calls["vmapped"] += 1
            return batched(*ops)
        return run

    backend = dataclasses.replace(TORCH_BACKEND, vmap=None if vmap is None else counted_vmap)

    def primal(w, x):
        calls["direct"] += 1
        return (torch.tanh(x @ w),)

    def of(argnums, xs):
        return lambda *d: primal(*[d[argnums.index(i)] if i in argnums else v for i, v in enumerate(xs)])

    def jvp(argnums, xs, ts):
        return torch.func.jvp(of(argnums, xs), tuple(xs[i] for i in argnums), tuple(ts))[1]

    def vjp(argnums, xs, cts):
        return torch.func.vjp(of(argnums, xs), *(xs[i] for i in argnums))[1](tuple(cts))

    fn = ForeignFunction(backend, primal, jvp, vjp,
                         lambda specs: infer_out_specs_by_running(backend, primal, specs),
                         name="tanh-dense")
    return fn, calls


def test_batched_tangents_make_one_vmapped_call():
    fn, calls = _counting_function(torch.func.vmap)
    w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2)))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 3)))
    reference = jax.jit(jax.jacrev(lambda w: jnp.tanh(x @ w)))(w)
    for transform in (jax.jacrev, jax.jacfwd):
        calls.update(vmapped=0)
        jac = jax.jit(transform(lambda w: fn(w, x)[0]))(w)
        assert_close(jac, reference, what=transform.__name__)
        assert calls["vmapped"] == 1, (transform.__name__, calls)
    # Nested vmaps (examples x basis vectors) still collapse into one framework call.
    calls.update(vmapped=0)
    per_example = jax.jit(jax.vmap(jax.jacrev(lambda w, x: fn(w, x[None])[0][0]), (None, 0)))(w, x)
    assert_close(per_example, reference, what="vmap of jacrev")  # row i only sees example i
    assert calls["vmapped"] == 1, calls


@pytest.mark.parametrize("how", ["no vmap", "vmap fails"])
def test_loop_fallback_is_correct(how):
    if how == "no vmap":
        fn, calls = _counting_function(None)
    else:
        def broken_vmap(fn, in_axes):
            def run(*ops):
                raise RuntimeError("this kernel has no batching rule")
            return run
        fn, calls = _counting_function(broken_vmap)
    w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2)))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 3)))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        jac = jax.jit(jax.jacrev(lambda w: fn(w, x)[0]))(w)
        jac_again = jax.jit(jax.jacrev(lambda w: fn(w, x)[0] * 1.0))(w)
    assert_close(jac, jax.jit(jax.jacrev(lambda w: jnp.tanh(x @ w)))(w))
    assert_close(jac_again, jac)
    loop_warnings = [r for r in record if "looping over the batch" in str(r.message)]
    assert len(loop_warnings) == (0 if how == "no vmap" else 1)  # warned once, not per call


# ----------------------------------------------------------------------------------------------
# JVPs without forward-mode AD: the double-VJP fallback


class SelfAttention(torch.nn.Module):
    """nn.MultiheadAttention's fused path: no forward-mode AD in torch."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class _Cube(torch.autograd.Function):
    """x³ with a backward formula and no `jvp`: torch.func.jvp refuses it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g


class _CubeOnceDifferentiable(_Cube):
    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g


class CubeNet(torch.nn.Module):
    def __init__(self, cube):
        super().__init__()
        self.cube = cube
        self.a, self.b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.cube.apply(self.a(x)))


def _jacrev_jvp(module, x, tangent, wrt="params"):
    """`J t` from torch.func.jacrev (reverse mode, one VJP per output entry), contracted by hand."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    if wrt == "params":
        jac = torch.func.jacrev(lambda p: torch.func.functional_call(module, p, (x,)))(params)
        out_ndim = jac[next(iter(params))].ndim - params[next(iter(params))].ndim
        return sum(torch.tensordot(jac[k], torch.from_numpy(np.array(tangent[k])),
                                   dims=params[k].ndim) for k in params), out_ndim
    jac = torch.func.jacrev(lambda x: torch.func.functional_call(module, params, (x,)))(x)
    return torch.tensordot(jac, torch.from_numpy(np.array(tangent)), dims=x.ndim), None


@functools.lru_cache(maxsize=None)
def attention_case():
    torch.manual_seed(0)
    module = SelfAttention().double().eval()
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return module, bridge_model(module, x), x


def test_forward_mode_is_kept_where_torch_has_it():
    for name in ("mlp", "lstm"):
        assert case(name)[1].info["forward_mode"].method == "torch.func.jvp", name


def test_double_vjp_jvp_on_multihead_attention_matches_jacrev():
    module, model, x = attention_case()
    choice = model.info["forward_mode"]
    assert choice.method == "double vjp", choice
    assert "forward AD" in choice.reason and "_native_multi_head_attention" in choice.reason
    params, xj = model.params, jx(x)
    with pytest.raises(NotImplementedError, match="forward AD"):  # what the fallback stands in for
        torch.func.jvp(_torch_f(module, x), (_as_torch(params),), (_as_torch(params),))

    rng = np.random.default_rng(0)
    tangent = {k: jnp.asarray(rng.standard_normal(v.shape)) for k, v in params.items()}
    x_tangent = jnp.asarray(rng.standard_normal(xj.shape))
    f = lambda p, x: model.apply(p, x)  # noqa: E731

    @jax.jit
    def derivatives(params, tangent, x_tangent):
        _, by_params = jax.jvp(lambda p: f(p, xj), (params,), (tangent,))
        _, by_input = jax.jvp(lambda x: f(params, x), (xj,), (x_tangent,))
        jacobian = jax.jacfwd(lambda p: f(p, xj))(params)  # a batch of JVPs: torch.func.vmap
        return by_params, by_input, jacobian

    by_params, by_input, jacobian = derivatives(params, tangent, x_tangent)
    expected, _ = _jacrev_jvp(module, x, tangent)
    assert_close(by_params, expected, what="jvp in the parameters")
    assert_close(by_input, _jacrev_jvp(module, x, x_tangent, wrt="x")[0], what="jvp in the input")
    torch_jac = torch.func.jacrev(_torch_f(module, x))(_as_torch(params))
    for k in params:
        assert_close(jacobian[k], torch_jac[k], what=f"jacfwd {k}")


def test_double_vjp_jvp_on_a_custom_function_without_jvp():
    torch.manual_seed(0)
    module = CubeNet(_Cube).double()
    x = torch.randn(3, 3, dtype=torch.float64)
    model = bridge_model(module, x)
    assert model.info["forward_mode"].method == "double vjp"
    assert "jvp function" in model.info["forward_mode"].reason
    tangent = {k: jnp.ones_like(v) * 0.5 for k, v in model.params.items()}
    _, out = jax.jit(lambda p, t: jax.jvp(lambda p: model.apply(p, jx(x)), (p,), (t,)))(
        model.params, tangent)
    assert_close(out, _jacrev_jvp(module, x, tangent)[0])
    kernel = jax.jit(entk.empirical_ntk_fn(model, implementation="ntvp"))(jx(x), None, model.params)
    assert_close(kernel, torch_reference_ntk(module, x, x))


def test_non_differentiable_backward_makes_jvp_unavailable_not_wrong():
    # Under torch.func a @once_differentiable backward does not raise when differentiated again: the
    # double VJP would silently be zero. The probe at build time catches it.
    torch.manual_seed(0)
    module = CubeNet(_CubeOnceDifferentiable).double()
    x = torch.randn(3, 3, dtype=torch.float64)
    model = bridge_model(module, x)
    choice = model.info["forward_mode"]
    assert choice.method == "unavailable" and "disagrees with the VJP" in choice.reason, choice
    assert model.capabilities == frozenset({"jc"})
    with pytest.raises(ValueError, match="not supported by this model"):
        entk.empirical_ntk_fn(model, implementation="ntvp")
    with pytest.raises(NotImplementedError, match="implementation='jc'"):
        jax.jvp(lambda p: model.apply(p, jx(x)), (model.params,), (model.params,))
    kernel = jax.jit(entk.empirical_ntk_fn(model, implementation="jc"))(jx(x), None, model.params)
    assert_close(kernel, torch_reference_ntk(module, x, x))  # reverse mode is unaffected


_FIRST_JVP_SCRIPT = """
import json, warnings
import jax
import numpy as np
import torch
import entk
jax.config.update("jax_enable_x64", True)
from entk.adapters.torch.bridge import bridge_model
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    model = bridge_model(module, torch.zeros(2, 3, dtype=torch.float64))
    x = np.random.default_rng(0).standard_normal((2, 3))
    ntvp = entk.empirical_ntk_fn(model, implementation="ntvp")(x, None, model.params)
    jc = entk.empirical_ntk_fn(model, implementation="jc")(x, None, model.params)
print(json.dumps({"method": model.info["forward_mode"].method,
                  "max_diff": float(np.max(np.abs(np.asarray(ntvp) - np.asarray(jc)))),
                  "warnings": [[w.category.__name__, str(w.message)[:200], w.filename]
                               for w in caught]}))
"""


def test_first_forward_mode_call_raises_no_torch_deprecation_warning():
    # Torch's first torch.func.jvp in a process loads its forward-mode decompositions, which call the
    # deprecated torch.jit.script from inside torch: a fresh process is the point of this test.
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _FIRST_JVP_SCRIPT], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["method"] == "torch.func.jvp"  # forward mode really ran
    assert result["max_diff"] < 1e-10  # and gave the same kernel as reverse mode
    from_torch = [w for w in result["warnings"]
                  if w[0] in ("FutureWarning", "DeprecationWarning")
                  and ("torch.jit" in w[1] or os.sep + "torch" + os.sep in w[2])]
    assert not from_torch, from_torch
