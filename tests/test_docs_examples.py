"""Every Python example in docs/ runs as written.

Conventions (the page's reader sees exactly the code that runs):

* Every ``.. code-block:: python`` in ``docs/**/*.rst`` is one example. It runs in a fresh
  namespace, in a scratch working directory.
* A block whose first line is the comment ``# continued`` runs in the namespace the previous
  block of the same page left, as a reader who ran that block first would.
* A page whose prose says the reader already has some files (a checkpoint written by
  ``train.py``, a dataset in the layout the page shows) gets tiny stand-ins for them, in that
  layout, in the scratch directory before its blocks run: ``PAGE_FILES`` below lists them.
* A ``literalinclude`` of Python code must include a file under ``examples/``, which
  ``tests/test_examples.py`` runs; ``::`` literal blocks must not hold Python (they are not
  run, so they are for shell commands and directory layouts only).
* The docstring examples (``>>>``) of every module the API pages render run too: pytest's
  ``--doctest-modules`` runs those under its ``testpaths``, this file runs the others, and
  none may be skipped (``+SKIP`` would show code that never runs).
"""

from __future__ import annotations

import doctest
import importlib
import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.parts)
CONTINUED = "# continued"

# a directive line, its option lines, a blank line, then the indented body
_BLOCK = re.compile(r"^\.\. (?:code-block|code|sourcecode):: (?:python3?|py)[ \t]*\n((?:[ \t]+:.*\n)*)\n"
                    r"((?:(?:[ \t]+.*)?\n)+)", flags=re.M)


def python_blocks(page: Path) -> list[str]:
    """The Python code blocks of an rst page, dedented, in page order."""
    text = page.read_text() + "\n"
    blocks = []
    for match in _BLOCK.finditer(text):
        body = match.group(2)
        # the body ends at the first line that is not indented (and not blank)
        lines = []
        for line in body.splitlines():
            if line and not line[0].isspace():
                break
            lines.append(line)
        blocks.append(textwrap.dedent("\n".join(lines)).strip() + "\n")
    return blocks


# ----------------------------------------------------------------------------- page files


def _evaluation_files(tmp: Path) -> None:
    from tests.pwself_reference.test_eval_cli import (
        write_checkpoint,
        write_imagefolder,
        write_revisited,
    )

    (tmp / "runs" / "cifar10").mkdir(parents=True)
    write_checkpoint(tmp / "runs" / "cifar10" / "final.pth")
    write_imagefolder(tmp / "data" / "images")
    write_revisited(tmp / "data")


def _training_files(tmp: Path) -> None:
    from tests.pwself_reference.test_eval_cli import write_checkpoint

    (tmp / "runs" / "pwself").mkdir(parents=True)
    write_checkpoint(tmp / "runs" / "pwself" / "final.pth")


PAGE_FILES: dict[str, Callable[[Path], None]] = {
    "guides/evaluation.rst": _evaluation_files,  # "a checkpoint from train.py, ..."
    "guides/training.rst": _training_files,  # "To evaluate a run:" (after training)
}


# ----------------------------------------------------------------------------- tests

CASES = [(page, i) for page in PAGES for i in range(len(python_blocks(page)))]


def _name(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


def test_the_docs_have_python_examples() -> None:
    pages = {_name(page) for page, _ in CASES}
    assert {"index.rst", "guides/patch_matching.rst", "guides/evaluation.rst"} <= pages


@pytest.mark.parametrize(("page", "index"), CASES, ids=[f"{_name(p)}:{i}" for p, i in CASES])
def test_docs_python_block_runs(page: Path, index: int, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    if _name(page) in PAGE_FILES:
        PAGE_FILES[_name(page)](tmp_path)
    blocks = python_blocks(page)
    # the run starts at the block this one continues from (a chain of "# continued" blocks)
    start = index
    while start > 0 and blocks[start].startswith(CONTINUED):
        start -= 1
    if index != start:
        assert blocks[index].startswith(CONTINUED)
    namespace: dict[str, object] = {"__name__": "docs"}
    for code in blocks[start:index + 1]:
        exec(compile(code, f"{page}:block{index}", "exec"), namespace)


def test_blocks_are_extracted_with_their_options_and_end(tmp_path: Path) -> None:
    page = tmp_path / "page.rst"
    page.write_text("Intro\n\n.. code-block:: python\n   :caption: one\n\n   x = 1\n\n   y = x\n"
                    "Prose.\n\n.. code:: py\n\n   # continued\n   z = y\n\n.. code-block:: bash\n\n   ls\n")
    assert python_blocks(page) == ["x = 1\n\ny = x\n", "# continued\nz = y\n"]


def test_a_pages_first_block_continues_nothing() -> None:
    # the first block of a page has nothing to continue
    for page in PAGES:
        blocks = python_blocks(page)
        assert not blocks or not blocks[0].startswith(CONTINUED), _name(page)


def test_python_literalincludes_are_run_examples() -> None:
    include = re.compile(r"^\.\. literalinclude:: (\S+)\n((?:[ \t]+:.*\n)*)", flags=re.M)
    found = 0
    for page in PAGES:
        for match in include.finditer(page.read_text()):
            if ":language: python" not in match.group(2):
                continue
            target = (page.parent / match.group(1)).resolve()
            assert target.parent == ROOT / "examples", f"{_name(page)} includes {target}"
            assert target.is_file()
            found += 1
    assert found


def test_literal_blocks_hold_no_python() -> None:
    # "::" blocks are shown, never run: they must not look like Python the reader would run
    literal = re.compile(r"::\n\n((?:(?:[ \t]+.*)?\n)+)")
    for page in PAGES:
        for match in literal.finditer(page.read_text()):
            start = match.string.rfind("\n", 0, match.start()) + 1
            if match.string[start:match.start()].lstrip().startswith(".. "):
                continue  # a directive (code-block, literalinclude, ...), not a literal block
            body = textwrap.dedent(match.group(1))
            assert not re.search(r"^(import |from \S+ import |>>> )", body, flags=re.M), (
                f"{_name(page)}: Python in a literal block\n{body}")


# ----------------------------------------------------------------------------- API docstrings

API_MODULES = sorted({name for rst in (DOCS / "api").glob("*.rst")
                      for name in re.findall(r"^\.\. automodule:: (\S+)", rst.read_text(), flags=re.M)})


def _doctested_by_pytest(module: object) -> bool:
    """Whether pytest's --doctest-modules collects the module (it lies under a testpath)."""
    listed = re.search(r"^testpaths\s*=\s*\[(.*?)\]", (ROOT / "pyproject.toml").read_text(),
                       flags=re.M | re.S)
    testpaths = re.findall(r'"([^"]+)"', listed.group(1)) if listed else []
    path = Path(module.__file__).resolve()
    return any(path == (ROOT / t).resolve() or (ROOT / t).resolve() in path.parents
               for t in testpaths if t != "tests")


def _docstring_tests(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    return [t for t in doctest.DocTestFinder().find(module) if t.examples]


def test_the_api_pages_render_modules():
    assert "patchaug.matching" in API_MODULES and "pwself_reference.checkpoint" in API_MODULES


@pytest.mark.parametrize("name", API_MODULES)
def test_api_docstring_examples_run_and_none_is_skipped(name: str) -> None:
    tests = _docstring_tests(name)
    skipped = [t.name for t in tests for ex in t.examples if ex.options.get(doctest.SKIP)]
    assert not skipped, f"docstring examples that never run: {skipped}"
    module = importlib.import_module(name)
    if _doctested_by_pytest(module):
        return  # run by pytest --doctest-modules already
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
