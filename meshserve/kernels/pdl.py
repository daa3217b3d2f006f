"""Programmatic dependent launch (PDL, Hopper and newer) for the Triton kernels, behind
`kernel_config.pdl` (kernels.PDL, set per process by kernels.configure).

With PDL a kernel launches while the kernel before it on the stream is finishing; it must not touch
memory that kernel writes (or reads) before `griddepcontrol.wait`, which returns once the previous
grid has completed and its writes are visible. Each kernel taking a `USE_PDL` parameter calls
`pdl_enter` first (wait, then let the next kernel launch); the skinny GEMM loads its first weight
tile before waiting (weights are never written by a kernel), which is where the overlap pays most.
Launch sites pass `**kernels.pdl_args()`: USE_PDL=True and launch_pdl=True together, or nothing (a
kernel launched with PDL that did not wait could read stale data, so the two never come apart).
"""
import triton
import triton.language as tl


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_launch_next(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pdl_launch_next(USE_PDL)
