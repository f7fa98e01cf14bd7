"""`entk spectrum SPEC --input FILE.npy [--top K] [--plot PATH]`: a model's kernel spectrum in one command.

Prints the top eigenvalues, the condition number, the trace and the effective rank of the empirical
NTK of the model `SPEC` on the inputs in `FILE.npy` (all pairs of its examples), and optionally plots
the spectrum.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from entk.cli import (SPEC_FORMS, SPEC_HELP, CommandError, add_command, add_kernel_options,
                      kernel_kwargs, positive_int)

__all__ = ["add_parser", "run"]

DESCRIPTION = ("Print the top eigenvalues, the condition number, the trace and the effective rank of "
               "the empirical NTK of the model SPEC names on the examples in FILE.npy (all pairs of "
               "its examples), and optionally plot the whole spectrum. " + SPEC_FORMS)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds `entk spectrum` to the `entk` command's subparsers; returns its parser."""
    parser = add_command(
        subparsers, "spectrum",
        help="eigenvalues, condition number and trace of a model's NTK on some inputs",
        description=DESCRIPTION)
    parser.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    parser.add_argument("--input", required=True, metavar="FILE.npy",
                        help="inputs, (N, ...) in the model's own layout, saved with numpy.save")
    parser.add_argument("--top", type=positive_int, default=10, metavar="K",
                        help="how many of the largest eigenvalues to print (default 10)")
    parser.add_argument("--plot", metavar="PATH", help="save a plot of the whole spectrum (log scale)")
    add_kernel_options(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Computes and prints the spectrum summary; returns the process exit code (0 on success)."""
    ntk_kwargs = kernel_kwargs(args)  # before any array: --dtype float64 turns on x64
    from entk import metrics
    from entk.cli import build_model, load_examples
    from entk.empirical import ntk

    x = load_examples(args.input, "--input", dtype=args.dtype)
    model = build_model(args.spec, x, f"--input {args.input}", outputs=args.outputs)
    kernel = np.asarray(ntk(model, x, **ntk_kwargs))
    values = metrics.spectrum(kernel)
    top = values[: args.top]
    size = values.shape[0]
    kind = "traced over outputs" if args.trace else "full, (example, output) pairs"
    print(f"NTK of {args.spec} on {args.input}: {x.shape[0]} examples, {size}x{size} matrix ({kind})")
    print(f"top {len(top)} eigenvalues:")
    for i, v in enumerate(top, 1):
        print(f"  {i:>4d}  {v: .6e}")
    cond = values[0] / values[-1] if values[-1] > 0 else float("inf")
    print(f"condition number: {cond:.6e}")
    print(f"trace: {float(np.trace(metrics.as_matrix(kernel))):.6e}")
    print(f"effective rank: {metrics._entropy_rank(values):.4f} (entropy), "
          f"{metrics.effective_rank(kernel, method='participation'):.4f} (participation ratio)")
    if args.plot:
        _plot(values, args.plot, f"NTK spectrum: {args.spec}")
        print(f"plot saved to {args.plot}")
    return 0


def _plot(values: np.ndarray, path: str, title: str) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise CommandError("--plot needs matplotlib (pip install matplotlib)") from None
    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = fig.subplots()
    positive = values > 0
    index = np.arange(1, values.shape[0] + 1)
    ax.semilogy(index[positive], values[positive], marker="o", markersize=3)
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title, fontsize="medium")
    fig.savefig(path, dpi=120)
