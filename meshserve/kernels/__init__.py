"""Triton kernels, each with a torch reference in meshserve/layers that tests compare against.
`use_triton(t)` says whether a CUDA tensor should take the Triton path (Triton installed, and not
switched off with MESHSERVE_DISABLE_TRITON=1, read once here)."""
import os

try:
    import triton  # noqa: F401
    TRITON_AVAILABLE = os.environ.get("MESHSERVE_DISABLE_TRITON", "0") != "1"
except ImportError:  # pragma: no cover
    TRITON_AVAILABLE = False


def use_triton(t) -> bool:
    return TRITON_AVAILABLE and t.is_cuda
