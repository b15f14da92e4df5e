"""Runs this directory's interpreter tests in a fresh process when they cannot run in this one
(see conftest.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hieravid_kernels

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.mark.interpreter
def test_kernel_suite_in_subprocess():
    if hieravid_kernels.interpreter_ready():
        pytest.skip("the kernel tests run in this process")
    if not hieravid_kernels.HAS_TRITON:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(HERE), "-q", "-m", "interpreter",
         "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
