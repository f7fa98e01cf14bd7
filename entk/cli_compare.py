"""`entk compare SPEC`: every strategy on a model, with FLOPs, memory, time and auto's pick."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

from entk.cli import (SPEC_FORMS, SPEC_HELP, add_command, add_kernel_options, kernel_kwargs,
                      positive_int)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--input-shape {text!r}: use comma-separated positive "
                                         f"ints, e.g. 3,32,32")
    return shape


def add_parser(subparsers) -> None:
    """Adds `entk compare` to the `entk` command's subparsers."""
    p = add_command(
        subparsers, "compare", help="compare eNTK strategies (FLOPs, memory, time) on a model",
        description="Compile (and run) every available eNTK strategy on random inputs for the model "
                    "SPEC names, print a table, and say which one `auto` picks. The predicted "
                    "times come from a calibration of this machine cached on disk (see `entk cache "
                    "info`; `entk cache clear --calibration` measures it again). " + SPEC_FORMS)
    p.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    p.add_argument("--input-shape", type=_shape, required=True, metavar="D1,D2,...",
                   help="shape of one example, e.g. 3,32,32 (torch layout for torch models)")
    p.add_argument("--batch", type=positive_int, default=8, metavar="N",
                   help="examples in x1 (default 8)")
    p.add_argument("--batch2", type=positive_int, default=None, metavar="N",
                   help="examples in x2 (default: x2 = x1)")
    add_kernel_options(p, dtype_default="float32", implementation=False)
    p.add_argument("--no-measure", dest="measure", action="store_false",
                   help="compile only; do not time runs")
    p.add_argument("--repeats", type=positive_int, default=3, metavar="N",
                   help="timed runs per strategy; the median is reported (default 3)")
    p.add_argument("--memory-budget-mb", type=float, default=None, metavar="MB",
                   help="memory a strategy may use; those predicted above it are not run "
                        "(default: half the free device memory)")
    p.add_argument("--plot", metavar="PATH",
                   help="save a PNG: predicted vs measured time, FLOPs and peak memory per strategy")
    p.add_argument("--json", metavar="PATH", help="save the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Builds the model, runs `entk.compare` on random inputs, prints the report."""
    ntk_kwargs = kernel_kwargs(args)  # before any array: --dtype float64 turns on x64
    import jax

    from entk.algorithms.compare import compare
    from entk.cli import build_model
    from entk.cli_cache import calibration_note

    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((args.batch,) + args.input_shape).astype(args.dtype)
    x2 = None if args.batch2 is None else \
        rng.standard_normal((args.batch2,) + args.input_shape).astype(args.dtype)
    shape = ",".join(str(n) for n in args.input_shape)
    model = build_model(args.spec, x1, f"--input-shape {shape}", outputs=args.outputs)
    budget = None if args.memory_budget_mb is None else int(args.memory_budget_mb * 2**20)
    report = compare(model, jax.numpy.asarray(x1), None if x2 is None else jax.numpy.asarray(x2),
                     measure=args.measure, repeats=args.repeats, memory_budget=budget, **ntk_kwargs)
    report = dataclasses.replace(report, model=f"{args.spec} ({report.model})")  # titles name SPEC
    print(report)
    print(calibration_note())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report.to_dict(), fh, indent=2)
    if args.plot:
        report.plot(args.plot)
    return 0
