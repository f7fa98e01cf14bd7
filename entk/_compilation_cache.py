"""JAX's persistent compilation cache in entk's cache directory: each kernel program compiles once per
machine, not once per process.

Compiling an eNTK program takes seconds (structured derivatives of a ResNet-18: tens of seconds on a
CPU), and every new Python process would pay it again. JAX can keep compiled executables on disk, keyed
by the program text, compile options, device and JAX/XLA versions; entk turns that on, lazily, the first
time one of its kernel functions is called (never at `import entk`), in `$ENTK_CACHE_DIR/xla`
(default `~/.cache/entk/xla`, next to the cost model's calibration).

Settings, read once at that first call:

- `ENTK_COMPILATION_CACHE=0` (or `off`, `false`, `no`): leave JAX's cache alone (off unless the user
  turned it on);
- `ENTK_COMPILATION_CACHE=/some/dir`: cache there instead;
- a cache directory the user configured in JAX (`jax.config.update("jax_compilation_cache_dir", ...)`
  or `JAX_COMPILATION_CACHE_DIR`) is always kept, with the user's thresholds.

When entk sets the directory it also lowers JAX's thresholds that are still at their defaults (JAX
caches only programs that took over a second to compile, which would skip most of a small model's
programs) and bounds the directory to `MAX_SIZE_BYTES`, evicting the least recently used entries (when
the `filelock` package JAX needs for that is installed). JAX's cache is process-wide, so other programs
of the same process are cached there too.
"""

from __future__ import annotations

import os
import pathlib
import threading

import jax

ENV_VAR = "ENTK_COMPILATION_CACHE"
MAX_SIZE_BYTES = 4 << 30
"""Bound on the cache directory's size when entk configures it (least recently used entries go)."""

_OFF = frozenset({"0", "off", "false", "no"})
_ON = frozenset({"", "1", "on", "true", "yes"})
_JAX_DEFAULT_MIN_COMPILE_TIME_S = 1.0

_lock = threading.Lock()
_state: str | None = None  # None until the first call; then "entk", "user" or "off"


def enable() -> str:
    """Turns on the persistent compilation cache as described in the module docstring.

    Cheap and idempotent: call it from every kernel entry point before it compiles. Returns who owns
    the cache configuration: `"entk"` (entk set the directory), `"user"` (already configured, left as it
    was) or `"off"` (disabled by `ENTK_COMPILATION_CACHE`).
    """
    global _state
    if _state is not None:
        return _state
    with _lock:
        if _state is None:
            _state = _configure()
    return _state


def cache_dir() -> pathlib.Path | None:
    """The directory JAX's persistent compilation cache uses now (None: not enabled)."""
    path = jax.config.jax_compilation_cache_dir
    return pathlib.Path(path) if path else None


def directory() -> pathlib.Path | None:
    """The directory entk keeps JAX's compilation cache in, whether or not it is enabled yet in this
    process (`entk cache` shows and clears it); None when entk leaves JAX's cache alone
    (`ENTK_COMPILATION_CACHE` off, or a cache directory the user configured in JAX)."""
    if _state is not None:
        return cache_dir() if _state == "entk" else None
    return _planned_directory()


def _planned_directory() -> pathlib.Path | None:
    setting = os.environ.get(ENV_VAR, "").strip()
    if setting.lower() in _OFF or jax.config.jax_compilation_cache_dir:
        return None
    if setting.lower() in _ON:
        from entk.algorithms import device  # the one definition of entk's cache directory

        return device.cache_dir() / "xla"
    return pathlib.Path(setting).expanduser()


def _configure() -> str:
    setting = os.environ.get(ENV_VAR, "").strip()
    if setting.lower() in _OFF:
        return "off"
    if jax.config.jax_compilation_cache_dir:
        return "user"
    path = _planned_directory()
    path.mkdir(parents=True, exist_ok=True)
    if jax.config.jax_persistent_cache_min_compile_time_secs == _JAX_DEFAULT_MIN_COMPILE_TIME_S:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if jax.config.jax_compilation_cache_max_size == -1 and _has_filelock():
        jax.config.update("jax_compilation_cache_max_size", MAX_SIZE_BYTES)
    jax.config.update("jax_compilation_cache_dir", str(path))
    return "entk"


def _has_filelock() -> bool:
    try:
        import filelock  # noqa: F401  (JAX needs it to evict entries from a bounded cache)
    except ImportError:
        return False
    return True
