"""What a newcomer meets first: the command's help, `dir(entk)`, start-up noise, Ctrl-C, caches.

- every option of every `entk` subcommand has a help text, no help shows internal notes, and the
  subcommands computing a kernel share their options (`--implementation` choices = `entk.Strategy`);
- `dir(entk)` is the public API only;
- TensorFlow's start-up notices (oneDNN, cuda drivers, cuInit, absl) do not reach stderr when entk
  imports TensorFlow, while other output (Python warnings) still does;
- Ctrl-C during `entk.compute_kernel` says how many tiles are stored and how to resume, re-raises
  `KeyboardInterrupt`, and the rerun completes the same kernel as an uninterrupted run;
- a kernel store accepts the same kernel function wrapped in `jax.jit` (and vice versa) but still
  refuses another model or implementation;
- `entk cache info` / `entk cache clear` show and delete the calibration, compile-rate, XLA and
  decision caches.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import entk
from entk.algorithms import Strategy
from entk.cli import build_parser, main
from tests.reference import assert_close, brute_force_ntk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "examples/jax_models.py:mlp"
KERNEL_COMMANDS = ("ntk", "compare", "spectrum")


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "entk"):
    """(name, parser) for the parser and every (nested) subcommand parser."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, f"{prefix} {name}")


def _env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


# ----------------------------------------------------------------------------------------------
# Help


def test_every_option_of_every_command_has_a_help_text():
    parsers = dict(_subparsers(build_parser()))
    assert {"entk ntk", "entk compare", "entk spectrum", "entk cache info",
            "entk cache clear"} <= set(parsers)
    missing = [f"{name}: {action.option_strings or action.dest}"
               for name, parser in parsers.items() for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction)
               and (not action.help or action.help == argparse.SUPPRESS)]
    assert not missing, f"options without help: {missing}"


def test_help_shows_no_internal_notes():
    for name, parser in _subparsers(build_parser()):
        text = parser.format_help()
        for note in ("add_parser", "run(args)", "entk/cli", "wires this", "subparsers", "__doc__"):
            assert note not in text, f"`{name} --help` shows the internal note {note!r}:\n{text}"


def test_kernel_commands_share_their_options_and_strategies_come_from_strategy():
    parsers = dict(_subparsers(build_parser()))
    shared = {"--trace", "--full", "--vmap", "--whole-batch", "--dtype", "--outputs", "--debug"}
    strategies = [s.short_name for s in Strategy]
    for command in KERNEL_COMMANDS:
        options = {o: a for a in parsers[f"entk {command}"]._actions for o in a.option_strings}
        assert shared <= set(options), f"entk {command} lacks {shared - set(options)}"
        if command != "compare":  # compare runs every strategy
            assert list(options["--implementation"].choices) == strategies


# ----------------------------------------------------------------------------------------------
# dir(entk)


def test_dir_entk_is_the_public_api():
    names = dir(entk)
    assert names == sorted({*entk.__all__, "__version__"})
    for leaked in ("Any", "annotations", "importlib", "_LAZY", "model"):
        assert leaked not in names
    for name in ("ntk", "compare", "empirical_ntk_fn", "compute_kernel", "Model", "Strategy",
                 "linearize", "from_torch", "from_tf"):
        assert name in names


# ----------------------------------------------------------------------------------------------
# Start-up noise


def test_filtered_stderr_drops_only_the_start_up_notices(capfd):
    # (Python warnings are kept too: see the Keras test below, in a process pytest does not capture.)
    from entk.adapters._startup_logs import TENSORFLOW_NOISE, filtered_stderr

    notices = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796051266.482438   26212 port.cc:153] oneDNN custom operations are on. You may "
        "see slightly different numerical results",
        "I0000 00:00:1796051266.483539   26212 cudart_stub.cc:31] Could not find cuda drivers on "
        "your machine, GPU will not be used.",
        "E0000 00:00:1796051273.255784   26212 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
        "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    ]
    with filtered_stderr(TENSORFLOW_NOISE):
        for line in notices:
            os.write(2, (line + "\n").encode())
        os.write(2, b"E0000 00:00:1.0 1 some_op.cc:1] a real error from native code\n")
        print("a message on sys.stderr", file=sys.stderr)
    err = capfd.readouterr().err
    assert "a real error from native code" in err and "a message on sys.stderr" in err
    for notice in notices:
        assert notice[40:80] not in err, err


@pytest.mark.skipif(importlib.util.find_spec("keras") is None
                    or importlib.util.find_spec("tensorflow") is None, reason="needs Keras + TF")
