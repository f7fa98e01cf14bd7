"""Exported programs on disk (`entk/adapters/torch/program_cache.py`): a new process converting the same
module skips torch.export, and a stored program is used only if it is still the module's program.

References: torch.func's Jacobians of the module itself (float64, `tests/torch_reference.py`), and the
kernel of a fresh export.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import entk  # noqa: E402
from entk.adapters import torch as entk_torch  # noqa: E402
from entk.adapters.torch import program_cache  # noqa: E402
from tests.torch_reference import torch_func_ntk  # noqa: E402


@pytest.fixture(autouse=True)
def torch_export_only(monkeypatch):
    """The cache holds torch.export's programs; dispatch capture (`dispatch_capture.py`, tried first
    in eval mode) would take these modules without one."""
    monkeypatch.setenv("ENTK_TORCH_CAPTURE", "export")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ENTK_PROGRAM_CACHE", str(tmp_path / "programs"))
    entk_torch.clear_cache()
    yield tmp_path / "programs"
    entk_torch.clear_cache()


def _gelu_helper(h):
    return torch.nn.functional.gelu(h)


_HELPER = {"act": _gelu_helper}


class _Net(torch.nn.Module):
    """Conv, BatchNorm (eval), pooling, LayerNorm, a detach, and an activation looked up at call time."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        h = torch.nn.functional.max_pool2d(self.bn(self.conv(x)), 2).flatten(1)
        h = _HELPER["act"](self.norm(h))
        return self.head(h + 0.1 * h.detach() ** 2)


def _net() -> tuple:
    torch.manual_seed(0)
    module = _Net().double().eval()
    module.bn.running_mean.uniform_(-0.5, 0.5)
    module.bn.running_var.uniform_(0.5, 1.5)
    return module, torch.randn(5, 2, 4, 4, dtype=torch.float64)


def test_stored_program_gives_the_fresh_kernel(cache_dir):
    module, x = _net()
    first = entk_torch.from_torch(module, x)
    assert first.info["program_cache"] == "stored"
    fresh = np.asarray(entk.ntk(first, x))
    entk_torch.clear_cache()  # forget the in-memory conversion: the next one reads the disk
    second = entk_torch.from_torch(module, x)
    assert second.info["program_cache"] == "hit"
    assert type(second.info["exported_program"]).__name__ == "CachedProgram"
    stored = np.asarray(entk.ntk(second, x))
    np.testing.assert_allclose(stored, fresh, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stored, torch_func_ntk(module, x, x), rtol=1e-10, atol=1e-12)
    # another batch size through the dynamic batch axis of the stored program
    x3 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    np.testing.assert_allclose(np.asarray(entk.ntk(second, x3)), torch_func_ntk(module, x3, x3),
                               rtol=1e-10, atol=1e-12)


class _TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Linear(2, 4)

    def forward(self, first, second):
        return {"sum": torch.tanh(self.a(first) + self.b(second)), "first": self.a(first)}


def test_keyword_inputs_and_dict_outputs(cache_dir):
    torch.manual_seed(0)
    module = _TwoInputs().double()
    x = {"second": torch.randn(3, 2, dtype=torch.float64),  # not in the signature's order
         "first": torch.randn(3, 3, dtype=torch.float64)}
    first = entk_torch.from_torch(module, x)
    assert first.info["program_cache"] == "stored"
    entk_torch.clear_cache()
    second = entk_torch.from_torch(module, x)
    assert second.info["program_cache"] == "hit"
    out = second(x)
    with torch.no_grad():
        expected = module(**x)
    for key in ("sum", "first"):
        np.testing.assert_allclose(np.asarray(out[key]), expected[key].numpy(), rtol=1e-13)


def test_a_changed_helper_is_caught_by_the_check(cache_dir, monkeypatch):
    """The key sees the class's code, not the helper it calls; the check against PyTorch does."""
    module, x = _net()
    assert entk_torch.from_torch(module, x).info["program_cache"] == "stored"
    entk_torch.clear_cache()
    monkeypatch.setitem(_HELPER, "act", lambda h: torch.tanh(h).detach() + h)  # same output shape
    changed = entk_torch.from_torch(module, x)
    assert changed.info["program_cache"] == "stored"  # checked, refused, exported afresh
    assert len(list(cache_dir.glob("*.json"))) == 1  # the same key, replaced
    np.testing.assert_allclose(np.asarray(entk.ntk(changed, x)), torch_func_ntk(module, x, x),
                               rtol=1e-10, atol=1e-12)


def test_changed_attributes_and_shapes_are_other_keys(cache_dir):
    module, x = _net()
    entk_torch.from_torch(module, x)
    entk_torch.clear_cache()
    module.norm.eps = 1e-3  # a plain attribute forward reads
    assert entk_torch.from_torch(module, x).info["program_cache"] == "stored"
    entk_torch.clear_cache()
    module.head.weight.requires_grad_(False)
    assert entk_torch.from_torch(module, x).info["program_cache"] == "stored"
    assert len(list(cache_dir.glob("*.json"))) == 3


