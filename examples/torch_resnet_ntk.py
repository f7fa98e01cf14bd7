"""The empirical NTK of a torchvision ResNet-18 on a few CIFAR-sized inputs, with entk.

    python examples/torch_resnet_ntk.py            # 4 inputs of 3×32×32, 10 logits
    python examples/torch_resnet_ntk.py --n 8 --repeats 3
    entk compare examples/torch_resnet_ntk.py:resnet18 --input-shape 3,32,32 --batch 4 --vmap

What it shows:
1. `entk.ntk(module, x1, x2)`: torch tensors in, a torch tensor out (the model is exported to JAX
   once, then the kernel function is compiled once and reused);
2. `entk.from_torch(module, x)`: the same model as an `entk.Model` (parameters keyed by
   `named_parameters()` names) for the kernel functions;
3. the strategy comparison (`entk.compare`): FLOPs, peak memory, compile and run time of Jacobian
   contraction, NTK-vector products and structured derivatives, and which one `auto` picks.

Random initialisation (no download); BatchNorm runs on its running statistics (eval mode).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import torch
import torchvision

import entk
from entk.adapters.torch import to_jax


def resnet18(outputs: int = 10) -> torch.nn.Module:
    """A randomly initialised torchvision ResNet-18 with `outputs` logits, in eval mode: the SPEC
    `examples/torch_resnet_ntk.py:resnet18` for `entk compare` / `entk ntk`."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=outputs).eval()


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(first call incl. compilation, median of the following calls) in seconds."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, float(np.median(times)) if times else float("nan")


def _own_comparison(model: entk.Model, x1, x2, repeats: int) -> None:
    """Times every strategy the model supports (used when entk.compare is unavailable)."""
    print(f"{'strategy':<10}{'compile+run s':>15}{'run ms':>10}  max |Θ - Θ_jc| / max |Θ_jc|")
    reference = None
    for strategy in ("jc", "ntvp", "sd"):
        if strategy not in model.capabilities:
            continue
        try:
            fn = jax.jit(entk.empirical_ntk_fn(model, implementation=strategy))
            first, run = _timed(lambda: fn(x1, x2, model.params), repeats)
            kernel = np.asarray(fn(x1, x2, model.params))
        except (NotImplementedError, ImportError) as e:
            print(f"{strategy:<10}{'unavailable':>15}  ({e})")
            continue
        reference = kernel if reference is None else reference
        error = np.max(np.abs(kernel - reference)) / np.max(np.abs(reference))
        print(f"{strategy:<10}{first:>15.2f}{run * 1e3:>10.1f}  {error:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="number of inputs (x1 and x2 each)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per strategy")
    args = parser.parse_args()

    module = resnet18(outputs=10)
    x1 = torch.randn(args.n, 3, 32, 32)
    x2 = torch.randn(args.n, 3, 32, 32)

    start = time.perf_counter()
    kernel = entk.ntk(module, x1, x2)  # export + compile on first use
    first = time.perf_counter() - start
    start = time.perf_counter()
    kernel = entk.ntk(module, x1, x2)  # cached conversion and compiled kernel
    again = time.perf_counter() - start
    print(f"entk.ntk(resnet18, x1, x2): {type(kernel).__name__} {tuple(kernel.shape)} "
          f"{kernel.dtype}; first call {first:.1f} s (export + compile), then {again * 1e3:.0f} ms")
    print(kernel)

    model = entk.from_torch(module, x1)  # the cached conversion
    n_params = sum(int(np.prod(p.shape)) for p in model.params.values())
    print(f"\nfrom_torch: mode={model.info['mode']}, training={model.info['training']}, "
          f"{len(model.params)} parameter tensors ({n_params:,} weights), "
          f"{len(model.info['ops'])} distinct ATen ops")

    jx1, jx2 = to_jax(x1), to_jax(x2)
    print(f"\nStrategy comparison, {args.n}×{args.n} inputs of 3×32×32, trace over the 10 logits:")
    try:
        compare = entk.compare
    except (AttributeError, ImportError):
        compare = None
    if compare is None:
        print("(entk.compare is not available in this build: timing the strategies here)")
        _own_comparison(model, jx1, jx2, args.repeats)
    else:
        print(compare(model, jx1, jx2, repeats=args.repeats))


if __name__ == "__main__":
    main()
