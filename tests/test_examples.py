"""Every script in examples/ runs to the end (the examples the docs show must not rot)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

# Command-line arguments per example, "{tmp}" standing for the test's temporary directory:
# an example that writes a file is told to write it there, not into the checkout.
ARGS: dict[str, list[str]] = {
    "match_demo.py": ["--out", "{tmp}/match_demo.png"],
}


def test_examples_are_found() -> None:
    assert {path.name for path in EXAMPLES} >= {"match_demo.py", "per_patch.py"}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda path: path.name)
def test_example_runs(script: Path, tmp_path: Path) -> None:
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in ARGS.get(script.name, [])]
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # a fresh process, as a user runs it; the working directory is tmp_path, so that a
    # default relative output path also lands there
    result = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout}\n{result.stderr}"
    if script.name == "match_demo.py":
        assert (tmp_path / "match_demo.png").stat().st_size > 0
