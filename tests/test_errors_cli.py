"""The `entk ntk` / `entk spectrum` commands refuse unusable `.npy` inputs with one clear line.

Each test saves the file a user might pass (no examples, the wrong width or rank for the model,
strings, pickled objects, a NaN), runs the command in-process through `entk.cli.main`, and checks the
exit code, that stderr is one line naming the file and the problem, and that no store was written.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from entk.cli import main

SPEC = "examples/jax_models.py:mlp"  # flat examples of 32 features
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save(tmp_path, name: str, array: np.ndarray, **kw) -> str:
    path = str(tmp_path / f"{name}.npy")
    np.save(path, array, **kw)
    return path


def _nan_at_example_2() -> np.ndarray:
    x = np.ones((5, 32), np.float32)
    x[2, 3] = np.nan
    return x


def _one_line(stderr: str, prefix: str) -> str:
    """The command's one error line (warnings from libraries may precede it; no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, stderr
    return lines[0]


CASES = {
    "empty": (lambda: np.zeros((0, 32), np.float32), r"holds no examples \(shape \(0, 32\)\)"),
    "width": (lambda: np.ones((4, 7), np.float32),
              r"cannot take --input \S+width.npy \(examples of shape \(7,\), float32\): TypeError: "
              r"dot_general requires contracting dimensions .* \(7,\) and \(32,\)"),
    "rank": (lambda: np.ones((4, 2, 16, 3), np.float32),
             r"cannot take --input \S+rank.npy \(examples of shape \(2, 16, 3\), float32\)"),
    "strings": (lambda: np.array(["a", "b"]), r"strings.npy: has dtype <U1; a model input needs numbers"),
    "nan": (_nan_at_example_2, r"nan.npy: holds 1 NaN or infinite value\(s\) \(the first in example 2\)"),
}


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # SPEC is relative to the repository


@pytest.mark.parametrize("case", list(CASES))
def test_ntk_refuses_bad_input_in_one_line(case, tmp_path, capsys):
    make, message = CASES[case]
    path = _save(tmp_path, case, make())
    store = tmp_path / "k.zarr"
    code = main(["ntk", SPEC, "--input", path, "--store", str(store), "--tile", "2",
                 "--no-progress"])
    err = _one_line(capsys.readouterr().err, "entk ntk: ")
    assert code == 1
    assert path in err and re.search(message, err), err
    assert not store.exists(), "nothing is computed from a bad input"


def test_ntk_refuses_pickles_mismatched_input2_and_nan_input2(tmp_path, capsys):
    good = _save(tmp_path, "good", np.ones((3, 32), np.float32))
    objects = _save(tmp_path, "objects", np.array([{}, 1], dtype=object), allow_pickle=True)
    narrow = _save(tmp_path, "narrow", np.ones((3, 16), np.float32))
    nan = _save(tmp_path, "nan", _nan_at_example_2())
    store = str(tmp_path / "k.zarr")
    for argv, message in [
            (["--input", objects], f"--input {objects}: cannot be read as a .npy array"),
            (["--input", good, "--input2", narrow],
             f"--input2 {narrow}: its examples have shape (16,), those of --input {good} (32,)"),
            (["--input", good, "--input2", nan], f"--input2 {nan}: holds 1 NaN")]:
        assert main(["ntk", SPEC, *argv, "--store", store, "--no-progress"]) == 1
        err = _one_line(capsys.readouterr().err, "entk ntk: ")
        assert message in err, err
    assert not os.path.exists(store)


def test_spectrum_refuses_bad_input_in_one_line(tmp_path, capsys):
    for case in ("empty", "width", "nan"):
        make, message = CASES[case]
        path = _save(tmp_path, case, make())
        assert main(["spectrum", SPEC, "--input", path]) == 1
        captured = capsys.readouterr()
        err = _one_line(captured.err, "entk spectrum: ")
        assert path in err and re.search(message, err), err
        assert "eigenvalues" not in captured.out


def test_compare_reports_the_input_shape_error_not_out_of_budget(capsys):
    # `--input-shape 7` for a model expecting 32 features: the model's shape error, in one line.
    assert main(["compare", SPEC, "--input-shape", "7", "--batch", "2", "--no-measure"]) == 1
    err = _one_line(capsys.readouterr().err, "entk compare: ")
    assert "OutOfBudgetError" not in err
    assert re.search(r"cannot take --input-shape 7 \(examples of shape \(7,\), float32\): TypeError: "
                     r"dot_general requires contracting dimensions .* \(7,\) and \(32,\)", err), err


