"""Silencing the notices native libraries print on stderr while they start (TensorFlow's oneDNN notice,
"Could not find cuda drivers", "failed call to cuInit", absl's "All log messages before
absl::InitializeLog()" line), without hiding anything else.

TensorFlow writes these from C++ straight to file descriptor 2, most of them before its logging is
initialised, so `TF_CPP_MIN_LOG_LEVEL` cannot remove them all. `filtered_stderr(noise)` therefore
captures descriptor 2 while a library starts (its import and first device query) and writes back every
captured line except those matching one of the `noise` patterns: Python warnings and any other message
written meanwhile still appear, only later (when the block ends).

Nothing is filtered when the user set `TF_CPP_MIN_LOG_LEVEL=0` (they asked for every message of
TensorFlow) or when the process has no descriptor 2.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Iterator, Sequence

# Start-up notices of TensorFlow (and the CUDA / absl libraries it loads) that say nothing a user of
# entk can act on: entk runs TensorFlow models through JAX, and on the CPU when TF sees no GPU.
TENSORFLOW_NOISE = tuple(re.compile(p) for p in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"^[IWE]\d{4} .*\] oneDNN custom operations are on",
    r"^[IWE]\d{4} .*\] Could not find cuda drivers on your machine",
    r"^[IWE]\d{4} .*\] failed call to cuInit",
    r"^[IWE]\d{4} .*\] Unable to register cu(DNN|FFT|BLAS) factory",
    r"^[IWE]\d{4} .*\] computation placer already registered",
    r"^[IWE]\d{4} .*\] This TensorFlow binary is optimized to use available CPU instructions",
    r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags",
    r"^[IWE]\d{4} .*\] TF-TRT Warning: Could not find TensorRT",
))


@contextlib.contextmanager
def filtered_stderr(noise: Sequence[re.Pattern]) -> Iterator[None]:
    """Within the block, lines written to file descriptor 2 that match a `noise` pattern are dropped;
    every other line is written back to descriptor 2 when the block ends (see the module docstring).
    Python's `sys.stderr` is flushed around the block, so its output keeps its order."""
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 (pythonw): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        _flush_python_stderr()
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            _flush_python_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().splitlines(keepends=True)
            kept = b"".join(line for line in lines if not any(
                pattern.search(line.decode(errors="replace")) for pattern in noise))
            if kept:
                os.write(2, kept)


def _flush_python_stderr() -> None:
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass


def quiet_tensorflow_start() -> contextlib.AbstractContextManager:
    """The context to import TensorFlow in: TensorFlow's own log level raised to warnings
    (`TF_CPP_MIN_LOG_LEVEL=2`) unless the user chose one, and `TENSORFLOW_NOISE` filtered unless the
    user asked for every message (`TF_CPP_MIN_LOG_LEVEL=0`).

    `import jax` sets `TF_CPP_MIN_LOG_LEVEL=1` when it is unset, so "1" counts as not chosen.
    """
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    if level == "0":
        return contextlib.nullcontext()
    if level in (None, "", "1"):
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return filtered_stderr(TENSORFLOW_NOISE)