class _WithConstant(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.scale = torch.linspace(1.0, 2.0, 3)  # a plain tensor attribute: a lifted constant

    def forward(self, x):
        return self.lin(x * self.scale)


def test_tensor_attributes_are_read_from_the_module(cache_dir):
    torch.manual_seed(0)
    module, x = _WithConstant(), torch.randn(4, 3)
    assert entk_torch.from_torch(module, x).info["program_cache"] == "stored"
    entk_torch.clear_cache()
    assert entk_torch.from_torch(module, x).info["program_cache"] == "hit"
    module.scale.mul_(3.0)  # in place: the stored program reads the module's tensor, as an export does
    model = entk_torch.from_torch(module, x)
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(np.asarray(model(x)), expected, rtol=1e-6)


def test_constants_made_in_forward_are_stored_by_value(cache_dir):
    class MadeInForward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x * torch.tensor([1.0, 2.0, 3.0]))  # a constant no attribute holds

    torch.manual_seed(0)
    module, x = MadeInForward(), torch.randn(4, 3)
    assert entk_torch.from_torch(module, x).info["program_cache"] == "stored"
    entk_torch.clear_cache()
    model = entk_torch.from_torch(module, x)
    assert model.info["program_cache"] == "hit"
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(model(x)), module(x).numpy(), rtol=1e-6)


def test_not_stored_or_off(cache_dir, monkeypatch):
    class ListHeld(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.extra = [torch.nn.Linear(3, 2)]  # not registered: lifted, aliasing the module

        def forward(self, x):
            return self.extra[0](x)

    x = torch.randn(4, 3)
    assert entk_torch.from_torch(ListHeld(), x).info["program_cache"] == "not stored"
    train_mode = entk_torch.from_torch(torch.nn.Linear(3, 2), x, training=True)
    assert train_mode.info["program_cache"] == "not stored"  # no check run: it would train BatchNorm
    monkeypatch.setenv("ENTK_PROGRAM_CACHE", "0")
    assert program_cache.directory() is None
    assert entk_torch.from_torch(torch.nn.Linear(3, 2), x).info["program_cache"] == "off"


_MODEL_FILE = '''
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 8)
        self.b = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)){edit})
'''

_WORKER = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import jax, torch, entk
from entk.adapters import torch as entk_torch
import model_file

torch.manual_seed(0)
module = model_file.Net().double().eval()
x = torch.randn(4, 6, dtype=torch.float64)
kernel = entk.ntk(module, x)
with jax.enable_x64(True):  # as entk.ntk converted it (float64 model): its in-memory conversion
    info = entk_torch.from_torch(module, x).info
print(json.dumps({"cache": info["program_cache"], "kernel": kernel.tolist(),
                  "dynamo": any(m.startswith("torch._dynamo") for m in sys.modules)}))
'''


def _worker(folder: pathlib.Path, cache: pathlib.Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", ENTK_CACHE_DIR=str(cache))
    env.pop("ENTK_PROGRAM_CACHE", None)
    out = subprocess.run([sys.executable, "-c", _WORKER, str(folder)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _reference(folder: pathlib.Path) -> np.ndarray:
    sys.path.insert(0, str(folder))
    try:
        import importlib

        import model_file
        importlib.reload(model_file)
        torch.manual_seed(0)
        module = model_file.Net().double().eval()
        x = torch.randn(4, 6, dtype=torch.float64)
        return torch_func_ntk(module, x, x)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("model_file", None)


def test_a_second_process_skips_torch_export_until_the_code_changes(tmp_path):
    folder, cache = tmp_path / "code", tmp_path / "cache"
    folder.mkdir()
    source = folder / "model_file.py"
    source.write_text(textwrap.dedent(_MODEL_FILE.format(edit="")))
    first, second = _worker(folder, cache), _worker(folder, cache)
    assert first["cache"] == "stored" and first["dynamo"]
    assert second["cache"] == "hit" and not second["dynamo"]  # torch.export never imported
    np.testing.assert_allclose(second["kernel"], first["kernel"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(second["kernel"], _reference(folder), rtol=1e-10, atol=1e-12)
    # the class's file changes (a detach): a new key, a new export
    source.write_text(textwrap.dedent(_MODEL_FILE.format(edit=".detach() + 0.5")))
    third = _worker(folder, cache)
    assert third["cache"] == "stored"
    expected = _reference(folder)
    np.testing.assert_allclose(third["kernel"], expected, rtol=1e-10, atol=1e-12)
    assert not np.allclose(expected, first["kernel"])


def test_least_recently_used_programs_are_evicted(cache_dir, monkeypatch):
    x = torch.randn(4, 3)
    first = torch.nn.Linear(3, 2)
    entk_torch.from_torch(first, x)
    (old,) = cache_dir.glob("*.json")
    os.utime(old, (1, 1))  # long unused
    monkeypatch.setattr(program_cache, "MAX_BYTES", int(1.5 * old.stat().st_size))
    second = torch.nn.Linear(3, 2, bias=False)
    assert entk_torch.from_torch(second, x).info["program_cache"] == "stored"
    left = list(cache_dir.glob("*.json"))
    assert len(left) == 1 and left[0] != old
