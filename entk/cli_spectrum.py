"""`entk spectrum SPEC --input FILE.npy [--top K] [--plot PATH]`: a model's kernel spectrum in one command.

Prints the top eigenvalues, the condition number, the trace and the effective rank of the empirical
NTK of the model `SPEC` on the inputs in `FILE.npy` (all pairs of its examples), and optionally plots
the spectrum. `entk/cli.py` wires this in with `add_parser(subparsers)`; `run(args)` does the work.

`SPEC` is `package.module:callable` or `path/to/file.py:callable`; the callable takes no arguments and
returns a model: an `entk.Model`, a `torch.nn.Module`, a Keras model, a `(flax_module, variables)`
pair, or a `(f, params)` pair for a plain JAX function `f(params, x)`.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the `spectrum` sub-command to an `argparse` sub-parsers object; returns its parser."""
    parser = subparsers.add_parser(
        "spectrum", help="eigenvalues, condition number and trace of a model's NTK on some inputs",
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", metavar="SPEC",
                        help="package.module:callable or path/to/file.py:callable returning the model")
    parser.add_argument("--input", required=True, metavar="FILE.npy",
                        help="inputs, (N, ...) in the model's own layout, saved with numpy.save")
    parser.add_argument("--top", type=int, default=10, metavar="K",
                        help="how many of the largest eigenvalues to print (default 10)")
    parser.add_argument("--plot", metavar="PATH", help="save a plot of the whole spectrum (log scale)")
    parser.add_argument("--full", action="store_true",
                        help="the full kernel over (example, output) pairs (trace_axes=()) instead "
                             "of the output-averaged one")
    parser.add_argument("--implementation", default="auto", choices=("auto", "jc", "ntvp", "sd"),
                        help="kernel strategy (default auto)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Computes and prints the spectrum summary; returns the process exit code (0 on success)."""
    from entk import metrics
    from entk.cli import build_model, load_examples
    from entk.empirical import ntk

    if args.top < 1:
        raise SystemExit(f"entk spectrum: --top {args.top}; ask for at least one eigenvalue.")
    x = load_examples(args.input, "--input")
    model = build_model(args.spec, x, f"--input {args.input}")
    kwargs = {"implementation": args.implementation}
    if args.full:
        kwargs["trace_axes"] = ()
    kernel = np.asarray(ntk(model, x, **kwargs))
    values = metrics.spectrum(kernel)
    top = values[: args.top]
    size = values.shape[0]
    kind = "full, (example, output) pairs" if args.full else "traced over outputs"
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
    except ImportError as e:
        raise SystemExit("entk spectrum --plot needs matplotlib (pip install matplotlib).") from e
    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = fig.subplots()
    positive = values > 0
    index = np.arange(1, values.shape[0] + 1)
    ax.semilogy(index[positive], values[positive], marker="o", markersize=3)
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title, fontsize="medium")
    fig.savefig(path, dpi=120)
