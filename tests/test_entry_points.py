"""One entry-point rule: every public function that takes a model takes the model object itself.

For a tiny float64 torch MLP, a tiny float64 Keras model and a Flax module, each entry point
(`entk.ntk`, `entk.compare`, `entk.empirical_*_fn`, `entk.compute_kernel`, `NTKMonitor`,
`entk.linearize`, the CLI's SPEC loader) called with the model gives the kernel computed by the
model's own framework (torch.func / GradientTape Jacobians, or `jax.jacrev` for Flax), and each
common mistake gets an error that names the right call.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import entk
from entk.monitor import NTKMonitor
from tests.reference import assert_close, brute_force_ntk

torch = pytest.importorskip("torch")

N, D, H, O = 4, 3, 5, 2


# ----------------------------------------------------------------------------------------------
# References from the models' own frameworks


def _torch_full_ntk(module, x):
    """Θ[n, m, o, p] = Σ_params ∂f(x_n)_o ∂f(x_m)_p from torch.autograd Jacobians, float64."""
    names = [n for n, _ in module.named_parameters()]
    values = tuple(p.detach() for _, p in module.named_parameters())

    def f(*vals):
        return torch.func.functional_call(module, dict(zip(names, vals)), (x,))

    jac = torch.autograd.functional.jacobian(f, values)  # per param: (N, O, *param.shape)
    flat = torch.cat([j.reshape(N, O, -1) for j in jac], dim=-1)
    return torch.einsum("nop,mqp->nmoq", flat, flat).numpy()


def _keras_full_ntk(model, x):
    import tensorflow as tf

    with tf.GradientTape(persistent=True) as tape:
        out = model(tf.constant(x))
    jac = tape.jacobian(out, model.trainable_variables)
    flat = tf.concat([tf.reshape(j, (N, O, -1)) for j in jac], axis=-1).numpy()
    return np.einsum("nop,mqp->nmoq", flat, flat)


def _traced(full):
    return np.einsum("nmoo->nm", full) / full.shape[-1]


@pytest.fixture(scope="module")
def tmlp():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, O)).double()
    x = torch.randn(N, D, dtype=torch.float64)
    full = _torch_full_ntk(module, x)
    return module, x, full, _traced(full)


@pytest.fixture(scope="module")
def kmodel():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the Keras checks use the TensorFlow backend")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((D,), dtype="float64"),
                              keras.layers.Dense(H, activation="tanh", dtype="float64"),
                              keras.layers.Dense(O, dtype="float64")])
    x = np.random.default_rng(1).normal(size=(N, D))
    full = _keras_full_ntk(model, x)
    return model, x, full, _traced(full)


@pytest.fixture(scope="module")
def flax_pair():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(O, param_dtype=jnp.float64)(
                jnp.tanh(nn.Dense(H, param_dtype=jnp.float64)(x)))

    module = MLP()
    x = jax.random.normal(jax.random.PRNGKey(1), (N, D), jnp.float64)
    variables = module.init(jax.random.PRNGKey(0), x)
    apply = lambda p, x: module.apply({"params": p}, x)  # noqa: E731
    return (module, variables), np.asarray(x), np.asarray(brute_force_ntk(apply, x, None,
                                                                          variables["params"]))


def _kernels_of(model, x, expected):
    """Every kernel-valued entry point, called with the model object itself, against `expected`."""
    assert_close(np.asarray(entk.ntk(model, x)), expected, what="entk.ntk")
    assert_close(np.asarray(entk.empirical_ntk_fn(model)(x)), expected, what="empirical_ntk_fn")
    assert_close(np.asarray(entk.empirical_ntk_fn(model, implementation="jc")(x, x)), expected,
                 what="empirical_ntk_fn(jc)(x, x)")
    both = entk.empirical_kernel_fn(model)(x, None, "ntk")
    assert_close(np.asarray(both), expected, what="empirical_kernel_fn")
    assert_close(np.asarray(entk.compute_kernel(model, x, progress=False)), expected,
                 what="compute_kernel")
    monitor = NTKMonitor(model, x)
    assert_close(monitor.kernel(model), expected, what="NTKMonitor.kernel")
    assert monitor.history[0]["trace"] == pytest.approx(np.trace(expected), rel=1e-10)
    report = entk.compare(model, x, measure=False)
    assert {r["strategy"] for r in report.rows} >= {"jc", "ntvp"}
    assert all(r["status"] == "ok" for r in report.rows), report.rows
    assert report.auto in {r["strategy"] for r in report.rows}


# ----------------------------------------------------------------------------------------------
# torch


def test_torch_module_everywhere(tmlp):
    module, x, _, expected = tmlp
    _kernels_of(module, x, expected)


def test_torch_params_forms(tmlp):
    module, x, full, expected = tmlp
    # The module's own tensors under their names are converted; JAX arrays are used as given.
    named = dict(module.named_parameters())
    assert_close(np.asarray(entk.ntk(module, x, params=named)), expected)
    assert_close(np.asarray(entk.empirical_ntk_fn(module)(x, None, named)), expected)
    doubled = {k: 2 * jnp.asarray(v.detach().numpy()) for k, v in named.items()}
    with torch.no_grad():
        scaled = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(),
                                     torch.nn.Linear(H, O)).double()
        for name, p in scaled.named_parameters():
            p.copy_(2 * named[name])
    assert_close(np.asarray(entk.empirical_ntk_fn(module)(x, None, doubled)),
                 _traced(_torch_full_ntk(scaled, x)), what="explicit params")
    # Under jax.jit the parameters are passed explicitly (so weights are never baked in).
    params = entk.adapters.to_model(module, x).params
    jitted = jax.jit(entk.empirical_ntk_fn(module))
    assert_close(np.asarray(jitted(x.numpy(), None, params)), expected, what="under jit")
    # NNGP and NTK-vector products of the module itself.
    out = module(x).detach().numpy()
    assert_close(np.asarray(entk.empirical_nngp_fn(module)(x)), out @ out.T / O, what="nngp")
    v = np.random.default_rng(2).normal(size=(N, O))
    assert_close(np.asarray(entk.empirical_ntk_vp_fn(module, x)(jnp.asarray(v))),
                 np.einsum("nmop,mp->no", full, v), what="ntk_vp")


def test_torch_monitor_reads_the_trained_module(tmlp):
    module, x, _, expected = tmlp
    trained = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(),
                                  torch.nn.Linear(H, O)).double()
    trained.load_state_dict(module.state_dict())
    monitor = NTKMonitor(trained, x)
    with torch.no_grad():
        trained[0].weight.mul_(1.5)  # a training step, in place
    monitor.step(trained)
    assert_close(monitor.kernels[0] if monitor.kernels else monitor.kernel(trained),
                 _traced(_torch_full_ntk(trained, x)), what="monitor after a step")
    assert monitor.history[-1]["distance_from_init"] > 1e-6


def test_torch_linearize(tmlp):
    module, x, _, expected = tmlp
    lin = entk.linearize(module)
    assert isinstance(lin, entk.adapters.torch.LinearizedModule)
    assert lin is not module and torch.allclose(lin(x), module(x))
    # At θ₀ the linearized network has the network's kernel (its Jacobian is the network's).
    from tests.torch_reference import torch_func_ntk

    assert_close(torch_func_ntk(lin, x, None), expected, what="linearized module")
    # Trainable: one SGD step changes the output linearly in θ − θ₀.
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    lin(x).pow(2).sum().backward()
    opt.step()
    assert not torch.allclose(lin(x), module(x))


def test_spec_loads_a_torch_module(tmp_path, tmlp):
    module, x, _, expected = tmlp
    torch.save(module.state_dict(), tmp_path / "w.pt")
    (tmp_path / "spec_model.py").write_text(textwrap.dedent(f"""
        import torch
        def make():
            m = torch.nn.Sequential(torch.nn.Linear({D}, {H}), torch.nn.Tanh(),
                                    torch.nn.Linear({H}, {O})).double()
            m.load_state_dict(torch.load({str(tmp_path / "w.pt")!r}))
            return m
    """))
    from entk.spec import load_model

    model = load_model(f"{tmp_path / 'spec_model.py'}:make", x.numpy())
    assert_close(np.asarray(entk.ntk(model, x.numpy())), expected, what="SPEC model")


def test_torch_linearize_raises_no_deprecation_warning():
    """A fresh process (torch loads its forward-mode decompositions once): linearizing and running
    the linearized module raises no FutureWarning / DeprecationWarning."""
    code = textwrap.dedent("""
        import warnings
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        import torch, entk
        m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        lin = entk.linearize(m)
        lin(torch.randn(5, 3)).sum().backward()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# Mistakes get errors that name the right call


