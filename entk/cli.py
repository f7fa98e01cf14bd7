"""The `entk` command: `entk compare`, `entk ntk`, `entk spectrum`, `entk cache`.

Run `entk --help` or `entk COMMAND --help`. Subcommands live in their own modules, each with
`add_parser(subparsers)` and `run(args)`; a subcommand whose module is missing is simply not offered.

Errors: argparse's usage errors exit with status 2 (argparse's message); any other error of a command
(bad SPEC, unusable input file, a model that cannot take the inputs, out of budget, a store holding
another kernel, ...) prints one line `entk COMMAND: error: ...` on stderr and exits with status 1, and
Ctrl-C exits with 130 after the command's own note. `--debug` (before or after COMMAND) shows the full
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Sequence

_SUBCOMMANDS = ("entk.cli_compare", "entk.cli_ntk", "entk.cli_spectrum", "entk.cli_cache")


# What a SPEC argument may name (see entk/spec.py), for the subcommands' descriptions.
SPEC_FORMS = ("SPEC is package.module:callable or file.py:callable returning an entk.Model, (f, params), "
              "a stax (init_fn, apply_fn, kernel_fn), (flax_module, variables), a torch.nn.Module or a "
              "Keras model.")
SPEC_HELP = "the model: package.module:callable or path/to/file.py:callable (see the description)"


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

    from entk.adapters._startup_logs import quiet_tensorflow_start
    from entk.algorithms.cost import error_summary
    from entk.spec import load_model

    sample = np.asarray(x[:2])
    what = f"{where} (examples of shape {tuple(x.shape[1:])}, {x.dtype})"
    try:
        # The SPEC's module may import TensorFlow (Keras): its start-up notices are filtered.
        with quiet_tensorflow_start():
            model = load_model(spec, sample, outputs=outputs)
    except Exception as e:  # noqa: BLE001 - reported in one line, with the input it was given
        raise CommandError(f"cannot build the model {spec} for {what}: {error_summary(e)}") from e
    try:
        jax.eval_shape(model.apply, model.params, sample)
    except Exception as e:  # noqa: BLE001 - the model's own shape / dtype error
        raise CommandError(f"the model {spec} cannot take {what}: {error_summary(e)}") from e
    return model


def _debug_parent() -> argparse.ArgumentParser:
    """`--debug`, accepted by the main parser and by every subcommand (so before or after COMMAND)."""
    parent = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand that does not see the flag keeps the main parser's value.
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, show the full Python traceback instead of one line")
    return parent


def add_command(subparsers: Any, name: str, *, help: str, description: str
                ) -> argparse.ArgumentParser:
    """A subcommand's parser, with the options every subcommand shares (`--debug`)."""
    return subparsers.add_parser(name, help=help, description=description,
                                 parents=[_debug_parent()])


def positive_int(text: str) -> int:
    """argparse `type=` for counts (batch sizes, repeats, ...): a positive int, else a usage error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def strategy_names() -> list[str]:
    """The `--implementation` choices: the short names of `entk.Strategy` (the one list)."""
    from entk.algorithms import short_names

    return list(short_names())


def add_kernel_options(parser: argparse.ArgumentParser, *, dtype_default: str | None = None,
                       implementation: bool = True) -> None:
    """The kernel options shared by `ntk`, `compare` and `spectrum`: `--trace/--full`,
    `--vmap/--whole-batch`, `--dtype`, `--outputs` and (where one strategy is run) `--implementation`.

    Read them back with `kernel_kwargs(args)`.
    """
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--trace", dest="trace", action="store_true", default=True,
                       help="average over the last output axis (default): kernel (N1, N2)")
    group.add_argument("--full", dest="trace", action="store_false",
                       help="full kernel (N1, N2, O, O), no averaging over outputs")
    vmap = parser.add_mutually_exclusive_group()
    vmap.add_argument("--vmap", dest="vmap", action="store_const", const=0, default="auto",
                      help="vmap_axes=0: the model treats examples independently (verified; faster). "
                           "Default: vmap_axes='auto', per-example wherever entk proves it right")
    vmap.add_argument("--whole-batch", dest="vmap", action="store_const", const=None,
                      help="vmap_axes=None: always apply the model to whole batches")
    if dtype_default is None:
        dtype_help = "cast floating-point inputs to this dtype (default: keep the file's dtype)"
    else:
        dtype_help = f"dtype of the random inputs (default {dtype_default})"
    parser.add_argument("--dtype", default=dtype_default, choices=["float32", "float64"],
                        help=dtype_help + "; float64 turns on jax_enable_x64")
    parser.add_argument("--outputs", type=positive_int, default=None, metavar="N",
                        help="passed as outputs=N to SPEC's callable, if it accepts it")
    if implementation:
        from entk.algorithms import Strategy

        auto = Strategy.AUTO.short_name
        parser.add_argument("--implementation", default=auto, choices=strategy_names(),
                            help=f"eNTK strategy (default {auto}: the one predicted fastest)")


def kernel_kwargs(args: argparse.Namespace) -> dict:
    """The `empirical_ntk_fn` / `entk.ntk` keyword arguments of `add_kernel_options`' options.

    Also turns on `jax_enable_x64` for `--dtype float64` (before any array is made).
    """
    if args.dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    kwargs = {"trace_axes": (-1,) if args.trace else (), "vmap_axes": args.vmap}
    if getattr(args, "implementation", None) is not None:
        kwargs["implementation"] = args.implementation
    return kwargs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entk", description="Empirical neural tangent kernels of JAX, PyTorch and Keras models.",
        parents=[_debug_parent()])
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


def one_line(error: BaseException) -> str:
    """`error` as one line: its message's lines joined (with its type unless it is a CommandError)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if isinstance(error, CommandError):
        return text
    name = type(error).__name__
    return f"{name}: {text}" if text else name


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `entk ARGS` and returns the exit status: 0 done, 1 error, 2 usage error, 130 Ctrl-C."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse printed usage and its message (or --help)
        return exit_.code if isinstance(exit_.code, int) else 2
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"entk {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line per error; --debug shows the traceback
        if debug:
            raise
        hint = "" if isinstance(error, CommandError) else " (entk --debug ... shows the traceback)"
        print(f"entk {args.command}: error: {one_line(error)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from entk.cli import main as entk_main  # the module's own classes, not __main__'s copies

    sys.exit(entk_main())
