"""Test configuration: float64 everywhere (references are compared to ~1e-10), CPU only."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The cost model's device calibration, measured while tests load the machine, must not land in the
# user's cache (~/.cache/entk), where `"auto"` would go on trusting it.
os.environ.setdefault("ENTK_CACHE_DIR", tempfile.mkdtemp(prefix="entk-test-cache-"))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
