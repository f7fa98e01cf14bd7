"""TensorFlow, imported on first use and configured to coexist with JAX in one process.

Its own module so that every part of the TF adapter (`export`, `bridge`, the package itself) can
import it without importing the package `entk.adapters.tf` from inside it (no import cycle).
"""

from __future__ import annotations

import os
import types

from entk.adapters._startup_logs import quiet_tensorflow_start

_TF: types.ModuleType | None = None


def import_tensorflow() -> types.ModuleType:
    """`tensorflow`, imported on first use with GPU memory growth on (TF and JAX share the GPU)."""
    global _TF
    if _TF is None:
        os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        # TF's start-up notices (oneDNN, cuInit, absl) filtered: entk.adapters._startup_logs.
        with quiet_tensorflow_start():
            # Never Triton here (loading it after TensorFlow crashes): entk.adapters._llvm_guard.
            import tensorflow as tf

            try:
                for gpu in tf.config.list_physical_devices("GPU"):
                    tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:
                pass  # TF's devices were initialised already: the user configured them.
        _TF = tf
    return _TF