def _plain(params, x):
    return jnp.tanh(x @ params["w"])


def test_torch_tensors_as_params_of_a_function(tmlp):
    module, x, _, _ = tmlp
    named = dict(module.named_parameters())
    xj = jnp.asarray(x.numpy())
    for call in (lambda: entk.ntk(_plain, xj, params=named),
                 lambda: entk.empirical_ntk_fn(_plain)(xj, None, named),
                 lambda: entk.compare(_plain, xj, params=named, measure=False)):
        with pytest.raises(TypeError, match=r"params holds torch tensors .*entk\.ntk\(module, x\)"):
            call()


def test_wrong_params_for_a_module(tmlp):
    module, x, _, _ = tmlp
    with pytest.raises(TypeError, match=r"does not match the parameters .*Omit params="):
        entk.ntk(module, x, params={"w": jnp.ones((D, O))})
    wrong = {k: jnp.ones((1,) + tuple(v.shape)) for k, v in module.named_parameters()}
    with pytest.raises(ValueError, match=r"has shape .*omit params="):
        entk.empirical_ntk_fn(module)(x, None, wrong)


def test_missing_params(tmlp):
    module, x, _, _ = tmlp
    xj = jnp.asarray(x.numpy())
    with pytest.raises(TypeError, match=r"needs its parameters: pass params="):
        entk.compare(_plain, xj, measure=False)
    with pytest.raises(TypeError, match=r"params is missing"):
        entk.empirical_ntk_fn(_plain)(xj)
    with pytest.raises(TypeError, match=r"kernel_fn needs params=.*pass the model object itself"):
        entk.empirical_kernel_fn(_plain)(xj, None, "ntk")
    with pytest.raises(TypeError, match=r"under jax\.jit without params"):
        jax.jit(entk.empirical_ntk_fn(module))(xj)


