"""FP8 block-quantised weights: the kernels against float64, FP8 checkpoints and quantization="fp8"
against transformers reading the same FP8 checkpoint (it dequantises FP8 on a machine without a
GPU), and the refusals.

The FP8 checkpoints here are written by this file's own quantiser (`_quantize`: per [bn, bk] block,
scale = amax / 448, the format DeepSeek-V3 and the Hub's *-FP8 checkpoints use), not by meshserve's.
Each parity test also shows that the unquantised model's log-probabilities differ from the FP8
reference by far more than the tolerance, so that it would fail if the FP8 weights were not used.
"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from helpers import build_checkpoint, build_deepseek, make_prompts
from meshserve import LLM, SamplingParams

MAX_NEW = 6
KV = {"tokens_per_block": 4, "max_tokens": 2048}


def _quantize(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    bn, bk = min(block[0], n), min(block[1], k)  # one block covers a smaller dimension
    assert n % bn == 0 and k % bk == 0, (n, k, block)  # transformers needs whole blocks
    blocks = w.double().reshape(n // bn, bn, k // bk, bk)
    scale = blocks.abs().amax(dim=(1, 3)) / 448.0
    q = (blocks / scale[:, None, :, None]).float().to(torch.float8_e4m3fn).reshape(n, k)
    return q, scale.float()


QUANTISED = re.compile(r"(_proj|_proj_with_mqa|\.w[123])\.weight$")


def write_fp8_checkpoint(src: str, dst: str, block=(16, 16), per_expert: bool = True) -> None:
    """`src` (a transformers checkpoint) as an FP8 block-quantised checkpoint in `dst`: every
    projection quantised (routers, embeddings, norms, lm_head not), fused experts written per expert
    as on the Hub."""
    from safetensors.torch import load_file, save_file
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if not f.endswith(".safetensors") and f != "model.safetensors.index.json":
            with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
                b.write(a.read())
    sd = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for name, w in sd.items():
        if per_expert and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            prefix = name.rsplit(".", 1)[0]
            for e in range(w.shape[0]):
                if name.endswith("gate_up_proj"):
                    parts = dict(zip(("gate_proj", "up_proj"), w[e].chunk(2, dim=0)))
                else:
                    parts = {"down_proj": w[e]}
                for part, t in parts.items():
                    q, s = _quantize(t.contiguous(), block)
                    out[f"{prefix}.{e}.{part}.weight"], out[f"{prefix}.{e}.{part}.weight_scale_inv"] = q, s
            continue
        if w.dim() == 2 and QUANTISED.search(name):
            out[name], out[name + "_scale_inv"] = _quantize(w, block)
        else:
            out[name] = w
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)


@torch.no_grad()
def hf_logprobs(path: str, prompts, max_new: int = MAX_NEW, fp8_kv: bool = False, kv_scales=None):
    """transformers' greedy ids and the log-probability of each, reading the checkpoint at `path`;
    fp8_kv: attention reads keys (after rotary) and values rounded to float8_e4m3fn, as an FP8 KV
    cache holds them (a transformers attention function registered here); kv_scales {layer: (k, v)}:
    rounded as fp8(k / k_scale) * k_scale."""
    from transformers import AutoModelForCausalLM
    kw = {}
    if fp8_kv:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        def fp8kv(module, query, key, value, attention_mask, **kwargs):
            ks, vs = (kv_scales or {}).get(module.layer_idx, (1.0, 1.0))

            def r(t, s):
                return ((t / s).to(torch.float8_e4m3fn).to(t.dtype)) * s
            return sdpa_attention_forward(module, query, r(key, ks), r(value, vs), attention_mask, **kwargs)
        AttentionInterface.register("test_fp8_kv", fp8kv)
        kw["attn_implementation"] = "test_fp8_kv"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    ids, lps = [], []
    for p in prompts:
        seq = list(p)
        got, got_lp = [], []
        for _ in range(max_new):
            logits = model(torch.tensor([seq])).logits[0, -1].double()
            lp = torch.log_softmax(logits, -1)
            t = int(lp.argmax())
            got.append(t)
            got_lp.append(float(lp[t]))
            seq.append(t)
        ids.append(got)
        lps.append(got_lp)
    return ids, lps


def ours(path: str, prompts, max_new: int = MAX_NEW, **kw):
    kw.setdefault("kv_cache_config", KV)
    with LLM(path, show_progress=False, **kw) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True, logprobs=0),
                            use_tqdm=False)
    ids = [o.outputs[0].token_ids for o in outs]
    lps = [[d[t] for t, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
    return ids, lps


def assert_parity(got, want, unquantised, tol=2e-5):
    (gi, gl), (wi, wl), (_, ul) = got, want, unquantised
    assert gi == wi, f"meshserve {gi} != transformers (FP8 checkpoint) {wi}"
    diff = max(abs(a - b) for x, y in zip(gl, wl) for a, b in zip(x, y))
    assert diff < tol, f"log-probs differ from transformers by {diff}"
    # the FP8 weights matter: full-precision weights would be far off this tolerance
    n = min(len(x) for x in ul)
    spread = max(abs(a - b) for x, y in zip(ul, wl) for a, b in zip(x[:n], y[:n]))
    assert spread > 10 * tol, f"the unquantised model is within {spread} of the FP8 one: the test cannot tell them apart"


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(4, 320, 13)


def triton_run(backend: str, prompts) -> tuple[list, int]:
    """The prompts and tokens of a run: the Triton backend under the interpreter launches 16 KV-split
    programs per kv head, decode row and layer, milliseconds each, so it takes the two longest
    prompts (7 and 13 tokens: 2 and 4 KV blocks) and 4 tokens (3 decode steps)."""
    if backend == "triton" and not torch.cuda.is_available():
        return prompts[2:], 4
    return prompts, MAX_NEW


# ---- kernels (Triton's interpreter on CPU) against float64 ------------------------------------------

@pytest.mark.parametrize("m,n,k,block,bias", [
    (1, 96, 64, (16, 16), False), (1, 96, 64, (16, 16), True), (3, 200, 300, (32, 64), True),
    (1, 576, 576, (128, 128), False), (70, 130, 160, (64, 32), True), (5, 1000, 512, (128, 128), False),
    (17, 48, 40, (16, 32), True), (3, 200, 300, (1, 1 << 30), True), (70, 130, 160, (1, 1 << 30), False)])
def test_kernels_match_float64(m, n, k, block, bias):
    pytest.importorskip("triton")
    from meshserve.kernels.fp8 import fp8_linear_ref, quantize
    from meshserve.kernels.fp8_gemm import fp8_gemm, fp8_gemv
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the FP8 kernels need a GPU or TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(m * 1000 + n)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    q, s = quantize(w, block)
    # the reference: dequantised by this test in float64, block by block
    sn, sk = s.shape
    full = s.double().repeat_interleave(min(block[0], n), 0)[:n].repeat_interleave(min(block[1], k), 1)[:, :k]
    ref = x.double() @ (q.double() * full).T + (b.double() if bias else 0)
    for fn in (fp8_gemv, fp8_gemm):
        y = fn(x, q, s, block, b)
        assert (y.double() - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max()), fn.__name__
    y = fp8_linear_ref(x, q, s, block, b)  # the torch reference path
    assert (y.double() - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max())


@pytest.mark.parametrize("T,E,H,I,K,block", [(1, 8, 64, 32, 2, (16, 16)), (3, 8, 128, 64, 2, (32, 64)),
                                               (40, 4, 64, 96, 2, (32, 32)), (70, 8, 64, 32, 4, (16, 16))])
def test_fp8_expert_kernels_match_float64(T, E, H, I, K, block):
    """The fused MoE kernels with FP8 weights (the decode path up to 64 assignments, the aligned
    grouped GEMMs above) and VANILLA, against a float64 loop over the experts; one assignment of
    another rank (-1)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels need a GPU or TRITON_INTERPRET=1")
    from meshserve.kernels.moe import fused_experts
    from meshserve.layers.moe.experts import VanillaExperts
    g = torch.Generator().manual_seed(T * 100 + I)
    w13, w2 = torch.randn(E, 2 * I, H, generator=g) * 0.1, torch.randn(E, H, I, generator=g) * 0.1
    q13, s13 = zip(*(_quantize(w, block) for w in w13))
    q2, s2 = zip(*(_quantize(w, block) for w in w2))
    q13, s13, q2, s2 = torch.stack(q13), torch.stack(s13), torch.stack(q2), torch.stack(s2)
    x = torch.randn(T, H, generator=g)
    weights, ids = torch.topk(torch.randn(T, E, generator=g).softmax(-1), K)
    ids = ids.int()
    ids[0, 0] = -1

    def deq(q, s):
        return q.double() * s.double().repeat_interleave(block[0], 0)[:q.shape[0]].repeat_interleave(block[1], 1)
    ref = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            if e < 0:
                continue
            gu = deq(q13[e], s13[e]) @ x[t].double()
            h = torch.nn.functional.silu(gu[:I]) * gu[I:]
            ref[t] += weights[t, k].double() * (deq(q2[e], s2[e]) @ h)
    for got in (fused_experts(x, q13, q2, weights, ids, fp8=(s13, s2, block)),
                VanillaExperts("cpu", torch.float32).apply(x, q13, q2, weights, ids, fp8=(s13, s2, block))):
        assert (got.double() - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max())


