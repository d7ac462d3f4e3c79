"""Runs tests/interpret (the Triton kernels) in a separate process with TRITON_INTERPRET=1,
which must be set before Triton is imported."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


def test_triton_kernels_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(HERE, "interpret")],
                          env=env, capture_output=True, text=True, timeout=1200)
    tail = "\n".join(proc.stdout.splitlines()[-25:])
    print(tail)
    assert proc.returncode == 0, tail + proc.stderr[-3000:]
    assert " passed" in tail and " failed" not in tail
