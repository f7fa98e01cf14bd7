"""TensorFlow and Triton in one process: the load order that does not crash.

TensorFlow's shared library and Triton's (`triton._C.libtriton`) each carry their own copy of LLVM and
register LLVM's global command-line options when they load. Triton loaded *after* TensorFlow registers
them a second time and the process dies with a segmentation fault (`import tensorflow; import triton`
is enough); Triton loaded first works. Users do not import Triton themselves: torch does, lazily, from
`torch.export` and `torch._dynamo` (which `torch.func.grad` / `vjp` load on first use), Inductor and the
FLOP counter. So a user who runs `import keras` (TensorFlow backend) and then hands entk a torch module
would crash inside entk.

`prepare_torch()` settles the question once per process, before any entk code can reach that torch
machinery (`entk.adapters.torch` calls it when it is imported, which every torch path goes through):

- Triton already loaded, or not installed: nothing to do.
- TensorFlow loaded, Triton not: Triton can never load safely in this process, so it is made
  unavailable: `sys.modules["triton"] = None`, Python's documented way to make `import triton` raise
  `ModuleNotFoundError` and `importlib.util.find_spec("triton")` return None. torch then behaves as on an
  install without Triton: `torch.export`, `torch.func` and eager kernels (CPU and GPU) work; only
  code generation that needs Triton (`torch.compile`'s GPU backend, torch's optional Triton kernels,
  which are switched off here) is unavailable, with torch's own "Triton not found" errors.
- Neither loaded: Triton is imported now (torch.export would import it moments later anyway), so
  TensorFlow can be loaded afterwards, by the user or by entk's TF adapter, in the safe order.

The TensorFlow side never imports Triton: by the time entk sees a TF model, TensorFlow is loaded.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

__all__ = ["prepare_torch", "triton_blocked"]

# Modules whose presence means TensorFlow's LLVM is (or is about to be) in the process.
_TENSORFLOW_MODULES = ("tensorflow",)

_blocked = False


def triton_blocked() -> bool:
    """Whether `prepare_torch` made Triton unavailable in this process (TensorFlow was loaded first)."""
    return _blocked


def prepare_torch() -> None:
    """Loads Triton now, or makes it unavailable, so torch can never load it after TensorFlow."""
    if "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return  # loaded already (by the user or an earlier call), blocked, or not installed
    if any(name in sys.modules for name in _TENSORFLOW_MODULES):
        _block_triton()
        return
    try:
        import triton  # noqa: F401  before TensorFlow: the order in which both load
    except Exception:  # noqa: BLE001 - a broken install: never let anything retry it later
        _block_triton()


def _block_triton() -> None:
    global _blocked
    sys.modules["triton"] = None  # type: ignore[assignment]
    _blocked = True
    # torch registers its optional Triton kernels (e.g. a CUDA `bmm` override) at `import torch` after
    # only probing for Triton; they import it on first use, so they must go too.
    native = sys.modules.get("torch._native.triton_utils")
    try:
        if native is not None and native.runtime_available():
            native.deregister_op_overrides()
    except Exception:  # noqa: BLE001 - private torch API (torch >= 2.12); absent or changed: skip
        pass
    # torch.utils.flop_counter warns "triton not found" on import; here that is expected.
    logging.getLogger("torch.utils.flop_counter").addFilter(
        lambda record: not str(record.msg).startswith("triton not found"))
