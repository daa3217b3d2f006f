"""The kernel settings a benchmark result records (its `kernel_config` key): the engine's own for
runs through a server (its /version) or an in-process LLM (rank 0's runner), and this GPU's
resolved defaults (kernels/settings.py) for kernel benchmarks that call the kernels directly."""
import json
import sys
import urllib.request
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def from_server(base_url: str) -> Optional[dict]:
    """What the server reports at /version (None if it does not say)."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/version", timeout=10) as r:
            return json.load(r).get("kernel_config")
    except OSError as e:
        print(f"kernel settings: {base_url}/version could not be read ({e})", file=sys.stderr)
        return None


def from_llm(llm) -> dict:
    """An in-process LLM's settings (its rank 0)."""
    return llm._core.executor.runner.kernel_config_report()


def local(overrides: Optional[dict] = None, device: Optional[str] = None) -> dict:
    """This GPU's defaults with `overrides` (KernelConfig fields) on top (device None: CUDA if any)."""
    import torch

    from meshserve.kernels import settings

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return settings.describe(settings.for_device(overrides, device), device)