def test_keras_model_on_the_command_line_prints_no_tensorflow_notices(tmp_path):
    # A fresh process is the point: TensorFlow prints its notices once, when it is first imported.
    spec = tmp_path / "keras_spec.py"
    spec.write_text(
        "import warnings\n"
        "import keras\n"
        "warnings.warn('a warning of the user\\'s own module')\n\n\n"
        "def model():\n"
        "    keras.utils.set_random_seed(0)\n"
        "    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation='tanh'),\n"
        "                             keras.layers.Dense(2)])\n")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((3, 4)).astype("float32"))
    env = _env(KERAS_BACKEND="tensorflow")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    done = subprocess.run([sys.executable, "-m", "entk.cli", "spectrum", f"{spec}:model",
                           "--input", str(tmp_path / "x.npy"), "--top", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "top 2 eigenvalues" in done.stdout
    noise = re.compile(r"absl::InitializeLog|oneDNN|cuda drivers|cuInit|^[IWE]\d{4} ", re.M)
    assert not noise.search(done.stderr), done.stderr
    assert "a warning of the user's own module" in done.stderr  # real warnings are kept


# ----------------------------------------------------------------------------------------------
# Ctrl-C during compute_kernel, and resuming


N, TILE = 6, 2  # a 3 x 3 grid of tiles


@pytest.fixture(scope="module")
def case():
    def f(params, x):
        return jnp.tanh(x @ params["w"]) @ params["v"]

    key1, key2, key3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w": jax.random.normal(key1, (4, 5)) / 2, "v": jax.random.normal(key2, (5, 3)) / 2}
    x = jax.random.normal(key3, (N, 4))
    ntk_fn = entk.empirical_ntk_fn(f, implementation="jc")
    reference = jax.jit(lambda a, p: brute_force_ntk(f, a, None, p))(x, params)
    return f, params, x, ntk_fn, reference


@pytest.fixture
def interrupt_after(monkeypatch):
    """`interrupt_after(k)`: the next computation is interrupted (KeyboardInterrupt, as Ctrl-C
    raises it) while the device computes tile k + 1, after k tiles were handed over. Returns the
    list of tiles each later run computes."""
    from entk.scale import sharding

    original = sharding.TileRunner.run
    computed: list = []
    budget = {"tiles": None}

    def run(self, tiles):
        for count, item in enumerate(original(self, tiles)):
            if budget["tiles"] is not None and count == budget["tiles"]:
                budget["tiles"] = None  # only once: the rerun completes
                raise KeyboardInterrupt
            computed.append(item[0])
            yield item

    monkeypatch.setattr(sharding.TileRunner, "run", run)

    def arm(k: int) -> list:
        budget["tiles"] = k
        computed.clear()
        return computed

    return arm


def test_ctrl_c_says_what_is_stored_and_the_rerun_resumes(case, interrupt_after, tmp_path, capsys):
    f, params, x, ntk_fn, reference = case
    store = str(tmp_path / "k.zarr")
    interrupt_after(4)
    with pytest.raises(KeyboardInterrupt):
        entk.compute_kernel(ntk_fn, x, None, params, store=store, tile=TILE, progress=False)
    err = capsys.readouterr().err
    assert f"stored 4 of 9 tiles in {store}; run the same command or call again to resume" in err
    computed = interrupt_after(-1)  # no interruption
    kernel = entk.compute_kernel(ntk_fn, x, None, params, store=store, tile=TILE, progress=False)
    assert len(computed) == 5, "the rerun computes only the 5 missing tiles"
    uninterrupted = entk.compute_kernel(ntk_fn, x, None, params, tile=TILE, progress=False)
    np.testing.assert_array_equal(np.asarray(kernel), uninterrupted)
    assert_close(jnp.asarray(np.asarray(kernel)), reference, rtol=1e-12, what="resumed kernel")


def test_ctrl_c_in_memory_says_nothing_is_stored(case, interrupt_after, capsys):
    f, params, x, ntk_fn, _ = case
    interrupt_after(2)
    with pytest.raises(KeyboardInterrupt):
        entk.compute_kernel(ntk_fn, x, None, params, tile=TILE, progress=False)
    assert "nothing stored; pass store=PATH" in capsys.readouterr().err


def test_ctrl_c_in_entk_ntk_exits_130_and_the_same_command_resumes(interrupt_after, tmp_path,
                                                                   capsys, monkeypatch):
    import zarr

    monkeypatch.chdir(ROOT)
    x = np.random.default_rng(0).standard_normal((6, 32)).astype("float64")
    np.save(tmp_path / "x.npy", x)
    store = str(tmp_path / "k.zarr")
    argv = ["ntk", SPEC, "--input", str(tmp_path / "x.npy"), "--store", store, "--tile", "2",
            "--no-progress", "--implementation", "jc", "--dtype", "float64", "--whole-batch"]
    interrupt_after(3)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"stored 3 of 6 tiles in {store}; run the same command or call again" in err  # symmetric
    assert err.strip().splitlines()[-1] == "entk ntk: interrupted"
    computed = interrupt_after(-1)
    assert main(argv) == 0 and len(computed) == 3
    from entk.spec import load_model

    model = load_model(SPEC, x)
    expected = brute_force_ntk(model.apply, jnp.asarray(x), None, model.params)
    kernel = np.asarray(zarr.open_group(store, mode="r")["kernel"])
    assert_close(jnp.asarray(kernel), expected, rtol=1e-10, what="entk ntk after Ctrl-C")


# ----------------------------------------------------------------------------------------------
# The store's fingerprint sees through jax.jit


def test_store_accepts_the_jitted_kernel_function_and_refuses_another(case, interrupt_after,
                                                                      tmp_path):
    from entk.scale import StoreMismatchError

    f, params, x, ntk_fn, reference = case
    jitted = jax.jit(entk.empirical_ntk_fn(f, implementation="jc"))  # as the Quickstart does
    for first, second, name in [(ntk_fn, jitted, "plain"), (jitted, ntk_fn, "jitted")]:
        store = str(tmp_path / f"{name}.zarr")
        entk.compute_kernel(first, x, None, params, store=store, tile=TILE, progress=False)
        computed = interrupt_after(-1)
        kernel = entk.compute_kernel(second, x, None, params, store=store, tile=TILE,
                                     progress=False)
        assert computed == [], "the other form of the same kernel function reuses every tile"
        assert_close(jnp.asarray(np.asarray(kernel)), reference, rtol=1e-12, what=name)
    others = {
        "another implementation": jax.jit(entk.empirical_ntk_fn(f, implementation="ntvp")),
        "another model": jax.jit(entk.empirical_ntk_fn(lambda p, a: jnp.sin(f(p, a)),
                                                       implementation="jc")),
    }
    for what, other in others.items():
        with pytest.raises(StoreMismatchError, match="the kernel computes something else"):
            entk.compute_kernel(other, x, None, params, store=str(tmp_path / "plain.zarr"),
                                tile=TILE, progress=False)


# ----------------------------------------------------------------------------------------------
# entk cache


def test_cache_info_and_clear_in_a_fresh_process(tmp_path):
    # A fresh process: the XLA cache directory is a process-wide JAX setting.
    cache = tmp_path / "cache"
    script = (
        "import json, sys\n"
        "from entk.cli import main\n"
        "from entk.algorithms import decision_cache, device\n"
        "from entk import _compilation_cache\n"
        "from entk.adapters import program_store\n"
        "from entk.algorithms import compile_time\n"
        "paths = {'calibration': device.calibration_path(), 'xla': _compilation_cache.directory(),\n"
        "         'decisions': decision_cache.directory(), 'programs': program_store.directory(),\n"
        "         'compile-rate': compile_time.path()}\n"
        "paths['calibration'].parent.mkdir(parents=True)\n"
        "paths['calibration'].write_text('{}')\n"
        "paths['compile-rate'].write_text('{}')\n"
        "for name in ('xla', 'decisions', 'programs'):\n"
        "    paths[name].mkdir(); (paths[name] / 'entry').write_bytes(b'x' * 2000)\n"
        "print('PATHS', json.dumps({k: str(v) for k, v in paths.items()}))\n"
        "for argv in (['cache', 'info'], ['cache', 'clear', '--calibration'], ['cache', 'info'],\n"
        "             ['cache', 'clear', '--all']):\n"
        "    print('----', *argv, flush=True)\n"
        "    assert main(argv) == 0\n"
        "    sys.stdout.flush()\n"
        "print('LEFT', json.dumps({k: v.exists() for k, v in paths.items()}))\n"
        "print('TORCH', 'torch' in sys.modules)\n")
    env = _env(ENTK_CACHE_DIR=str(cache))
    env.pop("ENTK_COMPILATION_CACHE", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("ENTK_PROGRAM_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    paths = json.loads(re.search(r"^PATHS (.*)$", out, re.M).group(1))
    assert paths["calibration"].startswith(str(cache) + os.sep)
    assert paths["xla"] == str(cache / "xla") and paths["decisions"] == str(cache / "decisions")
    assert paths["programs"] == str(cache / "torch-programs")
    first_info, cleared, second_info, cleared_all = out.split("---- ")[1:]
    assert f"entk's cache directory: {cache}" in first_info
    assert re.search(rf"calibration +{re.escape(paths['calibration'])} +\(2 B\)", first_info)
    assert re.search(rf"xla +{re.escape(paths['xla'])} +\(1 file, 2.0 kB\)", first_info)
    assert f"calibration: deleted {paths['calibration']}" in cleared
    assert re.search(r"calibration .*nothing stored yet", second_info)
    assert re.search(r"decisions .*\(1 file, 2.0 kB\)", second_info)
    assert re.search(r"programs .*\(1 file, 2.0 kB\)", second_info)
    assert re.search(rf"compile-rate +{re.escape(paths['compile-rate'])} +\(2 B\)", second_info)
    assert all(f"{name}: deleted" in cleared_all
               for name in ("compile-rate", "xla", "decisions", "programs"))
    assert json.loads(re.search(r"^LEFT (.*)$", out, re.M).group(1)) == {
        "calibration": False, "xla": False, "decisions": False, "programs": False,
        "compile-rate": False}
    assert "TORCH False" in out  # `entk cache` does not import PyTorch


def test_compare_says_where_its_calibration_lives(capsys, monkeypatch):
    from entk.algorithms.device import calibration_path

    monkeypatch.chdir(ROOT)
    assert main(["compare", SPEC, "--input-shape", "32", "--batch", "2", "--no-measure",
                 "--whole-batch"]) == 0
    out = capsys.readouterr().out
    assert (f"predicted times use the calibration in {calibration_path()}; "
            f"`entk cache clear --calibration` measures it again") in out
