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
