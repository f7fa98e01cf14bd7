"""Per-record cost of `entk.monitor.NTKMonitor` against one kernel evaluation.

    python benchmarks/bench_monitor.py [--probes 32] [--width 32] [--repeats 7]

A small PyTorch CNN (float32) is trained with SGD; between timings one optimizer step changes its
weights, as in a real training loop. Timed (median over `--repeats`, after one warm-up each):

- kernel:        the monitor's compiled kernel function on already-converted parameters (one kernel
                 evaluation, result on the host);
- ntk (cached):  `entk.ntk(module, x)` with unchanged weights (adapter cache hit, compiled kernel
                 reused): a single kernel evaluation through the public API;
- record:        `monitor.record(module)`: read `named_parameters()`, one kernel evaluation, and every
                 metric (distances, alignments, trace, eigenvalues, condition number, effective rank);
- ntk (fresh):   `entk.ntk(module, x)` after the weights changed: what a hand-written loop calling
                 `entk.ntk` each record pays (the adapter refreshes the model, the kernel is re-traced
                 and recompiled).

The first three are timed in turn within each repeat (machine-load swings hit them alike); then
kernel and record again with one SGD step before each repeat. The target is record ≤ 1.2× a single
kernel evaluation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import entk  # noqa: E402
from entk.monitor import NTKMonitor  # noqa: E402


def cnn(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(width, width, 3, padding=1, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 10))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict, repeats: int, between=None) -> dict:
    """Median seconds of each function, timed in turn within each repeat (so machine-load swings hit
    all of them alike), after one warm-up call each; `between` runs before each repeat, untimed."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        if between is not None:
            between()
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=16, help="probe-set size N")
    parser.add_argument("--width", type=int, default=16, help="CNN channels")
    parser.add_argument("--size", type=int, default=8, help="image side")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (training steps only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    net = cnn(args.width)
    probe = torch.randn(args.probes, 3, args.size, args.size)
    data, labels = torch.randn(64, 3, args.size, args.size), torch.randint(0, 10, (64,))
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)

    def train_step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(data), labels).backward()
        optimizer.step()

    start = time.perf_counter()
    monitor = NTKMonitor(net, probe, labels[: args.probes], every=1)
    setup = time.perf_counter() - start
    x = entk.adapters.torch.to_jax(probe)

    def kernel() -> None:
        params, state = monitor.model.params, monitor.model.state
        np.asarray(monitor._kernel_fn(x, params, state))

    # Weights unchanged between calls: entk.ntk hits its caches, so all three are comparable.
    results = interleaved({"kernel": kernel, "ntk (cached)": lambda: entk.ntk(net, probe).numpy(),
                           "record": lambda: monitor.record(net)}, args.repeats)
    # One SGD step before each repeat, as in training (entk.ntk would recompile here: see below).
    trained = interleaved({"kernel": kernel, "record": lambda: monitor.record(net)}, args.repeats,
                          between=train_step)
    results["record (training)"] = trained["record"]
    results["kernel (training)"] = trained["kernel"]
    fresh = []
    for _ in range(max(2, args.repeats // 5)):
        train_step()
        fresh.append(timed(lambda: entk.ntk(net, probe).numpy()))
    results["ntk (fresh)"] = statistics.median(fresh)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"CNN width {args.width}, {n_params} parameters, {args.probes} probes of 3x{args.size}x"
          f"{args.size}, traced kernel {args.probes}x{args.probes}; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}; monitor setup (export + compile + first record) {setup:.2f} s")
    floor = results["kernel"]
    for name, seconds in results.items():
        print(f"  {name:<18s} {seconds * 1e3:10.2f} ms   {seconds / floor:6.2f}x kernel")
    for label, num, den in [("record / kernel", "record", "kernel"),
                            ("record / entk.ntk (cached)", "record", "ntk (cached)"),
                            ("record / kernel, training", "record (training)", "kernel (training)")]:
        ratio = results[num] / results[den]
        print(f"{label:<28s} = {ratio:.3f} (target <= 1.2): {'OK' if ratio <= 1.2 else 'ABOVE TARGET'}")


if __name__ == "__main__":
    main()
