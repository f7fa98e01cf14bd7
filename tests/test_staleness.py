"""A converted model never goes stale: what the user changes between two `entk.ntk` calls is used.

Each test changes a model the way a user would between two calls (in-place `.data` edits, `.data`
assignment, a plain attribute `forward` reads, weights held in a Python list, `module.double()`, a
Keras variable `assign` or layer attribute) and compares the second kernel with a fresh reference of the changed model:
torch.func Jacobians (`tests/torch_reference.py`) or TensorFlow GradientTape Jacobians, in float64.
Conversions are counted where it matters: value edits must not export again, changes to what the
export baked in must.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import entk  # noqa: E402
from entk.adapters.torch import ExportFallbackWarning, from_torch  # noqa: E402
from entk.adapters.torch import export as torch_export  # noqa: E402
from tests.torch_reference import torch_func_ntk  # noqa: E402

TOL = 1e-10


class Scaled(nn.Module):
    """An MLP reading a plain float attribute and a weight kept outside the registered ones."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 5)
        self.l2 = nn.Linear(5, 2)
        self.scale = 1.0
        self.extra = [nn.Linear(5, 5)]  # a plain list: not registered, exported as a constant

    def forward(self, x):
        h = torch.tanh(self.l1(x)) * self.scale
        return self.l2(torch.tanh(self.extra[0](h)))


class DataDependent(nn.Module):
    """Control flow on a tensor value: torch.export cannot capture it, so "auto" uses the bridge."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 4)
        self.l2 = nn.Linear(4, 2)
        self.scale = 1.0

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        if h.sum() > -1e9:  # always true, but only known from the values
            h = h * self.scale
        return self.l2(h)


def _scaled() -> Scaled:
    torch.manual_seed(0)
    module = Scaled().double()
    module.extra[0].double()  # `.double()` does not reach unregistered submodules
    module.extra[0].requires_grad_(False)  # a constant for entk and for the torch.func reference
    return module


def _x(n=4, dtype=torch.float64):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(1), dtype=dtype)


def assert_kernel(module, x, what):
    """entk.ntk(module, x) against torch.func's kernel of the module as it is now."""
    kernel = entk.ntk(module, x, implementation="jc")  # one strategy: no cost model, one compile
    reference = torch_func_ntk(module, x, None)
    assert kernel.dtype == x.dtype, what
    scale = float(np.max(np.abs(reference)))
    error = float(np.max(np.abs(kernel.numpy() - reference)))
    assert error <= TOL * scale, f"{what}: max error {error:.3g} at scale {scale:.3g}"


@pytest.fixture
def count_exports(monkeypatch):
    """A list that gets one entry per torch.export of a whole module (not per-shape re-exports)."""
    calls = []
    original = torch_export.ExportedModule.__init__

    def counting(self, *args, **kwargs):
        calls.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(torch_export.ExportedModule, "__init__", counting)
    return calls


# ----------------------------------------------------------------------------------------------
# Values: read at every call, no new export


def test_in_place_data_edits_are_seen_without_exporting_again(count_exports):
    module, x = _scaled(), _x()
    assert_kernel(module, x, "first call")
    module.l1.weight.data.mul_(3)  # .data: no autograd version bump
    assert_kernel(module, x, "after l1.weight.data.mul_(3)")
    with torch.no_grad():
        module.l2.bias.add_(1.0)
    assert_kernel(module, x, "after an in-place update under no_grad")
    assert len(count_exports) == 1


def test_data_assignment_is_seen(count_exports):
    module, x = _scaled(), _x()
    assert_kernel(module, x, "first call")
    module.l1.weight.data = torch.randn(5, 3, dtype=torch.float64)  # same Parameter, new storage
    assert_kernel(module, x, "after l1.weight.data = randn")
    assert len(count_exports) == 1


def test_unregistered_weights_in_a_list_are_seen(count_exports):
    module, x = _scaled(), _x()
    assert_kernel(module, x, "first call")
    with torch.no_grad():
        module.extra[0].weight.mul_(2)  # edits the storage the exported constant aliases
    assert_kernel(module, x, "after an in-place edit of a weight held in a list")
    assert len(count_exports) == 1
    module.extra[0].weight.data = torch.randn(5, 5, dtype=torch.float64)  # new storage: re-export
    assert_kernel(module, x, "after .data = ... on a weight held in a list")
    module.extra[0] = nn.Linear(5, 5).double().requires_grad_(False)  # another one in the list
    assert_kernel(module, x, "after replacing the submodule in the list")
    assert len(count_exports) == 3


# ----------------------------------------------------------------------------------------------
# What the export baked in: guarded, exported again


def test_plain_attribute_read_by_forward_is_guarded(count_exports):
    module, x = _scaled(), _x()
    assert_kernel(module, x, "first call")
    assert_kernel(module, x, "second call, nothing changed")
    assert len(count_exports) == 1
    module.scale = 3.0  # baked into the exported graph as a constant
    assert_kernel(module, x, "after module.scale = 3.0")
    assert len(count_exports) == 2