# ----------------------------------------------------------------------------------------------
# Every command: usage errors exit 2 (argparse), entk's own errors exit 1 in one line, --debug


def _no_traceback_error_line(stderr: str, command: str) -> str:
    line = _one_line(stderr, f"entk {command}: error: ")
    assert len(stderr.strip().splitlines()) == 1, stderr
    return line


@pytest.mark.parametrize("argv, message", [
    (["ntk", SPEC, "--store", "k.zarr"], "the following arguments are required: --input"),
    (["ntk", SPEC, "--input", "x.npy", "--store", "k.zarr", "--implementation", "fast"],
     "argument --implementation: invalid choice: 'fast'"),
    (["ntk", SPEC, "--input", "x.npy", "--store", "k.zarr", "--tile", "0"], "argument --tile"),
    (["compare", SPEC, "--input-shape", "3,x"], "argument --input-shape"),
    (["compare", SPEC, "--input-shape", "32", "--batch", "0"], "'0' is not a positive integer"),
    (["spectrum", SPEC, "--input", "x.npy", "--top", "0"], "'0' is not a positive integer"),
    (["spectrum", SPEC, "--input", "x.npy", "--dtype", "float16"], "argument --dtype"),
    (["cache", "drop"], "invalid choice: 'drop'"),
    (["nonsense"], "invalid choice: 'nonsense'"),
])
def test_usage_errors_exit_2_with_argparse_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage: entk"), err
    assert message in err.strip().splitlines()[-1], err


def test_own_errors_are_one_line_exit_1_and_debug_shows_the_traceback(tmp_path, capsys):
    from entk.cli import CommandError

    x = _save(tmp_path, "x", np.ones((3, 32), np.float32))
    store = str(tmp_path / "k.zarr")
    cases = [
        (["ntk", "examples/no_such_file.py:mlp", "--input", x, "--store", store],
         "SPEC file 'examples/no_such_file.py' does not exist"),
        (["ntk", "examples/jax_models.py:no_such_model", "--input", x, "--store", store],
         "module 'examples/jax_models.py' has no attribute 'no_such_model'"),
        (["ntk", SPEC, "--input", str(tmp_path / "missing.npy"), "--store", store],
         "missing.npy: cannot be read as a .npy array (FileNotFoundError"),
        (["spectrum", "no_colon_in_spec", "--input", x], "must look like package.module:callable"),
    ]
    for argv, message in cases:
        assert main(argv) == 1
        line = _no_traceback_error_line(capsys.readouterr().err, argv[0])
        assert message in line, line
        # --debug, before or after the subcommand: the exception itself, with its traceback.
        for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
            with pytest.raises(CommandError, match=re.escape(message)):
                main(debug_argv)
    assert not os.path.exists(store)


def test_errors_outside_the_inputs_are_one_line_too(tmp_path, capsys):
    # A store holding another kernel (entk.scale.StoreMismatchError, a multi-line message).
    x = _save(tmp_path, "x", np.ones((4, 32), np.float32))
    other = _save(tmp_path, "other", np.full((4, 32), 2.0, np.float32))
    store = str(tmp_path / "k.zarr")
    argv = ["ntk", SPEC, "--store", store, "--tile", "2", "--no-progress", "--implementation", "jc"]
    assert main([*argv, "--input", x]) == 0
    capsys.readouterr()
    assert main([*argv, "--input", other]) == 1
    line = _no_traceback_error_line(capsys.readouterr().err, "ntk")
    assert "StoreMismatchError: The kernel store" in line and "x1 holds other values" in line
    assert "--debug" in line, "an unexpected error says how to see its traceback"
    from entk.scale import StoreMismatchError

    with pytest.raises(StoreMismatchError):
        main(["--debug", *argv, "--input", other])
    # `entk cache clear` without saying what: entk's own error, one line.
    assert main(["cache", "clear"]) == 1
    assert "say what to clear" in _no_traceback_error_line(capsys.readouterr().err, "cache")


def test_debug_prints_the_traceback_in_a_fresh_process(tmp_path):
    # What a user sees on the terminal: one line without --debug, the traceback with it.
    import subprocess
    import sys

    argv = [sys.executable, "-m", "entk.cli", "spectrum", SPEC, "--input", str(tmp_path / "x.npy")]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    plain = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    debug = subprocess.run([*argv, "--debug"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert plain.returncode == 1 and plain.stderr.startswith("entk spectrum: error: "), plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "entk.cli.CommandError: --input " in debug.stderr and "x.npy: cannot be read" in debug.stderr
