"""Every name the package uses is defined (pyflakes): code paths that only a GPU runs (CUDA graph
capture, kernels' launch sites) are never executed on CPU, so a missing import there shows up first
on the GPU. The tenth session found one that way (kernels.step_tokens in cuda_graph.py)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytest.importorskip("pyflakes")


def test_no_undefined_names_in_the_package():
    proc = subprocess.run([sys.executable, "-m", "pyflakes", os.path.join(ROOT, "meshserve")],
                          capture_output=True, text=True, timeout=300)
    undefined = [line for line in proc.stdout.splitlines() if "undefined name" in line]
    assert not undefined, "\n".join(undefined)