def test_quantize_blocks():
    from meshserve.kernels.fp8 import FP8_DTYPE, dequantize, quantize
    g = torch.Generator().manual_seed(0)
    w = torch.randn(100, 70, generator=g) * torch.logspace(-3, 2, 70)[None, :]
    w[:32, :32] = 0  # an all-zero block
    q, s = quantize(w, (32, 32))
    assert q.dtype == FP8_DTYPE and tuple(s.shape) == (4, 3)
    assert s[0, 0] == 1.0 and (q[:32, :32].float() == 0).all()
    for i in range(4):
        for j in range(3):
            blk = w[32 * i:32 * i + 32, 32 * j:32 * j + 32]
            if blk.abs().max() > 0:  # the largest magnitude maps to 448
                assert torch.isclose(s[i, j], blk.abs().max() / 448.0)
                assert q[32 * i:32 * i + 32, 32 * j:32 * j + 32].float().abs().max() == 448.0
    back = dequantize(q, s, (32, 32))
    rel = ((back - w).abs() / w.abs().clamp_min(1e-30))[w.abs() > s.repeat_interleave(32, 0)[:100]
                                                        .repeat_interleave(32, 1)[:, :70] * 2 ** -6]
    assert rel.max() <= 2 ** -4  # e4m3: 3 mantissa bits, round to nearest


