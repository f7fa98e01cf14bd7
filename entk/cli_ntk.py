"""`entk ntk SPEC --input X.npy [--input2 X2.npy] --store PATH [--tile N]`: an eNTK into a store.

The kernel is computed tile by tile with `entk.compute_kernel` into a zarr store, with a progress bar;
rerunning the same command after an interruption computes only the missing tiles, and a store holding
another kernel is refused. Read the result with `zarr.open_group(PATH)["kernel"]` (or
`numpy.asarray` of it). Without --input2 a traced kernel is symmetric: only the tiles on and above
the diagonal are computed, the others are their transposes. Under `jax.distributed` (one command per
process, all with the same store) the processes share the tiles.

Also runnable as `python -m entk.cli_ntk ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from entk.cli import (SPEC_FORMS, SPEC_HELP, CommandError, add_command, add_kernel_options,
                      build_model, kernel_kwargs, load_examples)


def _tile(text: str):
    if text == "auto":
        return "auto"
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--tile {text!r}: use 'auto', N, or ROWS,COLS "
                                         f"(positive ints).")
    return sizes[0] if len(sizes) == 1 else sizes


def add_parser(subparsers) -> None:
    """Adds `entk ntk` to the `entk` command's subparsers."""
    p = add_command(
        subparsers, "ntk", help="compute a model's empirical NTK into a resumable on-disk store",
        description="Compute the empirical NTK of the model SPEC names on the examples of --input "
                    "(and --input2) tile by tile into a zarr store, with progress. Rerunning the "
                    "command resumes: finished tiles are skipped. " + SPEC_FORMS)
    p.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    p.add_argument("--input", required=True, metavar="FILE.npy",
                   help="x1: examples on axis 0 (torch layout for torch models)")
    p.add_argument("--input2", metavar="FILE.npy", help="x2 (default: x2 = x1)")
    p.add_argument("--store", required=True, metavar="PATH", help="zarr store directory")
    p.add_argument("--tile", type=_tile, default="auto",
                   help="examples per tile: N, ROWS,COLS, or auto (default: from the memory budget; "
                        "a resumed store keeps its own)")
    add_kernel_options(p)
    p.add_argument("--memory-budget-mb", type=float, default=None, metavar="MB",
                   help="memory per device for --tile auto (default: half the free memory)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Computes (or resumes) the kernel; prints a one-line JSON summary on stdout."""
    ntk_kwargs = kernel_kwargs(args)  # before any array: --dtype float64 turns on x64
    import jax
    import numpy as np

    import entk

    x1 = load_examples(args.input, "--input", dtype=args.dtype, mmap=True)
    x2 = None if args.input2 is None else load_examples(args.input2, "--input2", dtype=args.dtype,
                                                         mmap=True)
    if x2 is not None and x2.shape[1:] != x1.shape[1:]:
        raise CommandError(f"--input2 {args.input2}: its examples have shape {x2.shape[1:]}, those "
                           f"of --input {args.input} {x1.shape[1:]}; both sides need the same")
    model = build_model(args.spec, x1, f"--input {args.input}", outputs=args.outputs)
    ntk_fn = entk.empirical_ntk_fn(model, **ntk_kwargs)
    budget = None if args.memory_budget_mb is None else int(args.memory_budget_mb * 2 ** 20)
    # The NTK of x1 with itself is symmetric; when it is (N, N) only half the tiles are computed.
    outputs = jax.eval_shape(model.apply, model.params, np.asarray(x1[:2]))
    symmetric = x2 is None and args.trace and all(
        len(leaf.shape) == 2 for leaf in jax.tree_util.tree_leaves(outputs))
    start = time.perf_counter()
    kernel = entk.compute_kernel(ntk_fn, x1, x2, model.params, store=args.store, tile=args.tile,
                                 progress=args.progress, memory_budget=budget, symmetric=symmetric)
    leaves = jax.tree_util.tree_leaves(kernel)
    print(json.dumps({"store": args.store, "shape": [list(k.shape) for k in leaves],
                      "chunks": [list(k.chunks) for k in leaves], "dtype": str(leaves[0].dtype),
                      "seconds": round(time.perf_counter() - start, 3)}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m entk.cli_ntk ARGS` is `entk ntk ARGS`."""
    from entk.cli import main as entk_main

    return entk_main(["ntk", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
