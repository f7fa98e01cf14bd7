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


class CommandError(ValueError):
    """A problem with a command's inputs; `main` prints it as one line on stderr and exits with 1."""


def load_examples(path: str, option: str, *, dtype: str | None = None, mmap: bool = False):
    """The examples in the `.npy` file `path` (axis 0), checked to be usable as a model input.

    Args:
      path: the file; `option`: the command-line option that named it (for messages).
      dtype: cast floating-point arrays to this dtype; mmap: memory-map the file instead of reading.

    Raises:
      CommandError naming the file and the problem: unreadable, not an array of numbers, no
      examples, or NaN / infinite values (a NaN input gives a NaN kernel, never a useful one).
    """
    import numpy as np

    from entk.algorithms.cost import error_summary

    where = f"{option} {path}"
    try:
        x = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CommandError(f"{where}: cannot be read as a .npy array ({error_summary(e)})") from None
    if not isinstance(x, np.ndarray):
        raise CommandError(f"{where}: is a .npz archive, not one array; save the examples with "
                           f"numpy.save")
    if x.ndim == 0:
        raise CommandError(f"{where}: holds a scalar; the examples go on axis 0, shape (N, ...)")
    if not np.issubdtype(x.dtype, np.number):
        raise CommandError(f"{where}: has dtype {x.dtype}; a model input needs numbers (floating "
                           f"point or integer)")
    if x.shape[0] == 0:
        raise CommandError(f"{where}: holds no examples (shape {x.shape})")
    if dtype is not None and np.issubdtype(x.dtype, np.floating):
        x = x.astype(dtype)
    if np.issubdtype(x.dtype, np.inexact):
        rows = max(1, (1 << 24) // max(1, x[0].size))  # check a few MB at a time (x may be mapped)
        bad, first = 0, None
        for start in range(0, x.shape[0], rows):
            wrong = ~np.isfinite(x[start:start + rows])
            if wrong.any():
                bad += int(wrong.sum())
                if first is None:
                    first = start + int(np.argwhere(wrong)[0][0])
        if bad:
            raise CommandError(f"{where}: holds {bad} NaN or infinite value(s) (the first in example "
                               f"{first}{'' if dtype is None else f' after the cast to {dtype}'}); "
                               f"the kernel would be NaN. Remove or fix those examples")
    return x


def build_model(spec: str, x, where: str, *, outputs: int | None = None):
    """`entk.spec.load_model(spec, x)`, then one shape-only forward pass on two examples of `x`.

    Raises:
      CommandError naming the input file, its example shape and the model's own error (e.g. inputs
      of the wrong width for the model), instead of a long traceback from inside the model.
    """
    import jax
    import numpy as np

    from entk.algorithms.cost import error_summary
    from entk.spec import load_model

    sample = np.asarray(x[:2])
    what = f"{where} (examples of shape {tuple(x.shape[1:])}, {x.dtype})"
    try:
        model = load_model(spec, sample, outputs=outputs)
    except Exception as e:  # noqa: BLE001 - reported in one line, with the input it was given
        raise CommandError(f"cannot build the model {spec} for {what}: {error_summary(e)}") from e
    try:
        jax.eval_shape(model.apply, model.params, sample)
    except Exception as e:  # noqa: BLE001 - the model's own shape / dtype error
        raise CommandError(f"the model {spec} cannot take {what}: {error_summary(e)}") from e
    return model


def add_kernel_options(parser: argparse.ArgumentParser) -> None:
    """`--trace/--full` and `--vmap/--whole-batch`, shared by the subcommands that compute a kernel."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--trace", dest="trace", action="store_true", default=True,
                       help="average over the last output axis (default): kernel (N1, N2)")
    group.add_argument("--full", dest="trace", action="store_false",
                       help="full kernel (N1, N2, O, O)")
    vmap = parser.add_mutually_exclusive_group()
    vmap.add_argument("--vmap", dest="vmap", action="store_const", const=0, default="auto",
                      help="vmap_axes=0: the model treats examples independently (verified; faster). "
                           "Default: vmap_axes='auto', per-example wherever entk proves it right")
    vmap.add_argument("--whole-batch", dest="vmap", action="store_const", const=None,
                      help="vmap_axes=None: always apply the model to whole batches")


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
    try:
        return int(args.func(args) or 0)
    except CommandError as error:
        print(f"entk {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
