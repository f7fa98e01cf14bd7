"""One worker thread for compilations that can overlap the caller's Python work.

XLA compiles without holding the GIL, while tracing and lowering are Python: on a first kernel call,
compiling one program (the cost model's micro-benchmarks, the likely winner) while the next one is
lowered uses the second core. One worker, so background jobs never compete with each other; each runs
under the submitting thread's 64-bit setting (JAX's configuration contexts are per thread) and outside
any trace.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import jax

_WORKER: ThreadPoolExecutor | None = None


def submit(job: Callable[[], Any]) -> Future:
    """Runs `job()` on the worker thread; its `Future` gives the result (or raises its error)."""
    global _WORKER
    if _WORKER is None:
        _WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="entk-background")
    x64 = bool(jax.config.x64_enabled)

    def run() -> Any:
        with jax.enable_x64(True) if x64 else contextlib.nullcontext(), jax.core.eval_context():
            return job()

    return _WORKER.submit(run)
