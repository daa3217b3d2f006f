"""Every scenario script under benchmarks/ parses its arguments (the GPU runs happen elsewhere)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = ["online_8b.py", "decode_latency.py", "offline_8b.py", "nano_bench.py", "prefill_8k.py", "tokenize_long.py", "decode_fusions.py",
           "moe_1gpu.py", "moe_layer_ab.py", "norm_gemv.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help(script):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--help"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--out" in proc.stdout


def test_bench_module_help_runs_standalone():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "meshserve.commands.bench", "serve", "--help"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--max-concurrency" in proc.stdout and "--request-rate" in proc.stdout