# ---- checkpoints against transformers ----------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_fp8_checkpoint_matches_transformers(tmp_path, prompts, arch):
    src, dst = str(tmp_path / "bf"), str(tmp_path / "fp8")
    build_checkpoint(src, arch, attention_bias=True) if arch == "llama" else build_checkpoint(src, arch)
    write_fp8_checkpoint(src, dst)
    want = hf_logprobs(dst, prompts)
    assert_parity(ours(dst, prompts), want, hf_logprobs(src, prompts))


def test_fp8_checkpoint_tp2_matches_transformers(tmp_path, prompts):
    src, dst = str(tmp_path / "bf"), str(tmp_path / "fp8")
    build_checkpoint(src, "qwen3", num_key_value_heads=2)  # k/v rows per rank: 16, one block
    write_fp8_checkpoint(src, dst)
    want = hf_logprobs(dst, prompts)
    assert_parity(ours(dst, prompts, tensor_parallel_size=2), want, hf_logprobs(src, prompts))


def test_online_fp8_matches_transformers_on_the_same_quantisation(tmp_path, prompts):
    """quantization="fp8" on a full-precision checkpoint whose projections are whole 128 x 128
    blocks (every fused part too): each tensor quantised in blocks of 128, as this file writes them."""
    src, dst = str(tmp_path / "bf"), str(tmp_path / "fp8")
    build_checkpoint(src, "qwen3", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                     num_key_value_heads=4, head_dim=32)
    write_fp8_checkpoint(src, dst, block=(128, 128))
    want = hf_logprobs(dst, prompts)
    assert_parity(ours(src, prompts, quantization="fp8"), want, hf_logprobs(src, prompts))


@pytest.mark.parametrize("backend", ["VANILLA", "TRITON"])
def test_fp8_qwen3_moe_checkpoint_matches_transformers(tmp_path, prompts, backend):
    """Experts in the Hub's per-expert FP8 layout, held in FP8 (TRITON: the fused kernels with block
    scales, under the interpreter here); attention FP8; the router full precision."""
    src, dst = str(tmp_path / "bf"), str(tmp_path / "fp8")
    build_checkpoint(src, "qwen3_moe")
    write_fp8_checkpoint(src, dst)
    want = hf_logprobs(dst, prompts)
    assert_parity(ours(dst, prompts, moe_config={"backend": backend}), want, hf_logprobs(src, prompts))


