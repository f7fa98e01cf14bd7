"""Where export mode keeps the programs it exported (`torch/program_cache.py`), without importing torch.

`$ENTK_CACHE_DIR/torch-programs` by default; `ENTK_PROGRAM_CACHE=0` (or `off`, `false`, `no`) turns
the cache off, `ENTK_PROGRAM_CACHE=/some/dir` moves it. `entk cache info` / `entk cache clear
--programs` read the location from here.
"""

from __future__ import annotations

import os
import pathlib

ENV_VAR = "ENTK_PROGRAM_CACHE"
_OFF = ("0", "off", "false", "no")


def directory() -> pathlib.Path | None:
    """The directory of stored programs, or None when `ENTK_PROGRAM_CACHE` turns the cache off."""
    setting = os.environ.get(ENV_VAR, "").strip()
    if setting.lower() in _OFF:
        return None
    if setting:
        return pathlib.Path(setting)
    from entk.algorithms.device import cache_dir  # the one definition of entk's cache directory

    return cache_dir() / "torch-programs"
