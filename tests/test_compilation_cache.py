"""entk's kernel programs are compiled once per machine: a fresh process finds them in JAX's persistent
compilation cache, which entk puts in `$ENTK_CACHE_DIR/xla` at the first kernel call.

A fresh process is the point here, so each case runs a small worker in a subprocess.
"""

import json
import os
import subprocess
import sys

_WORKER = r"""
import json, sys
import jax, jax.numpy as jnp
import entk
from entk import _compilation_cache

events = {"hits": 0, "misses": 0}
def listen(name, **_):
    for kind in events:
        if name == "/jax/compilation_cache/cache_" + kind:
            events[kind] += 1
jax.monitoring.register_event_listener(listen)

def f(params, x):
    w1, b1, w2 = params
    return jnp.tanh(x @ w1 + b1) @ w2

params = (jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), jnp.full((4,), 0.1),
          jnp.linspace(0.5, -0.5, 8).reshape(4, 2))
x = jnp.linspace(-2.0, 2.0, 6).reshape(2, 3)
assert _compilation_cache.cache_dir() is None or sys.argv[2] == "user"  # not enabled by the import
if sys.argv[1] == "one-liner":  # entk.ntk with its defaults: auto, vmap_axes="auto"
    kernel = entk.ntk(entk.Model.from_function(f, params), x)
else:
    kernel = jax.jit(entk.empirical_ntk_fn(f, implementation=sys.argv[1]))(x, None, params)
d = _compilation_cache.cache_dir()
print(json.dumps({"hits": events["hits"], "misses": events["misses"],
                  "dir": None if d is None else str(d), "state": _compilation_cache.enable(),
                  "kernel": kernel.tolist()}))
"""


def _run(env_changes: dict, implementation: str = "sd", mode: str = "default") -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("ENTK_COMPILATION_CACHE", None)
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", _WORKER, implementation, mode], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _entries(path) -> set:
    return set(os.listdir(path)) if os.path.isdir(path) else set()


def test_second_process_reuses_compiled_kernel(tmp_path):
    env = {"ENTK_CACHE_DIR": str(tmp_path)}
    cache = tmp_path / "xla"
    first = _run(env)
    assert first["state"] == "entk" and first["dir"] == str(cache)
    assert first["misses"] >= 1 and first["hits"] == 0
    written = _entries(cache)
    assert written, "the first process stored nothing in the compilation cache"

    second = _run(env)
    assert second["hits"] >= 1 and second["misses"] == 0  # every program found, none compiled
    assert _entries(cache) == written  # and no new program written
    assert second["kernel"] == first["kernel"]


def test_second_process_reuses_the_one_liners_program(tmp_path):
    """`entk.ntk` with its defaults: the first process lowers auto's candidates and runs the winner's
    program as lowered there; the second finds the decision stored, lowers that strategy alone, and
    gets the very same program, so XLA compiles nothing."""
    env = {"ENTK_CACHE_DIR": str(tmp_path)}
    first = _run(env, implementation="one-liner")
    assert first["misses"] >= 1 and first["hits"] == 0
    written = _entries(tmp_path / "xla")
    second = _run(env, implementation="one-liner")
    assert second["hits"] >= 1 and second["misses"] == 0
    assert _entries(tmp_path / "xla") == written
    assert second["kernel"] == first["kernel"]


def test_disabled_by_environment_variable(tmp_path):
    out = _run({"ENTK_CACHE_DIR": str(tmp_path), "ENTK_COMPILATION_CACHE": "0"})
    assert out["state"] == "off" and out["dir"] is None
    assert out["hits"] == 0 and out["misses"] == 0
    assert not (tmp_path / "xla").exists()


def test_moved_by_environment_variable_and_user_setting_kept(tmp_path):
    moved = tmp_path / "elsewhere"
    out = _run({"ENTK_CACHE_DIR": str(tmp_path / "entk"), "ENTK_COMPILATION_CACHE": str(moved)},
               implementation="jc")
    assert out["state"] == "entk" and out["dir"] == str(moved) and _entries(moved)

    user = tmp_path / "user"
    out = _run({"ENTK_CACHE_DIR": str(tmp_path / "entk"), "JAX_COMPILATION_CACHE_DIR": str(user)},
               implementation="jc", mode="user")
    assert out["state"] == "user" and out["dir"] == str(user)
    assert not (tmp_path / "entk" / "xla").exists()
