"""Float64 in means float64 computed, in a process that runs JAX in 32 bits.

The test suite turns `jax_enable_x64` on (tests/conftest.py), which would hide the bug this file is
about: a float64 model answered with a float64 tensor computed in float32 (relative error ~1e-7).
So the checks run in a fresh interpreter with JAX's defaults (`subprocess`, JAX_PLATFORMS=cpu, no
x64), against float64 references computed outside JAX: torch.func (`tests/torch_reference.py`),
TensorFlow's GradientTape (`tests/test_tf.py`) and a closed form in NumPy.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from entk import _xla_cpu

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
try:  # Triton (torch.func) must load before TensorFlow (see tests/conftest.py)
    import triton  # noqa: F401
except ImportError:
    pass
import warnings
warnings.simplefilter("ignore")
import jax
import jax.numpy as jnp
import numpy as np
assert not jax.config.jax_enable_x64, "this check needs a process without 64-bit mode"
import entk

def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))

# NumPy float64 inputs, a plain JAX function: f(W, x) = tanh(x W), W (3, 2); the closed form is
# Θ[n, m] = (x_n · x_m) Σ_c (1 - o_nc²)(1 - o_mc²) / C.
rng = np.random.default_rng(0)
W, x = rng.standard_normal((3, 2)), rng.standard_normal((4, 3))
f = lambda w, x: jnp.tanh(x @ w)
d = 1 - np.tanh(x @ W) ** 2
closed_form = (x @ x.T) * (d @ d.T) / 2
for label, inputs, params, dtype, tol in [
        ("numpy float64", x, W, np.float64, 1e-12),
        ("jax float32", jnp.asarray(x, jnp.float32), jnp.asarray(W, jnp.float32), np.float32, 1e-5),
        ("numpy float64 again", x, W, np.float64, 1e-12)]:  # compiled functions: no mixing
    kernel = entk.ntk(f, inputs, params=params, implementation="jc")
    assert kernel.dtype == dtype, (label, kernel.dtype)
    assert rel(kernel, closed_form) < tol, (label, rel(kernel, closed_form))
    print(label, kernel.dtype, rel(kernel, closed_form))

if {torch!r}:
    import torch
    from tests.torch_reference import torch_func_ntk
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    x32 = torch.randn(4, 3)
    kernel32 = entk.ntk(module, x32, implementation="jc")
    assert kernel32.dtype == torch.float32
    module.double()
    x64 = x32.double()
    kernel = entk.ntk(module, x64, implementation="jc")
    reference = torch_func_ntk(module, x64, None)
    assert kernel.dtype == torch.float64, kernel.dtype
    assert rel(kernel.numpy(), reference) < 1e-12, rel(kernel.numpy(), reference)
    print("torch float64", kernel.dtype, rel(kernel.numpy(), reference))
    for implementation in ("ntvp", "sd"):
        other = entk.ntk(module, x64, implementation=implementation)
        assert rel(other.numpy(), reference) < 1e-12, (implementation, rel(other.numpy(), reference))
    try:
        entk.from_torch(module, x64)  # outside entk.ntk: refused, saying how
    except ValueError as e:
        assert "jax_enable_x64" in str(e) and "float64" in str(e), e
    else:
        raise AssertionError("from_torch of a float64 module in 32-bit mode was not refused")

if {keras!r}:
    import keras
    from tests.test_tf import tf_reference_ntk
    keras.utils.set_random_seed(0)
    L = keras.layers
    model = keras.Sequential([keras.Input((3,), dtype="float64"),
                              L.Dense(6, activation="tanh", dtype="float64"),
                              L.Dense(2, dtype="float64")])
    kernel = entk.ntk(model, x, implementation="jc")
    reference = tf_reference_ntk(model, x, x)
    assert np.asarray(kernel).dtype == np.float64
    assert rel(kernel, reference) < 1e-12, rel(kernel, reference)
    print("keras float64", np.asarray(kernel).dtype, rel(kernel, reference))

assert not jax.config.jax_enable_x64, "entk.ntk left 64-bit mode on"
assert jnp.ones(2).dtype == jnp.float32
print("OK")
"""


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _keras_on_tensorflow() -> bool:
    if not (_has("keras") and _has("tensorflow") and _has("tf2jax")):
        return False
    return os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow"


def test_float64_is_computed_in_float64_without_x64():
    script = SCRIPT.format(root=str(ROOT), torch=_has("torch"), keras=_keras_on_tensorflow())
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "JAX_PLATFORMS")}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"stdout:\n{result.stdout}\nstderr (last 3000 chars):\n{result.stderr[-3000:]}")
    assert result.stdout.strip().endswith("OK"), result.stdout


LATE_IMPORT = """
import warnings
import jax.numpy as jnp
import numpy as np
g = np.random.default_rng(0).standard_normal((8, 1, 64, 64)).astype(np.float32)
c = np.random.default_rng(1).standard_normal((1, 64, 64)).astype(np.float32)
chain = lambda g, c: jnp.sum(c * jnp.sum(g, -1, keepdims=True), -1)
exact = np.sum(c.astype(np.float64) * g.astype(np.float64).sum(-1, keepdims=True), -1)
{before}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import entk
{after}
import jax, os
err = float(np.nanmax(np.abs(np.asarray(jax.jit(chain)(g, c)) - exact)) / np.abs(exact).max())
flag = entk._xla_cpu.FLAG in os.environ.get("XLA_FLAGS", "").split()
warned = any("YNNPACK" in str(w.message) for w in caught)
print(flag, warned, "exact" if err < 1e-5 else "WRONG")
"""


@pytest.mark.skipif(_xla_cpu._jaxlib_minor() not in _xla_cpu.AFFECTED_JAXLIB,
                    reason="a jaxlib without the miscompiling YNNPACK reduce fusion")
@pytest.mark.parametrize("order, expected", [("entk first", "True False exact"),
                                             ("jax first", "False True")])
def test_xla_cpu_fusion_is_off_or_the_user_is_told(order, expected):
    """`import entk` before JAX's first array turns the miscompiling fusion off (the reduce chain comes
    out exact in float32); imported after, it cannot, and it warns instead of staying silent."""
    before = "jnp.ones(2).block_until_ready()" if order == "jax first" else ""
    script = LATE_IMPORT.format(before=before, after="")
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "ENTK_XLA_CPU_WORKAROUND", "JAX_ENABLE_X64")}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith(expected), result.stdout
