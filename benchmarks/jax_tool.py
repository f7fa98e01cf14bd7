"""One JAX eNTK tool (entk or neural-tangents) under benchmark: compile, warm up, time, one strategy at a time.

Shared by `benchmarks/run.py` (entk, in process) and `benchmarks/peer_nt.py` (neural-tangents 0.6.5, in
its own virtualenv with JAX 0.4.24), so both tools are measured by the same code: it imports neither
tool and uses only JAX APIs that both JAX versions have. A tool is given its `stax` module and a
factory `make_ntk_fn(apply_fn, strategy, trace_axes) -> ntk_fn(x1, x2, params)`.

Measurements per strategy:
- `compile_s`: `jax.jit(ntk_fn).lower(x, None, params).compile()` wall time (tracing, the tool's own
  decisions such as "auto", and XLA compilation);
- `flops`: XLA's cost analysis of the lowered program;
- `peak_bytes`: XLA's memory analysis of the compiled program: arguments + outputs + temporaries
  (JAX 0.4.24 reports zeros on CPU, so neural-tangents' is missing there);
- `peak_rss_bytes`: how far the process's resident memory rose above its level before the first call
  (Linux `VmHWM` reset through `/proc/self/clear_refs`): the same measure for every tool, torch too;
- `run_s`: wall time of one call of the compiled program until its result is ready (steady state: the
  caller runs a warm-up call first and takes the median of repeated calls).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np

from benchmarks import networks


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_rss_during(fn: Callable[[], Any]) -> tuple[Any, float | None]:
    """`(fn(), bytes the resident set rose above its starting level while fn ran)`; None off Linux."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets the high-water mark VmHWM to the current VmRSS
        before = _status_kib("VmRSS")
    except OSError:
        return fn(), None
    result = fn()
    return result, 1024.0 * max(_status_kib("VmHWM") - before, 0)


def _as_dict(analysis: Any) -> dict:
    if isinstance(analysis, (list, tuple)):  # JAX < 0.4.30 returned one dict per computation
        analysis = analysis[0] if analysis else {}
    return dict(analysis or {})


class JaxTool:
    """A JAX eNTK implementation bound to one benchmark case at a time."""

    def __init__(self, stax: Any, make_ntk_fn: Callable[[Callable, str, tuple], Callable]):
        self.stax = stax
        self.make_ntk_fn = make_ntk_fn
        self.compiled: dict[str, Any] = {}

    def setup(self, model: str, n: int, outputs: int, traced: bool, data_path: str) -> dict:
        """Builds the network and loads the shared inputs and parameters from `data_path` (.npz with
        `x` and `leaf_0 ... leaf_k`)."""
        self.apply_fn, params, input_shape = networks.build(self.stax, model, n, outputs)
        data = np.load(data_path)
        leaves = [data[f"leaf_{i}"] for i in range(len(data.files) - 1)]
        self.params = networks.set_leaves(params, leaves)
        self.x = jax.numpy.asarray(data["x"])
        if self.x.shape != tuple(input_shape):
            raise ValueError(f"{model}: inputs of shape {self.x.shape}, expected {input_shape}")
        self.trace_axes = (-1,) if traced else ()
        self.compiled = {}
        return {"n_params": int(sum(np.size(p) for p in jax.tree_util.tree_leaves(self.params)))}

    def compile(self, strategy: str) -> dict:
        """Traces, lowers and compiles `strategy`'s kernel function; returns its static costs."""
        ntk_fn = self.make_ntk_fn(self.apply_fn, strategy, self.trace_axes)
        start = time.perf_counter()
        lowered = jax.jit(lambda x, p: ntk_fn(x, None, p)).lower(self.x, self.params)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        flops = _as_dict(lowered.cost_analysis()).get("flops")
        try:
            memory = compiled.memory_analysis()
            peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                    + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
        except Exception:  # noqa: BLE001 - not every backend reports it
            peak = None
        self.compiled[strategy] = compiled
        return {"compile_s": compile_s, "flops": None if flops is None else float(flops),
                "peak_bytes": None if peak is None else float(peak)}

    def kernel(self, strategy: str) -> tuple[np.ndarray, float | None]:
        """The kernel of a first (warm-up) call as a NumPy array, and the call's peak RSS rise."""
        return peak_rss_during(lambda: np.asarray(self.compiled[strategy](self.x, self.params)))

    def run(self, strategy: str) -> float:
        """Seconds of one call of the compiled kernel function, result ready."""
        fn = self.compiled[strategy]
        start = time.perf_counter()
        jax.block_until_ready(fn(self.x, self.params))
        return time.perf_counter() - start

    def drop(self, strategy: str) -> None:
        self.compiled.pop(strategy, None)
