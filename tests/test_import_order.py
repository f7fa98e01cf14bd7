"""TensorFlow and PyTorch in one process, imported in the orders users do, each in a fresh process.

TensorFlow and Triton (which torch.export / torch.func load lazily) both bundle LLVM; Triton loaded
after TensorFlow kills the process with SIGSEGV. `entk.adapters._llvm_guard` decides once per process
(load Triton now, or make it unavailable) so entk never triggers that order. Only a fresh process
shows this (an earlier import in the test session would decide it), so each scenario below is one
subprocess, started together when the module begins and run side by side, that imports in the user's
order, computes kernels with `entk.ntk` and their references (GradientTape Jacobians for Keras,
`torch.func.jacrev` for torch, contracted by hand, float64), and prints both. A test passes only if
the process exits normally (not -11) and every kernel matches its reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("tensorflow")
pytest.importorskip("keras")
pytest.importorskip("tf2jax")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Steps the script runs in order: "import X" imports X; "keras" / "torch_export" / "torch_bridge"
# compute a kernel and its reference; the others check Triton's state (loaded, blocked, or not
# loaded yet), "absent" whenever Triton is not installed.
SCENARIOS = {
    # Keras (TF backend) first; the TF path must not touch Triton; then a torch module in the same
    # process: Triton is unavailable for good and torch works without it.
    "keras_then_torch": ["import keras", "import entk", "keras", "no_triton_yet", "import torch",
                         "torch_export", "torch_bridge", "triton_blocked"],
    "tensorflow_torch": ["import tensorflow", "import torch", "import entk", "torch_export",
                         "torch_bridge", "triton_blocked"],
    "torch_tensorflow": ["import torch", "import tensorflow", "import entk", "torch_bridge",
                         "torch_export", "keras", "triton_blocked"],
    # torch used first (Triton loads with it), Keras / TensorFlow imported only afterwards.
    "torch_then_keras": ["import torch", "import entk", "torch_export", "triton_loaded",
                         "import keras", "keras", "torch_bridge"],
}

SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    import numpy as np

    triton_installed = importlib.util.find_spec("triton") is not None

    x = np.random.default_rng(0).standard_normal((3, 4))
    kernels = {}

    def keras_kernel():
        import keras, tensorflow as tf, entk
        keras.utils.set_random_seed(0)
        layers = keras.layers
        model = keras.Sequential([keras.Input((4,)), layers.Dense(5, activation="tanh", dtype="float64"),
                                  layers.Dense(2, dtype="float64")])
        theta = np.asarray(entk.ntk(model, x, implementation="jc"))
        with tf.GradientTape() as tape:
            y = model(tf.constant(x))
        jac = tape.jacobian(y, model.trainable_variables)       # each (N, O) + variable shape
        flat = np.concatenate([np.reshape(j, (3, 2, -1)) for j in jac], axis=-1)
        return theta, np.einsum("iop,jop->ij", flat, flat) / 2  # the output axis traced (mean)

    def torch_kernel(mode):
        import torch, entk
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
        module = module.double()
        xt = torch.from_numpy(x)
        theta = entk.ntk(entk.from_torch(module, xt, mode=mode), xt, implementation="jc")
        assert isinstance(theta, torch.Tensor), type(theta)
        params = dict(module.named_parameters())
        jac = torch.func.jacrev(lambda p: torch.func.functional_call(module, p, (xt,)))(params)
        flat = torch.cat([j.reshape(3, 2, -1) for j in jac.values()], dim=-1).detach()
        return theta.numpy(), (torch.einsum("iop,jop->ij", flat, flat) / 2).numpy()

    def triton_state():
        if "triton" not in sys.modules:
            return "absent"
        return "blocked" if sys.modules["triton"] is None else "loaded"

    for step in sys.argv[1:]:
        if step.startswith("import "):
            __import__(step.split()[1])
        elif step == "keras":
            kernels[step] = keras_kernel()
        elif step.startswith("torch_"):
            kernels[step] = torch_kernel(step.split("_")[1])
        elif step == "no_triton_yet":
            assert "triton" not in sys.modules, "the TF path loaded Triton"
        else:
            expected = {"triton_blocked": "blocked", "triton_loaded": "loaded"}[step]
            expected = expected if triton_installed else "absent"
            assert triton_state() == expected, (step, triton_state())
    print("KERNELS " + json.dumps({k: [a.tolist(), b.tolist()] for k, (a, b) in kernels.items()}))
""")


def _start(steps: list[str]) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1", "KERAS_BACKEND": "tensorflow",
           "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", SCRIPT, *steps], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def processes():
    """All scenarios start at once (imports dominate; they overlap) and are collected per test."""
    started = {name: _start(steps) for name, steps in SCENARIOS.items()}
    yield started
    for process in started.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_import_order(processes, scenario):
    try:
        out, err = processes[scenario].communicate(timeout=600)
    except subprocess.TimeoutExpired:
        processes[scenario].kill()
        out, err = processes[scenario].communicate()
    code = processes[scenario].returncode
    assert code == 0, (f"{scenario}: {' ; '.join(SCENARIOS[scenario])} exited with {code} "
                       f"(-11 is the TensorFlow/Triton LLVM crash)\n{err[-4000:]}")
    line = next(line for line in out.splitlines() if line.startswith("KERNELS "))
    kernels = json.loads(line[len("KERNELS "):])
    assert set(kernels) == {s for s in SCENARIOS[scenario] if s == "keras" or s.startswith("torch_")}
    for name, (theta, reference) in kernels.items():
        assert np.asarray(theta).shape == (3, 3), name
        np.testing.assert_allclose(theta, reference, rtol=1e-10, atol=1e-12, err_msg=name)
