"""Triton kernels, each with a torch reference in meshserve/layers that tests compare against.

`use_triton(t)` says whether a CUDA tensor should take a fused Triton op (Triton installed, and not
switched off by kernel_config.disable_triton). The switch and GEMV_MAX_M are process-wide: each
rank's ModelRunner sets them once from its resolved KernelSettings (kernels/settings.py) through
`configure`, before the model runs; until then they hold the H200 defaults.
"""
import importlib.util
import os

from meshserve.kernels.settings import H200, KernelSettings

# find_spec, not import: importing triton here would fix its mode before tests can ask for the
# interpreter (TRITON_INTERPRET), and costs start-up time on CPU-only runs.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_AVAILABLE = TRITON_INSTALLED and not H200.disable_triton
# Rows of input up to which linears on CUDA take the skinny-GEMM kernel (kernels/gemv.py) instead
# of cuBLAS; 0 turns it off.
GEMV_MAX_M = H200.gemv_max_m
# kernel_config.pdl: the Triton kernels launch with programmatic dependent launch (kernels/pdl.py).
PDL = H200.pdl
_PDL_SETTING, PDL_MAX_TOKENS = H200.pdl, H200.pdl_max_tokens  # PDL: the setting, for steps up to the limit
_PDL_ARGS = {"USE_PDL": True, "launch_pdl": True}
# kernel_config.fuse_norm_linear: one-row steps fuse each RMSNorm into the linear after it (layers/norm.py).
FUSE_NORM_LINEAR = H200.fuse_norm_linear
# kernel_config.l2_prefetch_next_layer: one-row steps' MoE router gate prefetches the next layer's first
# linear into L2; the experts' decode kernels then stream their weights evict-first (kernels/prefetch.py).
L2_PREFETCH_NEXT_LAYER = H200.l2_prefetch_next_layer


def configure(settings: KernelSettings) -> None:
    """Apply a rank's resolved settings to the fused ops and linears of this process."""
    global TRITON_AVAILABLE, GEMV_MAX_M, PDL, _PDL_SETTING, PDL_MAX_TOKENS, FUSE_NORM_LINEAR, L2_PREFETCH_NEXT_LAYER
    TRITON_AVAILABLE = TRITON_INSTALLED and not settings.disable_triton
    GEMV_MAX_M = settings.gemv_max_m
    PDL = _PDL_SETTING = settings.pdl
    PDL_MAX_TOKENS = settings.pdl_max_tokens
    FUSE_NORM_LINEAR = settings.fuse_norm_linear
    L2_PREFETCH_NEXT_LAYER = settings.l2_prefetch_next_layer


def step_tokens(num_tokens: int) -> None:
    """Set the launches of a step of `num_tokens` tokens (an eager step, or a CUDA graph captured for
    that size): PDL only up to kernel_config.pdl_max_tokens. Each kernel lets the next one launch as it
    starts; in small steps that hides launch latency (batch-1 decode 6% faster on the H200), in
    multi-wave kernels the waiting CTAs of the next kernel take SMs from the running one (offline
    throughput 19% lower with PDL on every step: docs/benchmarks.md, ninth session)."""
    global PDL
    PDL = _PDL_SETTING and num_tokens <= PDL_MAX_TOKENS


def pdl_args() -> dict:
    """Keywords for launching a kernel that has a USE_PDL parameter: with kernel_config.pdl the kernel
    waits for the one before it and is launched with PDL (both or neither: kernels/pdl.py)."""
    return _PDL_ARGS if PDL else {}


def expert_eviction(num_tokens: int) -> str:
    """The L2 eviction priority of the experts' weight loads in a decode step of `num_tokens` tokens:
    "evict_first" in one-row steps with kernel_config.l2_prefetch_next_layer (they stream past the
    next layer's prefetched weight), else the default."""
    return "evict_first" if L2_PREFETCH_NEXT_LAYER and num_tokens == 1 else ""


def use_triton(t) -> bool:
    return TRITON_AVAILABLE and t.is_cuda


def interpreting() -> bool:
    """Whether Triton kernels run under its interpreter on CPU (TRITON_INTERPRET=1, Triton's own switch:
    tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
