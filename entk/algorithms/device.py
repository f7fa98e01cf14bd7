"""Device facts: the measured throughput table (calibration) and the free memory of a device.

Both the cost model (`entk.algorithms.cost`) and tiling (`entk.scale.tiling`) read these facts here.

Calibration. The cost model predicts a strategy's time from a small per-primitive throughput table
measured on the machine by micro-benchmarks (float32 unless said):

    dot           FLOP/s of a matmul (`dot_general`), n × n @ n × n
    conv          FLOP/s of a 3 × 3 convolution's forward pass, NHWC
    conv_wgrad    FLOP/s of the same convolution's weight gradient (a large-window convolution,
                  which XLA:CPU runs far below the forward rate)
    elementwise   FLOP/s of a fused elementwise chain (tanh, multiply-add, max) on 1 MiB arrays
    fused bytes/s the same chain's bytes accessed *as lowered* (before fusion: what the cost model
                  counts) per second: the rate the unoptimised program's elementwise traffic runs at
    bytes/s       a streamed `u + 1` over a 32 MiB vector into freshly mapped memory
    float64       the float64 matmul rate over the float32 one (applied to every class)
    overheads     one call of a compiled function; one non-fusible operation (a dependent chain)

A calibration cannot lie (an ordinary first call once cached 2.4 TFLOP/s and 285 GB/s on 2 cores,
~20x the machine, and auto went wrong for every later process): every timed call blocks on its
result (`jax.block_until_ready`), each figure is a median of repeats after a warm-up, the
micro-benchmarks run outside any enclosing trace, and every rate is checked against the physical
ceiling of the machine (`physical_peak`: cores × vector lanes × 2 (FMA) × 2 FMA pipes × clock; a
memory-stream ceiling of 32 bytes per core per cycle). A calibration above a ceiling, or absurdly far
below it (under PLAUSIBLE_FLOOR of it), is measured again; one that stays implausible is used
clamped to the bounds for this process only and never written to disk. A stored calibration is
re-checked when it is read, and measured again when its key changes: the machine (CPU model or
accelerator name), the device kind and count, the usable cores, the JAX and jaxlib versions, or
CALIBRATION_VERSION.

Files: `$ENTK_CACHE_DIR/calibration-<platform>-<device kind>.json` (default `~/.cache/entk`).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import os
import pathlib
import platform as _platform
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("entk.cost")

# Bumped when the micro-benchmarks or the file layout change (v4: one FLOP rate and one byte rate;
# v5: per-primitive table, machine key, physical-peak check).
CALIBRATION_VERSION = 5

# Fraction of the device's free memory `"auto"` allows itself by default.
DEFAULT_BUDGET_FRACTION = 0.5

# A measured rate below this fraction of the physical ceiling is as implausible as one above it
# (a broken timer, or a benchmark that ran on a different device than the one asked for).
PLAUSIBLE_FLOOR = 1e-5
# Measurements tried before an implausible calibration is used clamped (and not stored).
MAX_ATTEMPTS = 3
# Clock headroom over the advertised frequency when the maximum boost clock is not readable.
_TURBO_HEADROOM = 1.5
# Bytes one core can stream from beyond its L2 cache per cycle (an L3 / memory port): generous.
_STREAM_BYTES_PER_CYCLE = 32
# Accelerators (no clock is exposed): per streaming multiprocessor / core, FLOPs per cycle of the
# fastest matrix unit at a 3 GHz clock; memory at most 20 TB/s. Both far above any device today.
_ACCEL_FLOPS_PER_CORE_CYCLE = 4096
_ACCEL_CLOCK_HZ = 3e9
_ACCEL_PEAK_FLOPS = 1e16
_ACCEL_PEAK_BYTES = 2e13

RATE_CLASSES = ("dot", "conv", "conv_wgrad", "elementwise")


def cache_dir() -> pathlib.Path:
    """entk's cache directory: `$ENTK_CACHE_DIR`, default `~/.cache/entk`."""
    return pathlib.Path(os.environ.get("ENTK_CACHE_DIR", pathlib.Path.home() / ".cache" / "entk"))


