"""The MoE expert backends (layers/moe/experts.py) against a float64 loop written here, independent of
VANILLA: random small shapes, -1 ids (another rank's experts), rows with no local assignment. TRITON
runs under Triton's interpreter on CPU (TRITON_INTERPRET=1, set before triton loads), CUTLASS through
torch._grouped_mm's CPU implementation. The CUDA-graph and full-size checks are in tests/gpu/test_moe_kernel.py."""
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from meshserve.layers.moe.experts import BACKENDS, auto_backend, create_experts  # noqa: E402

triton_only = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

CPU = torch.device("cpu")


def make_case(T, E, K, H=64, I=32, drop=0.25, seed=0, dtype=torch.float32):
    """Inputs with duplicate-free top-k ids per row, about `drop` of them -1, and one row all -1."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    k = min(K, E)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[torch.rand(T, k, generator=g) < drop] = -1
    if T > 2:
        ids[T // 2] = -1
    weights = torch.rand(T, k, generator=g)
    return hidden.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids


def reference(hidden, w13, w2, weights, ids):
    """float64, one (token, k) at a time."""
    T, H = hidden.shape
    I = w13.shape[1] // 2
    x, a, b = hidden.double(), w13.double(), w2.double()
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            gate = a[e, :I] @ x[t]
            up = a[e, I:] @ x[t]
            h = gate * torch.sigmoid(gate) * up
            out[t] += float(weights[t, j]) * (b[e] @ h)
    return out


def assert_close(out, ref, rtol):
    assert out.shape == ref.shape
    scale = ref.abs().max().clamp_min(1e-6)
    err = (out.double() - ref).abs().max() / scale
    assert err <= rtol, f"max error {err:.3g} of max |ref| {scale:.3g}"


CASES = [(T, E, K) for T in (1, 5, 33) for E in (1, 4, 8) for K in (1, 2, 4) if K <= E]


@pytest.mark.parametrize("T,E,K", CASES)
@pytest.mark.parametrize("backend", ["VANILLA", pytest.param("TRITON", marks=triton_only), "CUTLASS"])
def test_backend_matches_float64(backend, T, E, K):
    """fp32 against the float64 loop; TRITON under the interpreter with IEEE fp32 dots."""
    args = make_case(T, E, K, seed=T * 100 + E * 10 + K)
    out = create_experts(backend, CPU, torch.float32).apply(*args)
    assert out.dtype == torch.float32
    assert_close(out, reference(*args), 1e-5)
    if T > 2:
        assert torch.all(out[T // 2] == 0)


@pytest.mark.parametrize("T,E,K", [(1, 4, 2), (33, 8, 4)])
def test_backends_take_int32_ids(T, E, K):
    h, w13, w2, wt, ids = make_case(T, E, K, seed=7)
    for backend in ("VANILLA", "CUTLASS") + (("TRITON",) if importlib.util.find_spec("triton") else ()):
        out = create_experts(backend, CPU, torch.float32).apply(h, w13, w2, wt, ids.int())
        assert_close(out, reference(h, w13, w2, wt, ids), 1e-5)


@pytest.mark.parametrize("backend", ["VANILLA", pytest.param("TRITON", marks=triton_only), "CUTLASS"])
def test_bf16_keeps_the_model_dtype(backend):
    """(Triton's interpreter rounds fp32 -> bf16 toward zero, a GPU to nearest: twice the error here.)"""
    h, w13, w2, wt, ids = make_case(9, 4, 2, dtype=torch.bfloat16, seed=3)
    out = create_experts(backend.lower(), CPU, torch.bfloat16).apply(h, w13, w2, wt, ids)
    assert out.dtype == torch.bfloat16
    assert_close(out, reference(h, w13, w2, wt, ids), 2e-2)


@pytest.mark.parametrize("backend", ["VANILLA", pytest.param("TRITON", marks=triton_only), "CUTLASS"])
def test_empty_batch_and_all_remote(backend):
    h, w13, w2, wt, ids = make_case(4, 4, 2)
    experts = create_experts(backend, CPU, torch.float32)
    assert experts.apply(h[:0], w13, w2, wt[:0], ids[:0]).shape == (0, 64)
    out = experts.apply(h, w13, w2, wt, torch.full_like(ids, -1))
    assert out.shape == (4, 64) and torch.all(out == 0)


ALIGN_CASES = [(6, 4, 16), (160, 8, 16), (300, 8, 16), (5000, 60, 32),
               # one program (_align_small_kernel): decode sizes, E above and below n, all row blocks
               (1, 128, 16), (8, 128, 16), (8, 1, 16), (16, 128, 32), (33, 8, 16), (64, 128, 16), (64, 60, 64),
               (100, 128, 128), (200, 16, 16), (256, 128, 16), (256, 4, 64)]


def check_alignment(ids, E, block_m, sorted_ids, block_expert):
    """Each expert's assignments in order in one segment that starts at a multiple of block_m,
    padding = the sentinel n, block experts match, -1 never placed, sentinels and -1 past the end."""
    from meshserve.kernels.moe_align import padded_rows
    n = ids.numel()
    P = padded_rows(n, E, block_m)
    assert sorted_ids.shape == (P,) and block_expert.shape == (P // block_m,)
    start = 0
    for e in range(E):
        mine = torch.nonzero(ids == e).flatten()
        seg = -(-len(mine) // block_m) * block_m
        assert sorted_ids[start:start + len(mine)].tolist() == mine.tolist()
        assert torch.all(sorted_ids[start + len(mine):start + seg] == n)
        assert torch.all(block_expert[start // block_m:(start + seg) // block_m] == e)
        start += seg
    assert torch.all(sorted_ids[start:] == n)
    assert torch.all(block_expert[start // block_m:] == -1)


@triton_only
@pytest.mark.parametrize("n,E,block_m", ALIGN_CASES)
def test_align_block_size(n, E, block_m, monkeypatch):
    """Small n in one program, larger n in several (chunked counts, then placement); the small
    cases also through the multi-program path (small_max=0), which must agree. The outputs come
    from torch.empty: poisoned here, so every slot must be written."""
    from meshserve.kernels import moe_align as moe
    from meshserve.kernels.moe_align import align_block_size
    real_empty = torch.empty
    monkeypatch.setattr(moe.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(12345))
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(-1, E, (n,), generator=g)
    shaped = ids.view(-1, 2) if n % 2 == 0 else ids.view(-1, 1)
    sorted_ids, block_expert = align_block_size(shaped, E, block_m)
    check_alignment(ids, E, block_m, sorted_ids, block_expert)
    if n <= 256:
        again = align_block_size(shaped, E, block_m, small_max=0)
        assert torch.equal(again[0], sorted_ids) and torch.equal(again[1], block_expert)


@triton_only
@pytest.mark.parametrize("T,K,E", [(1, 8, 128), (4, 8, 128), (32, 8, 128), (3, 2, 8)])
def test_align_small_with_distinct_topk_rows(T, K, E):
    """A router's ids (distinct per row, some -1 from another rank) with the decode row block."""
    from meshserve.kernels.moe_align import align_block_size
    g = torch.Generator().manual_seed(T)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[torch.rand(T, K, generator=g) < 0.2] = -1
    for block_m in (16, 64):
        check_alignment(ids.reshape(-1), E, block_m, *align_block_size(ids, E, block_m))


@triton_only
def test_triton_takes_other_configs():
    """Another row block (the alignment follows it), uneven K tiles, and a config function."""
    from meshserve.kernels.moe import GemmConfig, MoeKernelConfig, fused_experts
    args = make_case(17, 8, 4, H=48, I=40, seed=11)
    ref = reference(*args)
    cfg = MoeKernelConfig(32, GemmConfig(16, 32, 2), GemmConfig(32, 32, 1))
    assert_close(fused_experts(*args, configs=cfg), ref, 1e-5)
    seen = []
    assert_close(fused_experts(*args, configs=lambda *shape: seen.append(shape) or cfg), ref, 1e-5)
    assert seen == [(17, 4, 8, 48, 40)]


@triton_only
def test_triton_sorts_in_several_programs_above_256_assignments():
    args = make_case(80, 8, 4, seed=12)  # 320 assignments: _count_kernel + 5 _place_kernel programs
    assert_close(create_experts("TRITON", CPU, torch.float32).apply(*args), reference(*args), 1e-5)


def test_auto_on_cpu_is_vanilla():
    assert auto_backend(CPU, torch.float32) == "VANILLA"
    assert create_experts("auto", CPU, torch.bfloat16).name == "VANILLA"
    assert create_experts("AUTO", "cpu", torch.float32).name == "VANILLA"


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match=r"moe_config.backend='cublas' is not supported; accepted: "
                                         r"auto, VANILLA, TRITON, CUTLASS"):
        create_experts("cublas", CPU, torch.float32)
    assert BACKENDS == ("VANILLA", "TRITON", "CUTLASS")


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"moe_config.backend='triton' cannot run here: it needs a CUDA device "
                                         r"\(this one is 'cpu'\) or a CPU with TRITON_INTERPRET=1.*accepted: auto, "
                                         r"VANILLA, TRITON, CUTLASS"):
        create_experts("triton", CPU, torch.float32)


def test_cutlass_refusals(monkeypatch):
    with pytest.raises(ValueError, match=r"moe_config.backend='CUTLASS' cannot run here: torch._grouped_mm on "
                                         r"CPU takes float32, bfloat16 or float16, not torch.float64"):
        create_experts("CUTLASS", CPU, torch.float64)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"moe_config.backend='cutlass' cannot run here: .*Hopper or newer GPU "
                                         r"\(compute capability >= 9.0\); this one is 8.0; accepted: auto"):
        create_experts("cutlass", torch.device("cuda", 0), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(ValueError, match=r"bfloat16 only, not torch.float16"):
        create_experts("cutlass", torch.device("cuda", 0), torch.float16)
    assert create_experts("cutlass", torch.device("cuda", 0), torch.bfloat16).name == "CUTLASS"


def test_cutlass_needs_16_byte_strides():
    h, w13, w2, wt, ids = make_case(3, 4, 2, H=36, I=32)
    with pytest.raises(ValueError, match=r"hidden size 36 and intermediate size 32 to be multiples of 8 for "
                                         r"torch.bfloat16"):
        create_experts("CUTLASS", CPU, torch.bfloat16).apply(h.bfloat16(), w13.bfloat16(), w2.bfloat16(), wt, ids)


@triton_only
def test_auto_on_cuda_is_triton_and_triton_can_be_switched_off(monkeypatch):
    from meshserve import kernels
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda", 0)
    assert auto_backend(cuda, torch.bfloat16) == "TRITON"
    assert create_experts("auto", cuda, torch.bfloat16).name == "TRITON"
    monkeypatch.setattr(kernels, "TRITON_AVAILABLE", False)
    assert auto_backend(cuda, torch.bfloat16) == "VANILLA"
    with pytest.raises(ValueError, match=r"moe_config.backend='TRITON' cannot run here: Triton is switched off "
                                         r"\(kernel_config.disable_triton\)"):
        create_experts("TRITON", cuda, torch.bfloat16)


# every T = 1 case of CASES; past one row the programs are per token, so a few shapes do: (5, 4, 2) and
# (5, 8, 4) with a row of no expert, K = 1 at 33 tokens, top-8 of 128 at 8, 60 experts at 3
TWO_KERNEL = [(T, E, K) for T, E, K in CASES if T == 1] + [(5, 4, 2), (5, 8, 4), (33, 8, 1), (1, 128, 8), (8, 128, 8),
                                                             (3, 60, 8)]


@triton_only
@pytest.mark.parametrize("T,E,K", TWO_KERNEL)
def test_two_kernel_decode_path(T, E, K):
    """The decode path (down_sum set, <= 64 assignments): the gated GEMM sorts its own rows, the
    down product and the sum over k in one kernel; -1 ids, a row with none, uneven tiles."""
    from meshserve.kernels.moe import DIRECT_MAX, GemmConfig, MoeKernelConfig, fused_experts
    args = make_case(T, E, K, H=48, I=40, seed=T * 7 + E + K)
    assert T * min(K, E) <= DIRECT_MAX
    small = T * E <= 32
    for down_sum in [GemmConfig(16, 64, 1, 2, 1)] + ([GemmConfig(8, 16, 1, 4, 1), GemmConfig(1, 256, 1, 1, 1)]
                                                     if small else []):
        cfg = MoeKernelConfig(16, GemmConfig(16, 32), GemmConfig(16, 32), down_sum=down_sum)
        out = fused_experts(*args, configs=cfg)
        assert_close(out, reference(*args), 1e-5)
        if T > 2:
            assert torch.all(out[T // 2] == 0)


@triton_only
@pytest.mark.parametrize("T,E,K,evict_first", [(1, 4, 2, False), (1, 128, 8, False),
                                               (3, 60, 8, False), (3, 8, 1, False),
                                               # the switch: evict-first at one row, the default past it
                                               (1, 4, 2, True), (1, 128, 8, True), (3, 8, 1, True)])
def test_two_kernel_path_with_the_gemv_gated_product(T, E, K, evict_first, monkeypatch):
    """gate_up_gemv: the gated product as matrix-vector programs (one per assignment and column
    block), uneven column and K tiles, -1 ids and a row with none; then _down_sum_kernel. With
    kernel_config.l2_prefetch_next_layer, one-row steps load the weights evict-first (the
    interpreter takes the policy and ignores it; tests/gpu/test_l2_prefetch.py runs it). The programs
    are per assignment and column block and the down product's per token, so T only sizes the grid:
    (3, 8, 1) is the K=1 case at the fewest tokens with a row of none (ids [6, -1, 0])."""
    from meshserve import kernels
    from meshserve.kernels import moe
    from meshserve.kernels.moe import GemmConfig, MoeKernelConfig, fused_experts
    monkeypatch.setattr(kernels, "L2_PREFETCH_NEXT_LAYER", evict_first)
    launched = []
    real = moe._gate_up_gemv_kernel
    monkeypatch.setattr(moe, "_gate_up_gemv_kernel", type("Spy", (), {"__getitem__": lambda self, grid: (
        lambda *a, **k: launched.append(k["EVICT"]) or real[grid](*a, **k))})())
    args = make_case(T, E, K, H=48, I=40, seed=T * 5 + E + K)
    for gemv in (GemmConfig(1, 16, 1, 1, 1), GemmConfig(4, 32, 1, 4, 1), GemmConfig(16, 64, 1, 4, 1)):
        cfg = MoeKernelConfig(16, GemmConfig(16, 32), GemmConfig(16, 32), down_sum=GemmConfig(8, 32),
                              gate_up_gemv=gemv)
        out = fused_experts(*args, configs=cfg)
        assert_close(out, reference(*args), 1e-5)
        if T > 2:
            assert torch.all(out[T // 2] == 0)
    assert launched == ["evict_first" if evict_first and T == 1 else ""] * 3


@triton_only
def test_two_kernel_path_with_an_expert_over_several_blocks():
    """Repeated ids (an expert-parallel exchange sends K=1 rows, many to one expert): 40 rows of
    expert 2 span three 16-row blocks, found by the gated GEMM's own sort. (_down_sum_kernel, whose
    programs are per token whatever the blocks, takes 32-column tiles: two programs a token, where
    8-column ones made the interpreter run four times as many.)"""
    from meshserve.kernels.moe import GemmConfig, MoeKernelConfig, fused_experts
    h, w13, w2, wt, _ = make_case(40, 4, 1, seed=9)
    ids = torch.full((40, 1), 2)
    ids[5] = 0
    ids[7] = -1
    for block_m in (16, 32):
        cfg = MoeKernelConfig(block_m, GemmConfig(32, 32), GemmConfig(32, 32), down_sum=GemmConfig(32, 32))
        assert_close(fused_experts(h, w13, w2, wt, ids, configs=cfg), reference(h, w13, w2, wt, ids), 1e-5)
        assert_close(fused_experts(h, w13, w2, wt, ids.int(), configs=cfg), reference(h, w13, w2, wt, ids), 1e-5)


@triton_only
def test_two_kernel_path_bf16_and_the_builtin_choice():
    from meshserve.kernels.moe import DIRECT_MAX, default_config, fused_experts
    h, w13, w2, wt, ids = make_case(2, 64, 4, dtype=torch.bfloat16, seed=4)
    assert default_config(2, 4, 64, 64, 32).down_sum is not None  # 1/8 assignment per expert
    assert default_config(1, 8, 128, 2048, 768).down_sum is not None
    assert default_config(64, 8, 128, 2048, 768).down_sum is None
    out = fused_experts(h, w13, w2, wt, ids)
    assert out.dtype == torch.bfloat16
    assert_close(out, reference(h, w13, w2, wt, ids), 2e-2)
    assert DIRECT_MAX == 64