def test_forward_hook_added_between_calls_is_guarded(count_exports):
    module, x = _scaled(), _x()
    assert_kernel(module, x, "first call")
    handle = module.l2.register_forward_hook(lambda _, __, out: 2.0 * out)
    assert_kernel(module, x, "after registering a forward hook")  # the kernel quadruples
    handle.remove()
    assert_kernel(module, x, "after removing it")
    assert len(count_exports) == 3


def test_submodule_replacement_and_requires_grad_are_guarded(count_exports):
    module, x = _scaled(), _x()
    assert_kernel(module, x, "first call")
    module.l1 = nn.Linear(3, 5).double()
    assert_kernel(module, x, "after replacing a registered submodule")
    module.l2.bias.requires_grad_(False)  # leaves params for state["frozen"]
    kernel = entk.ntk(module, x, implementation="jc")
    module.l2.bias.requires_grad_(True)
    reference = torch_func_ntk(module, x, None)
    bias_term = 1.0  # d out_c / d bias_c = 1: Σ_c 1·1 / C, for every pair of examples
    np.testing.assert_allclose(kernel.numpy(), reference - bias_term, rtol=0,
                               atol=TOL * np.max(np.abs(reference)))
    assert len(count_exports) == 3


def test_double_in_place_gives_a_float64_graph():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x32 = _x(dtype=torch.float32)
    first = entk.ntk(module, x32, implementation="jc")
    assert first.dtype == torch.float32
    reference32 = torch_func_ntk(module, x32, None)
    np.testing.assert_allclose(first.numpy(), reference32, rtol=1e-5, atol=1e-5)
    module.double()  # same Parameter objects, now float64
    assert_kernel(module, x32.double(), "after module.double()")


def test_bridge_mode_is_never_stale(count_exports):
    torch.manual_seed(0)
    module, x = DataDependent().double(), _x()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportFallbackWarning)
        assert from_torch(module, x).info["mode"] == "bridge"
        assert_kernel(module, x, "first call (bridge)")
        module.l1.weight.data.mul_(3)
        assert_kernel(module, x, "bridge, after l1.weight.data.mul_(3)")
        module.l1.weight.data = torch.randn(4, 3, dtype=torch.float64)
        assert_kernel(module, x, "bridge, after l1.weight.data = randn")
        module.scale = 3.0
        assert_kernel(module, x, "bridge, after module.scale = 3.0")


def test_from_torch_models_are_snapshots():
    """A model handed out keeps its values; converting again reads the module's new ones."""
    module, x = _scaled(), _x()
    first = from_torch(module, x)
    before = np.asarray(first.params["l1.weight"]).copy()
    module.l1.weight.data.mul_(3)
    np.testing.assert_array_equal(np.asarray(first.params["l1.weight"]), before)
    second = from_torch(module, x)
    np.testing.assert_array_equal(np.asarray(second.params["l1.weight"]), 3 * before)
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(np.asarray(second(x.numpy())), expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# TensorFlow / Keras: variables assigned between calls


def _keras_model():
    """Dense(5, tanh) → a layer multiplying by a plain float attribute → Dense(2), float64."""
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("needs Keras on the TensorFlow backend")
    pytest.importorskip("tf2jax")

    class Scale(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.scale = 1.0

        def call(self, x):
            return x * self.scale

    keras.utils.set_random_seed(0)
    layers = keras.layers
    return keras.Sequential([keras.Input((3,), dtype="float64"),
                             layers.Dense(5, activation="tanh", dtype="float64"),
                             Scale(dtype="float64"),
                             layers.Dense(2, dtype="float64")])


@pytest.mark.parametrize("mode", ["tf2jax", "bridge"])
def test_keras_variable_assign_and_attributes_are_seen(mode):
    from tests.test_tf import tf_reference_ntk

    model = _keras_model()
    x = np.random.default_rng(0).standard_normal((4, 3))

    def check(what):
        if mode == "tf2jax":
            kernel = entk.ntk(model, x, implementation="jc")  # the cached conversion, read again
        else:
            kernel = entk.ntk(entk.from_tf(model, x, mode="bridge"), x, implementation="jc")
        np.testing.assert_allclose(np.asarray(kernel), tf_reference_ntk(model, x, x), rtol=TOL,
                                   atol=TOL, err_msg=what)

    check("first call")
    layer = model.layers[0]
    layer.kernel.assign(layer.kernel.numpy() * 3.0)
    layer.bias.assign(np.full(layer.bias.shape, 0.5))
    check("after assigning the first layer's variables")
    model.layers[1].scale = 3.0  # read by call(): traced into the conversion
    check("after layer.scale = 3.0")
