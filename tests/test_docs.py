"""The documentation is true: every ```python block of README.md and docs/ runs, the README's layout map
names every module of entk/, and the docs site builds with `mkdocs build --strict`.

Each block runs in a fresh namespace, in this process (imports and compiled programs are shared, which
keeps the ~30 blocks to about a minute), from a temporary working directory (blocks that write files,
e.g. a kernel store, leave nothing in the checkout), with JAX in its default 32-bit mode as a reader
runs them. Blocks are written to be self-contained, as a reader copies them; a block marked
```python skip is not run (each such block says why next to it). A failing block is reported with
its file and first line.
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_FENCE = re.compile(r"^```python(?P<info>[^\n]*)\n(?P<code>.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def _blocks() -> list:
    """One pytest param per ```python block: (path, first line, code), id `file:line`."""
    params = []
    for path in DOC_FILES:
        text = path.read_text()
        for m in _FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 2  # the block's first line of code
            rel = path.relative_to(ROOT).as_posix()
            marks = [pytest.mark.skip(reason="marked ```python skip in the docs")] \
                if "skip" in m.group("info").split() else []
            params.append(pytest.param(rel, line, m.group("code"), id=f"{rel}:{line}", marks=marks))
    return params


BLOCKS = _blocks()


def test_docs_have_code_blocks():
    """The collection below found the blocks (a regex that matched nothing would test nothing)."""
    files = {p.values[0] for p in BLOCKS}
    assert "README.md" in files and any(f.startswith("docs/getting-started/") for f in files), files


@pytest.mark.parametrize("path, line, code", BLOCKS)
def test_code_block_runs(path, line, code, tmp_path, monkeypatch):
    """The block runs to its end, so its own checks hold (shapes, values against a direct computation,
    the errors it expects)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    compiled = compile("\n" * (line - 1) + code, str(ROOT / path), "exec")
    with jax.enable_x64(False):  # as a reader runs them: JAX's default 32 bits (conftest turns on 64)
        exec(compiled, {"__name__": f"docs_block_{line}"})  # noqa: S102 - the docs' own examples


# ----------------------------------------------------------------------------------------------
# The README's "Layout" map


def _layout_entries() -> list[str]:
    """Paths (relative to entk/, directories ending in "/") the README's Layout tree names.

    The tree is the first fenced block after "## Layout": `entk/` on its first line, then one line per
    module, indented two spaces per level, the name first and its description after; a name may hold
    a `*` for a family of modules (`aten_*.py`).
    """
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout"):]
    tree = section[section.index("```"):].split("\n")[1:]
    tree = tree[:tree.index("```")]
    assert tree[0].split()[0] == "entk/", tree[0]
    stack, entries = [], []
    for row in tree[1:]:
        if not row.strip():
            continue
        depth = (len(row) - len(row.lstrip())) // 2 - 1
        stack[depth:] = [row.split()[0]]
        entries.append("".join(stack))
    return entries


def _actual_modules() -> set[str]:
    actual = set()
    for p in (ROOT / "entk").rglob("*.py"):
        rel = p.relative_to(ROOT / "entk")
        if "__pycache__" in rel.parts:
            continue
        if p.name != "__init__.py" or rel.parent == Path("."):
            actual.add(rel.as_posix())
        actual.update(parent.as_posix() + "/" for parent in rel.parents if parent != Path("."))
    return actual


def test_readme_layout_names_every_module():
    """Every module and package of entk/ is on a line of the README's Layout tree, and every name the
    tree gives exists: the map stays true as modules are added, renamed or removed."""
    entries = _layout_entries()
    actual = _actual_modules()
    missing = sorted(m for m in actual if not any(fnmatch.fnmatchcase(m, e) for e in entries))
    assert not missing, f"README.md's Layout section lacks a line for: {missing}"
    stale = sorted(e for e in entries if not any(fnmatch.fnmatchcase(m, e) for m in actual))
    assert not stale, f"README.md's Layout section names modules that do not exist: {stale}"


def test_readme_commands_are_what_ci_runs():
    """The README's set-up and test commands are the ones `.ci/run` runs, so CI checks the README."""
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[all]"' in readme and '-m pip install --quiet -e ".[all]"' in ci
    assert "python -m pytest -n 2 -q" in readme and "-m pytest -n 2 -q" in ci
    assert "mkdocs build --strict" in ci


def _anchors(markdown: str) -> set[str]:
    """The ids Python-Markdown's toc extension gives the headings of a page (its default slugify)."""
    headings = re.findall(r"^#+\s+(.*)$", markdown, re.MULTILINE)
    return {re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", h).strip().lower()) for h in headings}


def test_readme_links_resolve():
    """README.md's relative links (the docs pages it points to, and their anchors) exist; mkdocs checks
    the links inside docs/, but the README is outside the site."""
    text = (ROOT / "README.md").read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path
        if not file.exists() or (anchor and anchor not in _anchors(file.read_text())):
            broken.append(target)
    assert not broken, f"README.md links to missing files or headings: {broken}"


# ----------------------------------------------------------------------------------------------
# The site


def test_mkdocs_build_strict(tmp_path):
    """`mkdocs build --strict` (warnings are errors: broken links, docstrings mkdocstrings cannot
    parse, pages missing from the nav) into a temporary directory."""
    for name in ("mkdocs", "mkdocstrings_handlers.python", "material"):
        pytest.importorskip(name, reason="the docs tools are not installed (pip install -e '.[docs]')")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    api = (tmp_path / "site" / "api" / "entk" / "index.html").read_text()
    assert 'id="entk.empirical.empirical_ntk_fn"' in api and "trace_axes" in api  # docstrings rendered