def test_fp8_moe_checkpoint_tp4_ep2_matches_transformers(tmp_path, prompts):
    """4 CPU ranks: attention over tp 4 (k/v heads replicated), experts placed over ep 2 and split
    over moe_tp 2 (each rank's gate / up / down slice and its block scales)."""
    src, dst = str(tmp_path / "bf"), str(tmp_path / "fp8")
    build_checkpoint(src, "qwen3_moe")
    write_fp8_checkpoint(src, dst)
    want = hf_logprobs(dst, prompts)
    assert_parity(ours(dst, prompts, tensor_parallel_size=4, moe_expert_parallel_size=2), want,
                  hf_logprobs(src, prompts))


def test_online_fp8_moe_matches_transformers_on_the_same_quantisation(tmp_path, prompts):
    """quantization="fp8" on a full-precision Qwen3-MoE checkpoint: experts and attention quantised at
    load, each tensor in blocks of 128 (every size here a multiple of 128)."""
    src, dst = str(tmp_path / "bf"), str(tmp_path / "fp8")
    build_checkpoint(src, "qwen3_moe", hidden_size=128, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                     moe_intermediate_size=128)
    write_fp8_checkpoint(src, dst, block=(128, 128))
    want = hf_logprobs(dst, prompts)
    assert_parity(ours(src, prompts, quantization="fp8"), want, hf_logprobs(src, prompts))


def test_fp8_deepseek_v3_checkpoint_matches_transformers(tmp_path, prompts):
    """DeepSeek-V3 as the Hub ships it: FP8 attention projections (kv_b_proj dequantised for the
    latent attention), FP8 routed and shared experts, fp32 router."""
    src, dst = str(tmp_path / "bf"), str(tmp_path / "fp8")
    build_deepseek(src, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
    write_fp8_checkpoint(src, dst)
    want = hf_logprobs(dst, prompts)
    assert_parity(ours(dst, prompts), want, hf_logprobs(src, prompts))


def test_online_fp8_with_random_weights_runs(tmp_path):
    src = str(tmp_path / "bf")
    build_checkpoint(src, "llama")
    with LLM(src, load_format="dummy", quantization="fp8", kv_cache_config=KV, show_progress=False) as llm:
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


# ---- per-tensor / per-channel FP8 checkpoints (AutoFP8, compressed-tensors, ModelOpt) ----------------

def write_scaled_checkpoint(src: str, dst: str, deq: str, scheme: str) -> None:
    """`src` as an FP8 checkpoint with `weight_scale` tensors (real = fp8 * scale) in `dst`, and the
    same weights dequantised by this test into a plain checkpoint in `deq` (the reference).
    scheme: "fp8-tensor" (AutoFP8 / vLLM's per-tensor format, static input scales too),
    "ct-channel" / "ct-tensor" / "ct-block" (compressed-tensors), "modelopt" (per-tensor)."""
    from safetensors.torch import load_file, save_file
    for d in (dst, deq):
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(src):
            if not f.endswith(".safetensors"):
                with open(os.path.join(src, f), "rb") as a, open(os.path.join(d, f), "wb") as b:
                    b.write(a.read())
    sd = load_file(os.path.join(src, "model.safetensors"))
    out, ref = {}, {}

    def add(name, w):
        w = w.double()
        if scheme == "ct-block":
            q, sc = _quantize(w, (16, 16))
            back = q.double() * sc.double().repeat_interleave(16, 0).repeat_interleave(16, 1)
        else:
            amax = w.abs().amax(dim=1, keepdim=True) if scheme == "ct-channel" else w.abs().amax().reshape(1)
            sc = (amax / 448.0).float()
            q = (w / sc.double()).float().to(torch.float8_e4m3fn)
            back = q.double() * sc.double()
            if scheme == "fp8-tensor":
                sc = sc.reshape(())  # AutoFP8 writes 0-d scales
        out[name], out[name[:-len("weight")] + "weight_scale"] = q, sc
        if scheme in ("fp8-tensor", "modelopt"):
            out[name[:-len("weight")] + "input_scale"] = torch.tensor(0.05)
        ref[name] = back.float()

    for name, w in sd.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            prefix = name.rsplit(".", 1)[0]
            for e in range(w.shape[0]):
                parts = dict(zip(("gate_proj", "up_proj"), w[e].chunk(2, 0))) if name.endswith("gate_up_proj") \
                    else {"down_proj": w[e]}
                for part, t in parts.items():
                    add(f"{prefix}.{e}.{part}.weight", t.contiguous())
            continue
        if w.dim() == 2 and QUANTISED.search(name):
            add(name, w)
        else:
            out[name] = ref[name] = w
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    save_file(ref, os.path.join(deq, "model.safetensors"), metadata={"format": "pt"})
    if scheme == "fp8-tensor":
        qc = {"quant_method": "fp8", "activation_scheme": "static"}
    elif scheme == "modelopt":
        qc = {"quant_method": "modelopt", "quant_algo": "FP8", "exclude_modules": ["lm_head"]}
    else:
        strategy = scheme.split("-")[1]
        weights = {"type": "float", "num_bits": 8, "strategy": strategy, "symmetric": True}
        if strategy == "block":
            weights["block_structure"] = [16, 16]
        qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                            "input_activations": {"type": "float", "num_bits": 8, "dynamic": True,
                                                                  "strategy": "token"}}}}
    _with_quant_config(dst, qc)


