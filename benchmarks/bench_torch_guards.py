"""What `entk.ntk(module, ...)` pays on every call to never be stale, on a ResNet-18.

Every call of `entk.ntk` on a torch module (1) takes the guard snapshot of everything the export baked
in (`entk/adapters/torch/guards.py`) and compares it with the cached conversion's, (2) reads the
current parameter / buffer / constant values without copying, and (3) checks whether the module
holds float64 tensors (to compute in 64 bits). This script times each step apart, plus the
alternatives they replace (a copy of every tensor, one DLPack import per tensor), on torchvision's
ResNet-18 (random init, eval mode, float32, CPU, 3×32×32 inputs).

Usage:
    python benchmarks/bench_torch_guards.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()

    import torch
    import torchvision

    import entk.adapters.torch as adapter
    from entk.adapters.torch import guards
    from entk.adapters.torch.graph_translation import tensor_to_jax

    module = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    converted = adapter._conversion(module, x, "auto", False, False, 0)  # exports once
    n_tensors = len(converted.tensors)
    snapshot = guards.snapshot(module)
    rows = [
        ("guard: snapshot + compare", lambda: guards.snapshot(module) == snapshot, args.repeats),
        ("guard + cache lookup (_conversion)",
         lambda: adapter._conversion(module, x, "auto", False, False, 0), args.repeats),
        ("read values, no copy (entk.ntk)", lambda: converted.current(copy=False), args.repeats),
        ("has_float64", lambda: adapter.has_float64(module), args.repeats),
        ("for comparison: one DLPack import per tensor",
         lambda: [tensor_to_jax(t, copy=False) for _, _, t in converted.tensors], 20),
        ("for comparison: copy every tensor (from_torch)", lambda: converted.current(copy=True), 5),
    ]
    print(f"ResNet-18: {sum(1 for _ in module.modules())} modules, {n_tensors} tensors read per "
          f"call, guard record of {len(snapshot)} entries")
    for label, fn, repeats in rows:
        print(f"  {label:48s} {_median_ms(fn, repeats):8.3f} ms (median of {repeats})")


if __name__ == "__main__":
    main()
