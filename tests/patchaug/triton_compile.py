"""Compile a Triton kernel for a CUDA target without a GPU, in a subprocess.

triton.language is built in one mode per process (interpreter or compiler), and the test
process runs the interpreter, so a script that compiles kernels through Triton's CUDA
pipeline (Triton ships ptxas) runs in a fresh process with ``TRITON_INTERPRET=0``. The
script prints ``compiled N`` and exits with ``SKIP ...`` on stderr where ptxas is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def assert_compiles(script: str, count: int) -> None:
    """Run ``script``; skip if it reports ``SKIP``, else assert it compiled ``count`` kernels."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    if result.stderr.strip().startswith("SKIP"):
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"compiled {count}" in result.stdout
