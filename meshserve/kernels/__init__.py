"""Triton kernels, each with a torch reference in meshserve/layers that tests compare against.
`use_triton(t)` says whether a CUDA tensor should take the Triton path (Triton installed, and not
switched off with MESHSERVE_DISABLE_TRITON=1, read once here)."""
import importlib.util
import os

# find_spec, not import: importing triton here would fix its mode before tests can ask for the
# interpreter (TRITON_INTERPRET), and costs start-up time on CPU-only runs.
TRITON_AVAILABLE = (importlib.util.find_spec("triton") is not None
                    and os.environ.get("MESHSERVE_DISABLE_TRITON", "0") != "1")


def use_triton(t) -> bool:
    return TRITON_AVAILABLE and t.is_cuda

# Rows of input up to which linears on CUDA take the skinny-GEMM kernel (kernels/gemv.py) instead
# of cuBLAS; 0 turns it off. The default comes from benchmarks/gemv.py on the H200.
GEMV_MAX_M = int(os.environ.get("MESHSERVE_GEMV_MAX_M", "1"))