@pytest.mark.parametrize("scheme,arch", [("fp8-tensor", "llama"), ("ct-channel", "qwen3"), ("ct-tensor", "llama"),
                                         ("ct-block", "qwen3"), ("modelopt", "llama"), ("ct-channel", "qwen3_moe")])
def test_scaled_fp8_checkpoints_match_the_dequantised_weights(tmp_path, prompts, scheme, arch):
    """Per-tensor and per-channel FP8 checkpoints (`weight_scale`, one scale per tensor or per row; fused
    q/k/v and gate/up each with their own) and compressed-tensors blocks: meshserve on the FP8
    checkpoint against transformers on the weights this test dequantised (transformers 5 does not read
    these formats without extra packages). Static input scales are skipped: activations stay fp32."""
    src, dst, deq = (str(tmp_path / d) for d in ("bf", "fp8", "deq"))
    build_checkpoint(src, arch)
    write_scaled_checkpoint(src, dst, deq, scheme)
    want = hf_logprobs(deq, prompts)
    assert_parity(ours(dst, prompts), want, hf_logprobs(src, prompts))


def test_scaled_fp8_checkpoint_tp2(tmp_path, prompts):
    src, dst, deq = (str(tmp_path / d) for d in ("bf", "fp8", "deq"))
    build_checkpoint(src, "qwen3")
    write_scaled_checkpoint(src, dst, deq, "ct-channel")
    want = hf_logprobs(deq, prompts)
    assert_parity(ours(dst, prompts, tensor_parallel_size=2), want, hf_logprobs(src, prompts))


# ---- FP8 KV cache ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,backend", [("qwen3", "torch"), ("qwen3", "triton"), ("llama", "torch"),
                                          ("llama", "triton")])
def test_fp8_kv_cache_matches_transformers_reading_fp8_kv(tmp_path, prompts, arch, backend):
    """kv_cache_config.dtype fp8: against transformers whose attention reads keys and values rounded
    to e4m3 (the engine's cache holds them so; queries stay full precision). triton: the KV-write
    and attention kernels under the interpreter (Qwen3: the fused q/k-norm + rotary + KV write)."""
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend needs a GPU or TRITON_INTERPRET=1")
    build_checkpoint(str(tmp_path), arch)
    prompts, max_new = triton_run(backend, prompts)
    want = hf_logprobs(str(tmp_path), prompts, max_new, fp8_kv=True)
    kv = dict(KV, dtype="fp8")
    got = ours(str(tmp_path), prompts, max_new, kv_cache_config=kv, attention_backend=backend)
    assert_parity(got, want, hf_logprobs(str(tmp_path), prompts, max_new))


@pytest.mark.parametrize("naming,backend", [("compressed-tensors", "triton"), ("compressed-tensors", "torch"),
                                            ("modelopt", "torch"), ("autofp8", "torch")])