def test_linearize_mistakes(tmlp):
    module, x, _, _ = tmlp
    for call in (lambda: entk.linearize(_plain), lambda: entk.linearize(_plain, None),
                 lambda: entk.taylor_expand(_plain, None, 2)):
        with pytest.raises(TypeError, match=r"params0, the parameters to expand around, is missing"):
            call()
    with pytest.raises(TypeError, match=r"params0 must be omitted"):
        entk.linearize(module, dict(module.named_parameters()))
    with pytest.raises(TypeError, match=r"entk\.from_torch\(module, x\)"):
        entk.taylor_expand(module, degree=2)
    with pytest.raises(TypeError, match=r"params0 holds torch tensors"):
        entk.linearize(_plain, dict(module.named_parameters()))


def test_linearize_model_and_flax_default_params0(flax_pair):
    (module, variables), x, _ = flax_pair
    f_lin = entk.linearize((module, variables))
    params = variables["params"]
    assert_close(np.asarray(f_lin(params, x)), np.asarray(module.apply(variables, x)))
    moved = jax.tree_util.tree_map(lambda p: p + 1e-3, params)
    model = entk.adapters.to_model((module, variables))
    expected = model.apply(params, x) + jax.jvp(lambda p: model.apply(p, x), (params,),
                                                (jax.tree_util.tree_map(lambda p: 1e-3 + 0 * p,
                                                                        params),))[1]
    assert_close(np.asarray(f_lin(moved, x)), np.asarray(expected))
    assert_close(np.asarray(entk.taylor_expand(model, degree=1)(moved, x)), np.asarray(expected))


# ----------------------------------------------------------------------------------------------
# Keras and Flax


def test_keras_model_everywhere(kmodel):
    model, x, _, expected = kmodel
    _kernels_of(model, x, expected)
    import tensorflow as tf

    out = entk.ntk(model, tf.constant(x))
    assert isinstance(out, tf.Tensor)
    assert_close(out.numpy(), expected, what="entk.ntk with TF tensors")


def test_keras_mistakes(kmodel):
    model, x, _, _ = kmodel
    with pytest.raises(TypeError, match=r"entk\.from_tf\(model, x\)"):
        entk.linearize(model)
    with pytest.raises(TypeError, match=r"does not match the parameters"):
        entk.ntk(model, x, params=list(model.trainable_variables))


def test_flax_pair_everywhere(flax_pair):
    pair, x, expected = flax_pair
    _kernels_of(pair, x, expected)
