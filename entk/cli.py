"""The `entk` command: `entk compare`, `entk ntk`, `entk spectrum`.

Run `entk --help` or `entk COMMAND --help`. Subcommands live in their own modules, each with
`add_parser(subparsers)` and `run(args)`; a subcommand whose module is missing is simply not offered.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

_SUBCOMMANDS = ("entk.cli_compare", "entk.cli_ntk", "entk.cli_spectrum")


# What a SPEC argument may name (see entk/spec.py), for the subcommands' descriptions.
SPEC_FORMS = ("SPEC is package.module:callable or file.py:callable returning an entk.Model, (f, params), "
              "a stax (init_fn, apply_fn, kernel_fn), (flax_module, variables), a torch.nn.Module or a "
              "Keras model.")


def add_kernel_options(parser: argparse.ArgumentParser) -> None:
    """`--trace/--full` and `--vmap`, shared by the subcommands that compute a kernel."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--trace", dest="trace", action="store_true", default=True,
                       help="average over the last output axis (default): kernel (N1, N2)")
    group.add_argument("--full", dest="trace", action="store_false",
                       help="full kernel (N1, N2, O, O)")
    parser.add_argument("--vmap", action="store_true",
                        help="vmap_axes=0: the model treats examples independently (faster)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entk", description="Empirical neural tangent kernels of JAX, PyTorch and Keras models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
