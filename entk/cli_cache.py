"""`entk cache info` / `entk cache clear`: where entk keeps what it learns about this machine, and a reset.

entk keeps five caches, all under `$ENTK_CACHE_DIR` (default `~/.cache/entk`):

- *calibration*: the cost model's measured speed of this device (FLOP/s, bytes/s, per-op overhead),
  from which `auto` and `entk compare` predict times. Measured once (about a second) and reused; if
  it is wrong (e.g. measured while the machine was busy), clear it and it is measured again on next use.
- *compile-rate*: seconds XLA took per lowered operation of entk's kernel programs on this device
  (`entk/algorithms/compile_time.py`), from which a first call's compile time is predicted; a running
  average, learned again from the next compilations once cleared.
- *xla*: JAX's persistent compilation cache of the kernel programs (`entk/_compilation_cache.py`);
  clearing it only costs recompilation.
- *decisions*: `auto`'s stored picks per model and shapes (`entk/algorithms/decision_cache.py`);
  clearing it makes `auto` compare the strategies again.
- *programs*: PyTorch modules' exported programs (`entk/adapters/torch/program_cache.py`), so a new
  process skips torch.export; clearing it only costs exporting again.

The locations come from the modules that own each cache; nothing here builds a path of its own.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
from typing import Any

from entk.cli import CommandError, add_command

CACHES = ("calibration", "compile-rate", "xla", "decisions", "programs")

DESCRIPTION = ("entk keeps five caches under $ENTK_CACHE_DIR (default ~/.cache/entk): the cost "
               "model's calibration of this device, from which auto and `entk compare` predict "
               "times; how fast XLA compiles entk's programs there; JAX's compiled kernel programs; "
               "auto's stored strategy picks; and PyTorch modules' exported programs. `entk cache "
               "info` shows them, `entk cache clear` deletes them (each is rebuilt on next use).")

_WHAT = {
    "calibration": "the cost model's measured speed of this device (measured again on next use)",
    "compile-rate": "XLA's compile time per operation on this device (learned again from the next "
                    "compilations)",
    "xla": "compiled kernel programs (recompiled on next use)",
    "decisions": "auto's stored strategy picks (compared again on next use)",
    "programs": "PyTorch modules' exported programs (exported again on next use)",
}


def _facts() -> tuple[pathlib.Path, dict[str, pathlib.Path | None]]:
    """entk's cache directory and each cache's path (None: entk does not manage that cache now)."""
    from entk import _compilation_cache
    from entk.adapters import program_store
    from entk.algorithms import compile_time, decision_cache
    from entk.algorithms.device import cache_dir, calibration_path

    return cache_dir(), {"calibration": calibration_path(), "compile-rate": compile_time.path(),
                         "xla": _compilation_cache.directory(),
                         "decisions": decision_cache.directory(),
                         "programs": program_store.directory()}


def _files(path: pathlib.Path) -> list[pathlib.Path]:
    if path.is_file():
        return [path]
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _describe(path: pathlib.Path | None) -> str:
    if path is None:
        return ("off (ENTK_COMPILATION_CACHE / ENTK_PROGRAM_CACHE is off, or you set JAX's own "
                "cache dir)")
    files = _files(path)
    if not files:
        return f"{path}  (nothing stored yet)"
    size = _size(sum(f.stat().st_size for f in files))
    if path.is_file():
        return f"{path}  ({size})"
    return f"{path}  ({len(files)} file{'s' * (len(files) != 1)}, {size})"


def calibration_note() -> str:
    """One line for `entk compare`: where the calibration behind the predicted times lives."""
    _, paths = _facts()
    return (f"predicted times use the calibration in {paths['calibration']}; "
            f"`entk cache clear --calibration` measures it again")


def add_parser(subparsers: Any) -> None:
    """Adds `entk cache info` and `entk cache clear` to the `entk` command's subparsers."""
    p = add_command(subparsers, "cache", help="show or clear entk's caches (calibration, "
                    "compiled programs, auto's decisions, exported PyTorch programs)",
                    description=DESCRIPTION)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    info = add_command(actions, "info", help="print each cache's path and size",
                       description="Print where each of entk's caches lives and its size.")
    info.set_defaults(func=run_info)
    clear = add_command(actions, "clear", help="delete caches (say which)",
                        description="Delete some of entk's caches; each is rebuilt on next use.")
    for name in CACHES:
        clear.add_argument(f"--{name}", action="store_true", help=f"delete {_WHAT[name]}")
    clear.add_argument("--all", action="store_true", help="delete all five caches")
    clear.set_defaults(func=run_clear)


def run_info(args: argparse.Namespace) -> int:
    """Prints the cache directory, then each cache's path and size."""
    root, paths = _facts()
    print(f"entk's cache directory: {root} (set ENTK_CACHE_DIR to move it)")
    for name in CACHES:
        print(f"  {name:<12} {_describe(paths[name])}")
    return 0


def run_clear(args: argparse.Namespace) -> int:
    """Deletes the caches asked for; prints what was deleted."""
    chosen = [name for name in CACHES if args.all or getattr(args, name.replace("-", "_"))]
    if not chosen:
        raise CommandError("say what to clear: --calibration, --compile-rate, --xla, --decisions, "
                           "--programs or --all")
    _, paths = _facts()
    for name in chosen:
        path = paths[name]
        if path is None or not path.exists():
            print(f"{name}: nothing to clear")
            continue
        count = len(_files(path))
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        print(f"{name}: deleted {path} ({count} file{'s' * (count != 1)})")
    return 0
