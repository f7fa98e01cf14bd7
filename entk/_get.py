"""The `get=` argument of kernel and prediction functions (neural-tangents' convention), checked once.

`get` is `None`, one name (the value comes back alone), or a tuple of names (a namedtuple comes back).
"""

from __future__ import annotations

from typing import Sequence


def canonical_get(get: str | Sequence[str] | None, allowed: Sequence[str],
                  default: tuple[str, ...] | None,
                  noun: str = "") -> tuple[tuple[str, ...] | None, bool]:
    """`(names, single)`: `names` is `default` for `get=None`; `single` when `get` is a bare string.
    `noun` (e.g. "kernel entry") names what an unknown name was meant to be in the error.

    Raises a ValueError naming the offending entry for an empty tuple, an unknown name or a repeat.
    """
    if get is None:
        return default, False
    single = isinstance(get, str)
    names = (get,) if single else tuple(get)
    choices = ", ".join(repr(name) for name in allowed)
    what = f"{noun} " if noun else ""
    if not names:
        raise ValueError(f"get=() asks for nothing; use one of {choices}, a tuple of them, or None.")
    for name in names:
        if name not in allowed:
            raise ValueError(f"get={get!r}: unknown {what}{name!r}; valid names are {choices}, a "
                             f"tuple of them, or None.")
    if len(set(names)) != len(names):
        raise ValueError(f"get={get!r} names an entry twice.")
    return names, single