def device_key(device: jax.Device) -> str:
    """`<platform>-<device kind>` with no spaces or slashes, e.g. `cpu-cpu`, `gpu-NVIDIA_H200`."""
    return f"{device.platform}-{device.device_kind}".replace(" ", "_").replace("/", "_")


# ----------------------------------------------------------------------------------------------
# The machine and its physical ceiling


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict:
    """Model name, flags and clock (Hz) of the first CPU in /proc/cpuinfo ({} where unreadable)."""
    info: dict = {}
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    clocks = []
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if name in ("model name", "Hardware", "Model") and "model" not in info:
            info["model"] = value
        elif name in ("flags", "Features") and "flags" not in info:
            info["flags"] = set(value.split())
        elif name == "cpu MHz":
            clocks.append(float(value) * 1e6)
    try:  # the maximum boost clock, where the kernel exposes it
        khz = pathlib.Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()
        info["clock_hz"] = float(khz) * 1e3
    except (OSError, ValueError):
        if clocks:
            info["clock_hz"] = max(clocks) * _TURBO_HEADROOM
    return info


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def machine_name(device: jax.Device) -> str:
    """The CPU model (CPU devices) or the accelerator's name."""
    if device.platform == "cpu":
        return _cpuinfo().get("model") or _platform.processor() or _platform.machine() or "cpu"
    return str(device.device_kind)


def _vector_bytes(flags: set) -> int:
    """Widest SIMD register in bytes: AVX-512 64, AVX/AVX2 32, SSE / NEON 16 (ARM SVE: up to 256)."""
    if "sve" in flags:
        return 256
    if any(f.startswith("avx512") for f in flags):
        return 64
    if "avx" in flags or "avx2" in flags:
        return 32
    return 16


