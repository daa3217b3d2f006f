"""L2 prefetch: a latency-bound kernel asks the GPU to bring the next kernel's weights into L2.

At batch 1 a decode step alternates kernels that stream weights (bytes / bandwidth) with kernels
that are latency-bound and leave HBM idle: decode attention reads under 1 MB of KV over ~6.5 us
(Qwen3-30B-A3B on the H200), and the output projection right after it then streams its 16.8 MB
from HBM. With `kernel_config.decode_l2_prefetch` the attention kernel's programs first issue
`prefetch.global.L2` for their share of the o_proj weight's 128-byte lines, so those bytes move
while attention runs and the skinny GEMM after it reads them from L2. Likewise the MoE router (its
gate is 0.5 MB, its top-k a few serial steps) with `kernel_config.l2_prefetch_next_layer`: the gate's
skinny GEMM (kernels/gemv.py, `prefetch=`) asks for the next layer's q/k/v weight, and the experts'
one-token kernels (kernels/moe.py) load their 75 MB evict-first so that weight is still in L2 when
the next layer reads it.

A prefetch is a hint: it reads nothing into registers, writes nothing, and the data it names are
weights no kernel writes, so it needs no ordering (it runs before a PDL wait). Normal eviction
priority: the lines are read once, by the kernel they are for, and must not outstay that. Triton's
interpreter has no inline PTX, so the CPU runs skip the instruction; `_line_range` (how the lines
are shared out) is the part the CPU tests check.
"""
from __future__ import annotations

import triton
import triton.language as tl

from meshserve import kernels

LINES = tl.constexpr(128)  # 128-byte lines a program asks for per loop trip (one per thread of 4 warps)


@triton.jit
def _line_range(nbytes, part, parts):
    """Lines [first, last) of the 128-byte lines covering nbytes that share `part` of `parts` takes
    (equal whole-line ranges; the last shares may be short or empty)."""
    nlines = (nbytes + 127) // 128
    per = (nlines + parts - 1) // parts
    first = part * per
    last = tl.minimum(first + per, nlines)
    return first, last


@triton.jit
def l2_prefetch(ptr, nbytes, part, parts):
    """Prefetch into L2 this program's share (`part` of `parts`) of the nbytes at ptr."""
    first, last = _line_range(nbytes, part, parts)
    base = ptr.to(tl.pointer_type(tl.int8))
    for start in range(first, last, LINES):
        idx = tl.minimum(start + tl.arange(0, LINES), last - 1)  # the tail repeats the last line: no mask
        addr = (base + idx.to(tl.int64) * 128).to(tl.int64)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [addr],
                                  dtype=tl.int32, is_pure=False, pack=1)


def launch_args(t) -> dict:
    """Keywords that make a kernel with the pf_ptr / pf_bytes / PREFETCH parameters prefetch tensor t
    (None: nothing; nor under the interpreter, which has no inline PTX: a hint changes no result)."""
    if t is None or kernels.interpreting():
        return {}
    return {"pf_ptr": t, "pf_bytes": t.numel() * t.element_size(), "PREFETCH": True}


@triton.jit
def _prefetch_kernel(ptr, nbytes):
    l2_prefetch(ptr, nbytes, tl.program_id(0), tl.num_programs(0))


def prefetch_l2(t, programs: int = 64) -> None:
    """Standalone: ask for tensor t's bytes in L2 (GPU tests and benchmarks/l2_prefetch.py)."""
    _prefetch_kernel[(programs,)](t, t.numel() * t.element_size(), num_warps=4)


@triton.jit
def _line_range_kernel(out_ptr, nbytes, PARTS: tl.constexpr):
    """Each program stores its [first, last) (CPU tests of the split, under the interpreter)."""
    part = tl.program_id(0)
    first, last = _line_range(nbytes, part, PARTS)
    tl.store(out_ptr + 2 * part, first)
    tl.store(out_ptr + 2 * part + 1, last)


def line_ranges(nbytes: int, parts: int, device="cpu"):
    """[(first, last)] of each of `parts` programs for nbytes (what l2_prefetch's programs cover)."""
    import torch

    out = torch.zeros(2 * parts, dtype=torch.int64, device=device)
    _line_range_kernel[(parts,)](out, nbytes, PARTS=parts)
    return [tuple(int(x) for x in out[2 * i:2 * i + 2]) for i in range(parts)]