def test_fp8_kv_cache_with_the_checkpoints_kv_scales(tmp_path, prompts, naming, backend):
    """An FP8 checkpoint's calibrated KV-cache scales (self_attn.k_scale / v_scale, ModelOpt's
    k_proj.k_scale / v_proj.v_scale, AutoFP8's one kv_scale): the cache holds fp8(k / k_scale),
    against transformers reading keys and values rounded so; with the scale-1 cache farther off."""
    from safetensors.torch import load_file, save_file
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend needs a GPU or TRITON_INTERPRET=1")
    src, dst = str(tmp_path / "bf"), str(tmp_path / "fp8")
    build_checkpoint(src, "qwen3")
    write_fp8_checkpoint(src, dst)
    sd = load_file(os.path.join(dst, "model.safetensors"))
    scales = {0: (0.013, 0.0071), 1: (0.021, 0.0043)}
    if naming == "autofp8":
        scales = {i: (k, k) for i, (k, _) in scales.items()}
    for i, (k, v) in scales.items():
        pre = f"model.layers.{i}.self_attn."
        if naming == "compressed-tensors":
            sd[pre + "k_scale"], sd[pre + "v_scale"] = torch.tensor(k), torch.tensor(v)
        elif naming == "modelopt":
            sd[pre + "k_proj.k_scale"], sd[pre + "v_proj.v_scale"] = torch.tensor([k]), torch.tensor([v])
        else:
            sd[pre + "kv_scale"] = torch.tensor(k)
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    prompts, max_new = triton_run(backend, prompts)
    want = hf_logprobs(dst, prompts, max_new, fp8_kv=True, kv_scales=scales)
    got = ours(dst, prompts, max_new, kv_cache_config=dict(KV, dtype="fp8"), attention_backend=backend)
    assert_parity(got, want, hf_logprobs(dst, prompts, max_new, fp8_kv=True))