def physical_peak(device: jax.Device, itemsize: int = 4) -> tuple[float, float]:
    """A generous upper bound on the device's (FLOP/s, bytes/s) for `itemsize`-byte floats.

    CPU: cores × (vector bytes / itemsize) lanes × 2 (fused multiply-add) × 2 FMA pipes × clock,
    and cores × 32 bytes per cycle × clock for a stream larger than the caches; the clock is the
    maximum boost clock, or 1.5x the advertised one (5 GHz where nothing is readable).
    Accelerators: cores (SMs) × 4096 FLOPs per cycle × 3 GHz where the core count is known, else
    10 PFLOP/s; 20 TB/s.
    """
    if device.platform != "cpu":
        cores = getattr(device, "core_count", None)
        flops = (cores * _ACCEL_FLOPS_PER_CORE_CYCLE * _ACCEL_CLOCK_HZ
                 if isinstance(cores, int) and cores > 0 else _ACCEL_PEAK_FLOPS)
        return float(flops) * 4 / max(itemsize, 4), _ACCEL_PEAK_BYTES
    info = _cpuinfo()
    clock = info.get("clock_hz") or 5e9
    flags = info.get("flags", set())
    fma = 2 if ("fma" in flags or "avx512f" in flags or "asimd" in flags or not flags) else 1
    lanes = max(_vector_bytes(flags) // itemsize, 1)
    cores = cpu_cores()
    return cores * lanes * fma * 2 * clock, cores * _STREAM_BYTES_PER_CYCLE * clock


# ----------------------------------------------------------------------------------------------
# The calibration record


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Throughput of one device, measured on this machine (see the module docstring).

    Attributes:
      key: what the figures depend on (`calibration_key`); a stored calibration whose key differs
        from the current one is measured again.
      flops_per_s: float32 FLOP/s per primitive class (`RATE_CLASSES`).
      float64_factor: float64 matmul rate / float32 matmul rate (1.0 when x64 is off).
      bytes_per_s: streamed memory bandwidth.
      fused_bytes_per_s: bytes accessed by an elementwise chain as lowered (unfused) per second.
      op_overhead_s: cost of one small non-fusible operation (a kernel launch / thunk).
      overhead_s: cost of one call of a compiled function.
      peak_flops_per_s, peak_bytes_per_s: the physical ceilings the figures were checked against.
      measured_at: when (UTC, ISO 8601).
      plausible: False for figures that stayed outside the physical bounds and were clamped (held in
        memory for this process only, never stored).
    """

    key: dict
    flops_per_s: dict
    float64_factor: float
    bytes_per_s: float
    fused_bytes_per_s: float
    op_overhead_s: float
    overhead_s: float
    peak_flops_per_s: float
    peak_bytes_per_s: float
    measured_at: str
    plausible: bool = True

    @property
    def device_kind(self) -> str:
        return str(self.key.get("device_kind", ""))

    def flop_rate(self, itemsize: int, kind: str = "dot") -> float:
        """FLOP/s of primitive class `kind` for `itemsize`-byte floats."""
        rate = self.flops_per_s[kind]
        return rate * self.float64_factor if itemsize >= 8 else rate

    def problems(self) -> list[str]:
        """Why these figures cannot be true of this machine (empty when they are plausible)."""
        found = []
        checks = [(f"{k} {v / 1e9:.4g} GFLOP/s", v, self.peak_flops_per_s)
                  for k, v in self.flops_per_s.items()]
        checks.append((f"memory {self.bytes_per_s / 1e9:.4g} GB/s", self.bytes_per_s,
                       self.peak_bytes_per_s))
        checks.append((f"fused elementwise {self.fused_bytes_per_s / 1e9:.4g} GB/s",
                       self.fused_bytes_per_s, _LOWERED_BYTES_PER_FLOP * self.peak_flops_per_s))
        for what, value, ceiling in checks:
            if not (_finite(value) and PLAUSIBLE_FLOOR * ceiling <= value <= ceiling):
                found.append(f"{what} outside [{PLAUSIBLE_FLOOR * ceiling / 1e9:.3g}, "
                             f"{ceiling / 1e9:.4g}] G/s")
        if not 0 < self.float64_factor <= 4:  # float64 is never faster; 4x allows for a busy machine
            found.append(f"float64/float32 rate {self.float64_factor:.3g}")
        if not 1e-7 <= self.overhead_s <= 1.0:  # a compiled call costs at least ~100 ns
            found.append(f"call overhead {self.overhead_s:.3g} s")
        if not 0 <= self.op_overhead_s <= 1.0:
            found.append(f"per-operation overhead {self.op_overhead_s:.3g} s")
        return found

    def summary(self) -> str:
        """One line for reports: the rates, the ceilings and the date, e.g. for `entk compare`."""
        rates = ", ".join(f"{_LABELS[k]} {self.flops_per_s[k] / 1e9:.3g}" for k in RATE_CLASSES
                          if k in self.flops_per_s)
        flag = "" if self.plausible else " [IMPLAUSIBLE, clamped, not stored]"
        return (f"calibration {self.measured_at[:16].replace('T', ' ')} UTC{flag}: {rates} GFLOP/s "
                f"(float64 x{self.float64_factor:.2f}); memory {self.bytes_per_s / 1e9:.3g} GB/s, fused "
                f"elementwise {self.fused_bytes_per_s / 1e9:.3g} GB/s as lowered; "
                f"call {self.overhead_s * 1e6:.3g} us, op {self.op_overhead_s * 1e6:.3g} us; "
                f"physical peak {self.peak_flops_per_s / 1e9:.4g} GFLOP/s, "
                f"{self.peak_bytes_per_s / 1e9:.4g} GB/s ({self.key.get('machine', '?')}, "
                f"jax {self.key.get('jax', '?')})")

    def clamped(self) -> "Calibration":
        """These figures pulled inside the physical bounds, marked not plausible."""
        lo_f, hi_f = PLAUSIBLE_FLOOR * self.peak_flops_per_s, self.peak_flops_per_s
        lo_b, hi_b = PLAUSIBLE_FLOOR * self.peak_bytes_per_s, self.peak_bytes_per_s
        flops = {k: float(np.clip(np.nan_to_num(v, nan=lo_f), lo_f, hi_f))
                 for k, v in self.flops_per_s.items()}
        return dataclasses.replace(
            self, flops_per_s=flops, plausible=False,
            bytes_per_s=float(np.clip(np.nan_to_num(self.bytes_per_s, nan=lo_b), lo_b, hi_b)),
            fused_bytes_per_s=float(np.clip(np.nan_to_num(self.fused_bytes_per_s, nan=lo_b), lo_b,
                                            _LOWERED_BYTES_PER_FLOP * hi_f)),
            float64_factor=float(np.clip(self.float64_factor, 0.01, 1.0)),
            overhead_s=float(np.clip(self.overhead_s, 1e-6, 1.0)),
            op_overhead_s=float(np.clip(self.op_overhead_s, 0.0, 1.0)))


_LABELS = {"dot": "matmul", "conv": "conv", "conv_wgrad": "conv weight-grad",
           "elementwise": "elementwise"}


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and np.isfinite(value)


def calibration_key(device: jax.Device) -> dict:
    """What a calibration depends on: machine, device kind and count, cores, JAX versions."""
    import jaxlib

    key = {"version": CALIBRATION_VERSION, "machine": machine_name(device),
           "platform": device.platform, "device_kind": str(device.device_kind),
           "device_count": jax.device_count(device.platform),
           "jax": jax.__version__, "jaxlib": getattr(jaxlib, "__version__", "?")}
    if device.platform == "cpu":
        key["cores"] = cpu_cores()
    return key


# ----------------------------------------------------------------------------------------------
# Micro-benchmarks


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    """The median of `repeats` calls after a warm-up, each blocked on its result (the fastest call is
    no better: one early-return outlier once calibrated a 2-core CPU at 1.4 TFLOP/s)."""
    jax.block_until_ready(fn())  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


_CHAIN = 64  # its compilation is most of the calibration's time
# Bytes an elementwise op touches per FLOP as lowered, at most (two float64 operands and a result):
# the ceiling of a fused chain's lowered-bytes rate is this times the FLOP ceiling.
_LOWERED_BYTES_PER_FLOP = 24


def _elementwise_chain(x: jax.Array, w: jax.Array) -> jax.Array:
    """A backward-pass-like elementwise chain (24 ops) that XLA fuses into one loop."""
    y = x
    for _ in range(4):
        y = jnp.tanh(y * w + 0.5)
        y = jnp.maximum(y, 0.0) * x - y
    return y


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_weight_grad(x: jax.Array, g: jax.Array, w: jax.Array) -> jax.Array:
    return jax.vjp(lambda k: _conv(x, k), w)[1](g)[0]


def _matmul_chain(u: jax.Array, m: jax.Array) -> jax.Array:
    """Dependent small matmuls: nothing to fuse, so each costs one operation."""
    for _ in range(_CHAIN):
        u = jnp.tanh(u @ m)
    return u


# The micro-benchmarks' programs, jitted once per process: `warm_up_in_background` compiles them
# (their compilation is most of a calibration's time) and `_measure`'s calls then find them compiled.
_MATMUL = jax.jit(lambda m: m @ m)
_CONV = jax.jit(_conv)
_CONV_WGRAD = jax.jit(_conv_weight_grad)
_FUSED = jax.jit(_elementwise_chain)
_ADD_ONE = jax.jit(lambda u: u + 1.0)
_CHAINED = jax.jit(_matmul_chain)


def _inputs(device: jax.Device) -> dict[str, jax.Array]:
    """The micro-benchmarks' inputs on `device`. Made by NumPy and copied over: `jnp.ones` & co.
    would each compile a small XLA program (~25 ms apiece on a 2-core CPU; a dozen of them were a
    third of the calibration)."""
    scale = 1 if device.platform == "cpu" else 4  # accelerators: larger problems to fill them
    put = functools.partial(jax.device_put, device=device)
    n, b, hw, c = 384 * scale, 8 * scale, 24, 32 * scale  # conv: 3 x 3, c -> c channels, SAME
    inputs = {"a": put(np.ones((n, n), np.float32)),
              "x": put(np.ones((b, hw, hw, c), np.float32)),
              "w": put(np.full((3, 3, c, c), 1 / (9 * c), np.float32)),
              "e": put(np.full((512 * scale, 512), 0.3, np.float32)),
              "ew": put(np.full((512,), 0.7, np.float32)),
              # 32 MiB in, 32 MiB out into fresh pages (past glibc's largest mmap threshold, so every
              # call maps new memory, as XLA's large temporaries do): stable from call to call.
              "v": put(np.ones((1 << 23,), np.float32)),
              "s": put(np.ones((), np.float32)),
              "m": put(np.eye(8, dtype=np.float32))}
    if jax.config.jax_enable_x64:
        inputs["a64"] = put(np.ones((n, n), np.float64))
    return inputs


def _calls(i: dict[str, jax.Array]) -> dict[str, Callable[[], Any]]:
    """Each micro-benchmark as a call of its compiled program on its inputs."""
    calls = {"dot": lambda: _MATMUL(i["a"]), "conv": lambda: _CONV(i["x"], i["w"]),
             "conv_wgrad": lambda: _CONV_WGRAD(i["x"], i["x"], i["w"]),
             "elementwise": lambda: _FUSED(i["e"], i["ew"]), "bandwidth": lambda: _ADD_ONE(i["v"]),
             "overhead": lambda: _ADD_ONE(i["s"]), "chain": lambda: _CHAINED(i["m"], i["m"])}
    if "a64" in i:
        calls["dot64"] = lambda: _MATMUL(i["a64"])
    return calls


def _warm_up(device: jax.Device) -> None:
    """Compiles (and runs once) every micro-benchmark."""
    for call in _calls(_inputs(device)).values():
        jax.block_until_ready(call())


def _measure(device: jax.Device) -> Calibration:
    """One run of the micro-benchmarks on `device` (about 0.5 s on a 2-core CPU, 0.15 s once
    `warm_up_in_background` has compiled them)."""
    i = _inputs(device)
    calls = _calls(i)
    n, (b, hw, _, c) = i["a"].shape[0], i["x"].shape
    rates = {"dot": 2 * n ** 3 / _median_time(calls["dot"], 5)}
    float64_factor = 1.0
    if "dot64" in calls:
        float64_factor = 2 * n ** 3 / _median_time(calls["dot64"], 5) / rates["dot"]
    conv_flops = 2 * b * hw * hw * 9 * c * c
    rates["conv"] = conv_flops / _median_time(calls["conv"], 5)
    rates["conv_wgrad"] = conv_flops / _median_time(calls["conv_wgrad"], 5)
    costs = _FUSED.lower(i["e"], i["ew"]).cost_analysis()
    costs = (costs[0] if isinstance(costs, (list, tuple)) else costs) or {}
    chain_s = _median_time(calls["elementwise"], 5)
    rates["elementwise"] = (costs.get("flops", 0.0) + costs.get("transcendentals", 0.0)) / chain_s
    fused_bytes = costs.get("bytes accessed", 0.0) / chain_s
    bandwidth = 2 * i["v"].nbytes / _median_time(calls["bandwidth"], 5)
    overhead = _median_time(calls["overhead"], 20)
    op_overhead = max(_median_time(calls["chain"], 5) - overhead, 0.0) / (2 * _CHAIN)
    peak_flops, peak_bytes = physical_peak(device, 4)
    return Calibration(calibration_key(device), rates, float64_factor, bandwidth, fused_bytes,
                       op_overhead, overhead, peak_flops, peak_bytes,
                       datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def _measure_plausible(device: jax.Device) -> Calibration:
    """`_measure`, repeated while its figures break the physical bounds (at most MAX_ATTEMPTS)."""
    problems: list[str] = []
    for attempt in range(MAX_ATTEMPTS):
        # Out of any enclosing trace: `entk.ntk` selects inside `jax.jit`, where the micro-benchmarks'
        # jitted calls would be staged into that trace instead of run (and time nothing).
        with jax.core.eval_context():
            cal = _measure(device)
        problems = cal.problems()
        if not problems:
            return cal
        log.info("entk: calibration attempt %d rejected: %s", attempt + 1, "; ".join(problems))
    warnings.warn(f"entk: the cost model's calibration of {device.device_kind} stayed implausible "
                  f"after {MAX_ATTEMPTS} measurements ({'; '.join(problems)}); using it clamped to "
                  f"the machine's physical bounds for this process, not stored. `implementation=` "
                  f"fixes the strategy if auto chooses badly.", RuntimeWarning, stacklevel=3)
    return cal.clamped()


_CALIBRATIONS: dict[str, Calibration] = {}


def calibration_path(device: jax.Device | None = None) -> pathlib.Path:
    """Where the calibration of `device` (default: the first device) is stored."""
    device = device or jax.devices()[0]
    return cache_dir() / f"calibration-{device_key(device)}.json"


def read_stored(path: pathlib.Path) -> Calibration | None:
    """The calibration stored at `path` as it is (None if missing or unreadable); `calibration()`
    uses it only when its key is the current one and its figures are plausible."""
    try:
        return Calibration(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _load(path: pathlib.Path, key: dict) -> Calibration | None:
    """The stored calibration at `path` if it has this key and plausible figures, else None."""
    cal = read_stored(path)
    if cal is None or cal.key != key or not cal.plausible or cal.problems():
        return None
    return cal


def _store(path: pathlib.Path, cal: Calibration) -> None:
    if not cal.plausible:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(cal), indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home directory only costs a re-measurement next time


def calibration(device: jax.Device | None = None, *, refresh: bool = False) -> Calibration:
    """The device's calibration: from memory, else from disk (same key, plausible), else measured
    (~0.5 s on a 2-core CPU) and stored when plausible."""
    device = device or jax.devices()[0]
    key = calibration_key(device)
    memo = json.dumps(key, sort_keys=True)
    if not refresh and memo in _CALIBRATIONS:
        return _CALIBRATIONS[memo]
    path = calibration_path(device)
    cal = None if refresh else _load(path, key)
    if cal is None:
        warming = _WARMING_UP.pop(memo, None)
        if warming is not None:
            warming.exception()  # wait; a failed warm-up only leaves the compiling to `_measure`
        cal = _measure_plausible(device)
        _store(path, cal)
    _CALIBRATIONS[memo] = cal
    return cal


_WARMING_UP: dict[str, Any] = {}


def warm_up_in_background(device: jax.Device | None = None) -> None:
    """If the device's calibration will have to be measured (none in memory, none stored), compiles
    its micro-benchmarks on entk's background worker now (`entk.algorithms.background`), so that
    their compilation overlaps the caller's work and `calibration()` only times them. Call it before
    tracing something long, then `calibration()`."""
    device = device or jax.devices()[0]
    key = calibration_key(device)
    memo = json.dumps(key, sort_keys=True)
    if memo in _CALIBRATIONS or memo in _WARMING_UP:
        return
    stored = _load(calibration_path(device), key)
    if stored is not None:
        _CALIBRATIONS[memo] = stored
        return
    from entk.algorithms import background

    _WARMING_UP[memo] = background.submit(lambda: _warm_up(device))


# ----------------------------------------------------------------------------------------------
# Memory


class OutOfBudgetError(MemoryError):
    """No strategy (or no tile) fits the memory budget."""


def device_free_bytes(device: jax.Device | None = None) -> int:
    """Free memory of the device (accelerators: allocator stats; CPU: the host's available memory)."""
    device = device or jax.devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends do not implement memory_stats
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def default_memory_budget(device: jax.Device | None = None) -> int:
    """`DEFAULT_BUDGET_FRACTION` of the device's free memory, in bytes."""
    return int(DEFAULT_BUDGET_FRACTION * device_free_bytes(device))
