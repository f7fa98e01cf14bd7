"""XLA:CPU settings for jaxlib 0.10, set at `import entk`: one fusion miscompiles float32 Jacobians,
another makes the convolutions of kernel computations slow.

jaxlib 0.10's XLA:CPU hands fused reductions to YNNPACK (its "ynn" reduce fusion), and a fusion that
chains reduce -> broadcast -> multiply -> reduce can return wrong values in float32 — off by a few
percent or garbage (NaN, 1e32), e.g. for `sum(c * sum(g, -1, keepdims=True), -1)` with g (8, 1, 512,
256) and c (1, 512, 256) under `jax.jit`. Eager execution, float64 and the same program compiled
without that fusion are correct. Reverse-mode derivatives of normalizations produce exactly this
chain (the variance's cotangent is a reduction broadcast back and reduced again): the vmapped
Jacobian of timm's weight-standardized convolutions (`F.batch_norm(weight.reshape(1, out, -1))`,
NF-ResNets) was 17% off, and SwinV2's eNTK 8e-4 off, while PyTorch's float32 agreed to 1e-6.

The same release also hands single convolutions to YNNPACK ("individual_convolution"), which runs
the batched and vmapped convolutions of eNTK computations slower than XLA's own: without it, on the
benchmark CNN and WideResNet block (`benchmarks/networks.py`, float32, 2 cores) JC took 0.70-0.92x
the time, NTVP 0.60-0.81x and SD 0.90-1.03x; the PyTorch small CNN's SD 0.80x; ResNet-18's SD and a
plain forward and backward pass the same (within 2%).

XLA reads its flags once, when JAX creates its CPU backend, so this appends
`--xla_cpu_experimental_ynn_fusion_type=-reduce,-individual_convolution` to `XLA_FLAGS` at
`import entk` if no JAX backend exists yet (the usual case: entk is imported before the first array
is made). The flag only exists in the jaxlib versions listed in `AFFECTED_JAXLIB` (XLA aborts on
unknown flags, so other versions are left alone), it removes only those two fusion types (the other
YNNPACK fusions stay), and a flag the user already set (`xla_cpu_experimental_ynn_fusion_type=...`
in `XLA_FLAGS`) wins. `ENTK_XLA_CPU_WORKAROUND=0` turns it off. When the backend already exists,
`apply()` returns False and nothing changes (set the flag in `XLA_FLAGS` before starting Python then).
"""

from __future__ import annotations

import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-reduce,-individual_convolution"
AFFECTED_JAXLIB = ((0, 10),)
"""(major, minor) jaxlib versions with the YNNPACK reduce fusion on by default (verified: 0.10.2)."""
ENV_VAR = "ENTK_XLA_CPU_WORKAROUND"


def _jaxlib_minor() -> tuple[int, ...]:
    try:
        import jaxlib
    except ImportError:  # pragma: no cover - jax always brings jaxlib
        return ()
    return tuple(int(p) for p in jaxlib.__version__.split(".")[:2] if p.isdigit())


def needed() -> bool:
    """Whether this jaxlib has the miscompiling fusion, the user has not opted out nor chosen the
    fusion types themselves."""
    if os.environ.get(ENV_VAR, "").strip().lower() in ("0", "off", "false", "no"):
        return False
    if "xla_cpu_experimental_ynn_fusion_type" in os.environ.get("XLA_FLAGS", ""):
        return False
    return _jaxlib_minor() in AFFECTED_JAXLIB


def apply() -> bool:
    """Adds `FLAG` to `XLA_FLAGS` when `needed()` and JAX has no backend yet; True if it is in effect."""
    if FLAG in os.environ.get("XLA_FLAGS", "").split():
        return True
    if not needed():
        return False
    from jax._src import xla_bridge

    initialized = getattr(xla_bridge, "backends_are_initialized", None)
    if initialized is None or initialized():
        _warn_if_computing_on_cpu()
        return False
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAG).strip()
    return True


def _warn_if_computing_on_cpu() -> None:
    """Too late to set the flag (JAX made its backend before `import entk`): say so where the
    kernels would run on the affected CPU backend, rather than risk a silently wrong kernel."""
    import warnings

    import jax

    if jax.default_backend() != "cpu":
        return  # accelerators: the miscompiling fusion is XLA:CPU's only
    warnings.warn(
        f"entk: JAX created its CPU backend before `import entk`, so entk could not turn off "
        f"jaxlib {'.'.join(map(str, _jaxlib_minor()))}'s YNNPACK reduce fusion, which miscompiles "
        f"float32 derivatives of normalization layers (see entk/_xla_cpu.py). Import entk before "
        f"making JAX arrays, or start Python with XLA_FLAGS={FLAG}; {ENV_VAR}=0 silences this.",
        RuntimeWarning, stacklevel=4)