def test_fp8_kv_write_kernel_is_torchs_cast():
    """The Triton KV write into an FP8 cache rounds as torch's cast does (ties to even, saturation
    at 448, subnormals, signed zeros), bit for bit."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    from meshserve.kernels.paged_attention import store_kv
    g = torch.Generator().manual_seed(0)
    k = torch.randn(64, 2, 64, generator=g) * torch.logspace(-4, 3, 64)
    v = torch.randn(64, 2, 64, generator=g)
    k[0, 0, :8] = torch.tensor([0.0, -0.0, 448.0, 500.0, -1e6, 2 ** -9 * 1.5, 2 ** -9 * 2.5, 7.75])
    cache = torch.zeros(2, 64, 4, 2, 64, dtype=torch.float8_e4m3fn)
    slots = torch.arange(64) * 3
    store_kv(k, v, cache, slots)
    for i, src in enumerate((k, v)):
        got = cache[i].view(-1, 2, 64)[slots]
        assert torch.equal(got.view(torch.uint8), src.to(torch.float8_e4m3fn).view(torch.uint8))


def test_fp8_kv_cache_holds_twice_the_tokens_of_bf16(tmp_path):
    """The pool is sized in bytes: the same budget holds 2x the blocks of a bf16 cache (4x fp32)."""
    build_checkpoint(str(tmp_path), "llama")
    blocks = {}
    for dt in ("auto", "fp8"):
        with LLM(str(tmp_path), kv_cache_config={"tokens_per_block": 4, "cpu_kv_cache_gb": 0.001, "dtype": dt},
                 show_progress=False) as llm:
            blocks[dt] = llm.get_stats()["num_blocks"]
            out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
                               use_tqdm=False)
            assert len(out[0].outputs[0].token_ids) == 3
    assert abs(blocks["fp8"] - 4 * blocks["auto"]) <= 4, blocks  # fp32 on CPU: a quarter of the bytes


# ---- refusals -------------------------------------------------------------------------------------------

def _with_quant_config(path: str, qc) -> None:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = qc
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("qc,words", [
    ({"quant_method": "awq", "bits": 4}, "quant_method='awq' is not supported"),
    ({"quant_method": "gptq"}, "quant_method='gptq' is not supported"),
    ({"quant_method": "compressed-tensors", "config_groups": {"group_0": {"weights": {
        "type": "int", "num_bits": 4, "strategy": "group"}}}}, "weights type='int' num_bits=4 is not supported"),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "quant_algo='NVFP4' (modelopt) is not supported"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "fmt='e5m2' is not supported"),
    ({"quant_method": "fp8", "weight_block_size": [100, 128]}, "power of two"),
])
def test_unsupported_quantization_is_refused(tmp_path, qc, words):
    path = str(tmp_path)
    build_checkpoint(path, "llama")
    _with_quant_config(path, qc)
    with pytest.raises(ValueError, match=re.escape(words)) as e:
        LLM(path, kv_cache_config=KV, show_progress=False)
    assert "\n" not in str(e.value)


def test_bad_quantization_values_are_refused(tmp_path):
    path = str(tmp_path)
    build_checkpoint(path, "qwen3_moe")
    with pytest.raises(ValueError, match="quantization='int4' is not supported; accepted: fp8"):
        LLM(path, quantization="int4", kv_cache_config=KV, show_progress=False)
    with pytest.raises(ValueError, match="backend='CUTLASS' has no FP8 experts"):
        LLM(path, quantization="fp8", moe_config={"backend": "CUTLASS"}, kv_cache_config=KV, show_progress=False)


def test_fp8_kv_cache_refusals(tmp_path):
    path = str(tmp_path)
    build_deepseek(path)
    with pytest.raises(ValueError, match="kv_cache_config.dtype='fp8' on DeepseekV3ForCausalLM: the latent"):
        LLM(path, kv_cache_config=dict(KV, dtype="fp8"), show_progress=False)
    with pytest.raises(ValueError, match="kv_cache_config.dtype='int8' is not supported; accepted: auto, fp8"):
        LLM(path, kv_cache_config=dict(KV, dtype="int8"), show_progress=False)


def test_shards_off_the_block_grid_are_refused(tmp_path):
    """Blocks of 32 rows, k/v of 16 rows per rank at tp2: a shard would start inside a block."""
    src, dst = str(tmp_path / "bf"), str(tmp_path / "fp8")
    build_checkpoint(src, "qwen3", num_key_value_heads=2, hidden_size=64, intermediate_size=128)
    write_fp8_checkpoint(src, dst, block=(32, 32))
    with pytest.raises(Exception, match="does not start on a block of 32"):
        LLM(dst, tensor_parallel_size=2, kv_cache_config=KV, show_progress=False)
    # rank 0 failed after joining the process group: it left it, so the next engine of this process starts
    with LLM(src, tensor_parallel_size=2, kv_cache_config=KV, show_progress=False) as llm:
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2



@pytest.mark.parametrize("online", [False, True])
def test_which_layers_hold_fp8(tmp_path, online):
    """FP8 checkpoint and quantization="fp8": attention and experts FP8, routers full precision
    (for DeepSeek-V3 also kv_b_proj, read as a matrix by the latent attention)."""
    from meshserve.models.config import ModelConfig
    from meshserve.models.loader import build_model, load_weights, plan_fp8
    src, dst = str(tmp_path / "bf"), str(tmp_path / "fp8")
    build_deepseek(src, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
    write_fp8_checkpoint(src, dst)
    path = src if online else dst
    cfg = ModelConfig.from_pretrained(path)
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    plan = plan_fp8(model, cfg, path, "fp8" if online else None)
    load_weights(model, path, show_progress=False, fp8=plan)
    attn, moe = model.model.layers[1].self_attn, model.model.layers[1].mlp
    fp8 = torch.float8_e4m3fn
    assert attn.q_b_proj.weight.dtype == fp8 and attn.o_proj.weight.dtype == fp8
    assert attn.kv_a_proj_with_mqa.weight.dtype == fp8
    assert attn.kv_b_proj.weight.dtype == torch.float32 and moe.gate.weight.dtype == torch.float32
    assert moe.experts.w13.dtype == fp8 and moe.experts.w2.dtype == fp8
    assert moe.shared_experts.gate_up_proj.weight.dtype == fp8
    assert model.model.layers[0].mlp.down_proj.weight.dtype == fp8  # the dense first layer


def test_sharded_fp8_checkpoint_with_an_index(tmp_path, prompts):
    """The Hub's FP8 checkpoints are sharded with model.safetensors.index.json: weights and their scales
    in different files, found through the index."""
    from safetensors.torch import load_file, save_file
    src, dst = str(tmp_path / "bf"), str(tmp_path / "fp8")
    build_checkpoint(src, "qwen3")
    write_fp8_checkpoint(src, dst)
    sd = load_file(os.path.join(dst, "model.safetensors"))
    os.remove(os.path.join(dst, "model.safetensors"))
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[0::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: sd[n] for n in part}, os.path.join(dst, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    assert any(weight_map[n] != weight_map.get(n + "_scale_inv") for n in names if n + "_scale_inv" in sd)
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    want = hf_logprobs(dst, prompts)
    assert_parity(ours(dst, prompts), want, hf_logprobs(src, prompts))
