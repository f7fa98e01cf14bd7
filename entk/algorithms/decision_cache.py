"""`"auto"`'s decisions kept on disk, so a new process on the same model and shapes skips the contest.

Choosing a strategy lowers every candidate (seconds on a ResNet); the choice depends only on the
program, the shapes, the kernel settings, the device and the memory budget. A decision is stored under
a SHA-256 of the model's jaxpr (shapes and dtypes included, memory addresses removed), the kernel
settings, the candidates, the device, and the JAX and entk versions, in `$ENTK_CACHE_DIR/decisions/`
(beside the calibration; `ENTK_CACHE_DIR` defaults to `~/.cache/entk`).

It is a speed-up only, never a change of answer: every strategy computes the same kernel. It is used
only while the stored pick still fits the current memory budget, and, where a faster strategy was
ruled out by memory, only under a budget no larger than the one it was decided with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
from typing import Any, Callable

import jax

from entk.algorithms import Strategy

PyTree = Any

_VERSION = 1
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


@dataclasses.dataclass(frozen=True)
class Decision:
    """A stored pick: the strategy, its peak memory, the budget, and whether memory ruled out a
    strategy predicted faster."""

    strategy: str
    peak_bytes: float
    budget: int
    memory_limited: bool

    def usable(self, budget: int) -> bool:
        return self.peak_bytes <= budget and (not self.memory_limited or budget <= self.budget)


def fingerprint(program: Callable[..., Any], args: tuple, settings: str) -> str | None:
    """The key of a decision: `program(*args)`'s jaxpr (args may be ShapeDtypeStructs) and `settings`.

    None when the program cannot be traced here (the decision is then made as usual).
    """
    try:
        text = str(jax.make_jaxpr(program)(*args))
    except Exception:  # noqa: BLE001 - no key: decide as usual, where the real error surfaces
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        entk_version = version("entk")
    except PackageNotFoundError:
        entk_version = "unknown"
    body = "\n".join([f"v{_VERSION}", jax.__version__, entk_version, settings,
                      _ADDRESS.sub("0x", text)])
    return hashlib.sha256(body.encode()).hexdigest()


def directory() -> pathlib.Path:
    """Where decisions are stored: `$ENTK_CACHE_DIR/decisions` (default `~/.cache/entk/decisions`)."""
    from entk.algorithms.device import cache_dir  # the one definition of entk's cache directory

    return cache_dir() / "decisions"


def load(directory: Any, key: str | None, budget: int) -> Strategy | None:
    """The stored strategy for `key`, if there is one and it is usable under `budget`."""
    if key is None:
        return None
    try:
        decision = Decision(**json.loads((directory / f"{key}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return Strategy.parse(decision.strategy) if decision.usable(budget) else None


def store(directory: Any, key: str | None, decision: Decision) -> None:
    """Writes `decision` atomically (a read-only cache directory only costs the next process time)."""
    if key is None:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"{key}.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(decision)))
        tmp.replace(directory / f"{key}.json")
    except OSError:
        pass
