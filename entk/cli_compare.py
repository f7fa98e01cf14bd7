"""`entk compare SPEC`: every strategy on a model, with FLOPs, memory, time and auto's pick."""

from __future__ import annotations

import argparse
import json

import numpy as np

from entk.cli import SPEC_FORMS, add_kernel_options


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape {text!r}: use comma-separated ints, "
                                         f"e.g. 3,32,32") from None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="compare eNTK strategies (FLOPs, memory, time) on a model",
        description="Compile (and run) every available eNTK strategy on random inputs for the model "
                    "SPEC names, print a table, and say which one `auto` picks. " + SPEC_FORMS)
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--input-shape", type=_shape, required=True,
                   help="shape of one example, e.g. 3,32,32 (torch layout for torch models)")
    p.add_argument("--batch", type=int, default=8, help="examples in x1 (default 8)")
    p.add_argument("--batch2", type=int, default=None, help="examples in x2 (default: x2 = x1)")
    p.add_argument("--outputs", type=int, default=None,
                   help="passed as outputs=N to SPEC's callable, if it accepts it")
    add_kernel_options(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--no-measure", dest="measure", action="store_false",
                   help="compile only; do not time runs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-budget-mb", type=float, default=None)
    p.add_argument("--plot", metavar="PATH", help="save a PNG of time and memory per strategy")
    p.add_argument("--json", metavar="PATH", help="save the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    from entk.algorithms.compare import compare
    from entk.cli import build_model

    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((args.batch,) + args.input_shape).astype(args.dtype)
    x2 = None if args.batch2 is None else \
        rng.standard_normal((args.batch2,) + args.input_shape).astype(args.dtype)
    shape = ",".join(str(n) for n in args.input_shape)
    model = build_model(args.spec, x1, f"--input-shape {shape}", outputs=args.outputs)
    budget = None if args.memory_budget_mb is None else int(args.memory_budget_mb * 2**20)
    report = compare(model, jax.numpy.asarray(x1), None if x2 is None else jax.numpy.asarray(x2),
                     measure=args.measure, repeats=args.repeats, memory_budget=budget,
                     trace_axes=(-1,) if args.trace else (), vmap_axes=args.vmap)
    print(report)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report.to_dict(), fh, indent=2)
    if args.plot:
        report.plot(args.plot)
    return 0
