"""Compile time: what XLA takes on this machine per lowered operation, and the prediction it gives.

XLA's compile time of entk's kernel programs grows with their size. On the 2-core development machine
(XLA:CPU, jaxlib 0.10) the SD, JC and NTVP programs of an MLP, a small CNN and ResNet-18 (99 to 3,318
StableHLO operations, 0.11 to 2.9 s) took 0.75-1.5 ms per operation, while a micro-benchmark
repeating one operation took 0.26 ms each: the rate is learned from the kernel programs entk itself
compiles. `compile_program(lowered)` measures every real compilation (a hit in JAX's persistent or
in-memory cache is not one: it is recognised by JAX's own monitoring events, per thread) and keeps a
running average of seconds per operation for the device, stored beside the calibration
(`path()`: `compile-rate-<device>.json`; `entk cache clear --compile-rate` resets it);
`predict_seconds(n_ops)` is None until this device has compiled one.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import threading
from typing import Any

import jax

from entk.algorithms.device import cache_dir, device_key

AVERAGED_OVER = 10
"""The running average weighs the last ~this many compilations."""

_OPERATION = re.compile(r"=\s*\"?(?:stablehlo|chlo|mhlo)\.([a-z_]+)")
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # JAX's: compile or cache read
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_THREAD = threading.local()
_LISTENING = False
_RATES: dict[str, dict] = {}


def operation_names(lowered: Any) -> list[str]:
    """The StableHLO / CHLO operations of a lowered program, in text order (e.g. `dot_general`)."""
    return _OPERATION.findall(lowered.as_text())


def predict_seconds(n_ops: int, device: jax.Device | None = None) -> float | None:
    """Seconds XLA is expected to take compiling an `n_ops`-operation program on `device` (default:
    the first), or None before any compilation was measured there."""
    rate = _rate(device or jax.devices()[0])
    return None if rate is None else n_ops * rate["seconds_per_op"]


def compile_program(lowered: Any, n_ops: int | None = None) -> Any:
    """`lowered.compile()`, the compilation's seconds per operation added to the device's average
    when XLA really compiled (`n_ops`: the program's operation count, if known)."""
    _listen()
    _THREAD.compile_s, _THREAD.hit = None, False
    compiled = lowered.compile()
    seconds, hit = _THREAD.compile_s, _THREAD.hit
    if seconds is not None and not hit:
        n_ops = len(operation_names(lowered)) if n_ops is None else n_ops
        if n_ops > 0:
            _record(jax.devices()[0], seconds / n_ops)
    return compiled


def _listen() -> None:
    """JAX reports its monitoring events in the compiling thread: a thread-local record of the last
    compile duration and of cache hits tells this thread's compilation apart from a cache read."""
    global _LISTENING
    if _LISTENING:
        return

    def on_duration(event: str, duration: float, **_: Any) -> None:
        if event == _COMPILE_EVENT:
            _THREAD.compile_s = duration

    def on_event(event: str, **_: Any) -> None:
        if event == _CACHE_HIT_EVENT:
            _THREAD.hit = True

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    _LISTENING = True


def path(device: jax.Device | None = None) -> pathlib.Path:
    """Where the compile rate of `device` (default: the first device) is stored."""
    return cache_dir() / f"compile-rate-{device_key(device or jax.devices()[0])}.json"


def _rate(device: jax.Device) -> dict | None:
    key = str(path(device))
    if key not in _RATES:
        try:
            stored = json.loads(path(device).read_text())
            if float(stored["seconds_per_op"]) > 0 and int(stored["programs"]) > 0:
                _RATES[key] = {"seconds_per_op": float(stored["seconds_per_op"]),
                               "programs": int(stored["programs"])}
        except (OSError, ValueError, TypeError, KeyError):
            pass
    return _RATES.get(key)


def _record(device: jax.Device, seconds_per_op: float) -> None:
    rate = _rate(device) or {"seconds_per_op": seconds_per_op, "programs": 0}
    programs = rate["programs"] + 1
    average = rate["seconds_per_op"] + (seconds_per_op - rate["seconds_per_op"]) / min(
        programs, AVERAGED_OVER)
    where = path(device)
    _RATES[str(where)] = {"seconds_per_op": average, "programs": programs}
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = where.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(_RATES[str(where)]))
        tmp.replace(where)
    except OSError:
        pass  # a read-only cache directory: the average lives for this process only
