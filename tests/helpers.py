"""Shared test helpers: tiny random HF checkpoints and a tokenizer built offline.

Every reference value in the tests comes from `transformers` running these same checkpoints (or
from a float64 computation), never from meshserve's own output.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Hello world! How are you today? I am fine, thank you.",
    "Large language models generate text one token at a time.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "Ünïcödé tëxt — with “quotes” and emoji 🙂 too.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(path: str, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on a fixed corpus, saved as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
}

# expert fields of the tiny MoE checkpoints: 8 experts, 2 per token
MOE_DEFAULTS = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                      head_dim=16),
}
# latent attention (q_lora on; v_head_dim != nope + rope) and DeepSeekMoE: a dense first layer,
# then 8 routed experts in 2 groups (V3: 1 group kept per token), 2 per token, one shared expert
DEEPSEEK_DEFAULTS = dict(num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8,
                         qk_nope_head_dim=16, v_head_dim=20, n_routed_experts=8, n_shared_experts=1,
                         num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1)
MOE_DEFAULTS["deepseek_v3"] = dict(DEEPSEEK_DEFAULTS, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                                   norm_topk_prob=True)
MOE_DEFAULTS["deepseek_v2"] = dict(DEEPSEEK_DEFAULTS, n_group=2, topk_group=1, topk_method="group_limited_greedy",
                                   routed_scaling_factor=1.5, norm_topk_prob=False)


def tiny_config(arch: str, **overrides) -> dict:
    cfg = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    if arch == "qwen3":
        cfg["head_dim"] = 16
    cfg.update(MOE_DEFAULTS.get(arch, {}))
    cfg.update(overrides)
    return cfg


def build_checkpoint(path: str, arch: str = "llama", seed: int = 0, tokenizer: bool = True,
                     max_shard_size: Optional[str] = None, legacy_rope: Optional[dict] = None, **overrides):
    """Save a random tiny HF model (+ tokenizer) to `path`; returns the transformers model.

    legacy_rope: rewrite config.json into the Hub spelling (`rope_scaling` + `rope_theta`)."""
    import transformers

    cfg_cls, model_cls = (getattr(transformers, n) for n in ARCHS[arch])
    config = cfg_cls(**tiny_config(arch, **overrides))
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # random norms and biases, so every parameter is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        build_tokenizer(path, vocab_size=min(overrides.get("vocab_size", 320), 320))
    if legacy_rope is not None:
        cfg_path = os.path.join(path, "config.json")
        with open(cfg_path) as f:
            raw = json.load(f)
        params = raw.pop("rope_parameters", {}) or {}
        raw["rope_theta"] = legacy_rope.pop("rope_theta", params.get("rope_theta", 10000.0))
        raw["rope_scaling"] = legacy_rope or None
        with open(cfg_path, "w") as f:
            json.dump(raw, f)
        model = model_cls.from_pretrained(path, dtype=torch.float32).eval()  # as transformers reads it
    return model


# DeepSeek-V3's rope scaling, scaled down (mscale != mscale_all_dim: both YaRN factors are exercised)
DEEPSEEK_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0,
                 "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}


def build_deepseek(path: str, arch: str = "deepseek_v3", **overrides):
    """A tiny random DeepSeek checkpoint whose routing is decisive: router weights of std 0.5 (HF's
    init, 0.02, leaves near ties that rounding could flip) and a random e_score_correction_bias."""
    hf = build_checkpoint(path, arch, **overrides)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
    hf.save_pretrained(path)
    return hf


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model.generation_config.eos_token_id = None  # run to max_new_tokens without touching the logits
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def make_prompts(num: int, vocab: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """Prompts whose lengths run from 1 to max_len."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1] + [int(x) for x in torch.linspace(2, max_len, num - 1)]
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def free_port(count: int = 1) -> int:
    """A free 127.0.0.1 port (with `count`, the first of that many free consecutive ports: an MPMD
    mpirun's app k rendezvouses on MASTER_PORT + k), below Linux's ephemeral range (32768-60999).
    A port the kernel hands out for bind(0) is in that range, and between our check and the server's
    own bind, any process's outgoing connection may take it (a TCPStore once failed so in CI); below
    the range only an explicit bind can, so the race is with other tests' picks alone."""
    import random
    import socket

    for _ in range(200):
        base = random.randrange(20000, 32768 - count)
        socks = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} free consecutive ports in 20000-32767")


EMBEDDED_AGREEMENT_PROMPTS = ([f"Question {i}: what is {i} plus {i + 3}? Answer:" for i in range(16)]
                              + [f"Write one sentence about the number {i}." for i in range(16)])


def bf16_agreement_with_fp32(max_tokens: int = 32, every: int = 1, **llm_kw) -> tuple[float, float]:
    """The embedded model, greedy, 32 prompts (every `every`-th of them): (teacher-forced, free-running)
    agreement of bf16 with fp32.

    Teacher-forced: fp32 generates `max_tokens` per prompt; bf16 then reads prompt + that
    continuation in one pass (prompt_logprobs=1) and we count the positions where its top-1 token
    is fp32's token, each judged on the same prefix. Free-running: position-wise equality of the two
    greedy generations, where one early flip (two near-tied logits) makes every later token differ:
    transformers' own bf16 agrees with its fp32 on ~85% of tokens that way on this model (CPU).
    """
    from meshserve import LLM, SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    with LLM(dtype="float32", show_progress=False, max_seq_len=512, **llm_kw) as llm:
        enc = [llm.tokenizer.encode(p) for p in EMBEDDED_AGREEMENT_PROMPTS[::every]]
        fp32 = [o.outputs[0].token_ids for o in llm.generate(enc, sp, use_tqdm=False)]
    with LLM(dtype="bfloat16", show_progress=False, max_seq_len=512, **llm_kw) as llm:
        bf16 = [o.outputs[0].token_ids for o in llm.generate(enc, sp, use_tqdm=False)]
        forced = llm.generate([e + c for e, c in zip(enc, fp32)],
                              SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1), use_tqdm=False)
    same = total = 0
    for e, c, out in zip(enc, fp32, forced):
        for j, tok in enumerate(c):
            lp = out.prompt_logprobs[len(e) + j]
            same += max(lp, key=lp.get) == tok
            total += 1
    free = sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(fp32, bf16)) / sum(map(len, fp32))
    return same / total, free


def assert_logprobs_close(got, want, tol: float = 1e-3) -> None:
    """Two responses' logprobs (or any JSON holding them) alike: the same structure, tokens and ids
    exactly, numbers within tol (two servers' fp32 sums, e.g. a TP 2 context server's against an
    aggregated one's, or a prefill's against a decode's, run in another order)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (got, want)
        for k in want:
            if k == "rank" and isinstance(want[k], int) and isinstance(got[k], int):
                assert_ranks_close(got[k], want[k])
            else:
                assert_logprobs_close(got[k], want[k], tol)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (got, want)
        for g, w in zip(got, want):
            assert_logprobs_close(g, w, tol)
    elif isinstance(want, float):
        assert abs(got - want) <= tol, (got, want)
        if getattr(want, "rank", None) is not None:  # an LLM API Logprob
            assert_ranks_close(got.rank, want.rank)
    else:
        assert got == want


def assert_ranks_close(got: int, want: int) -> None:
    """Two runs' rank of a token in the vocabulary: counts of logprobs above its own, so two fp32 sums
    in another order may swap a near-tie next to it (a tie within ~1e-6 among thousands of tokens)."""
    assert isinstance(got, int) and abs(got - want) <= 2, (got, want)


def seeded_logprob_params(num: int) -> list:
    """One seeded sampling request per prompt, asking for logprobs and prompt logprobs: what a
    layout's run must reproduce exactly against a single rank's."""
    from meshserve import SamplingParams
    return [SamplingParams(max_tokens=6, temperature=0.9, top_k=40, seed=100 + i, logprobs=3, prompt_logprobs=2)
            for i in range(num)]


def assert_same_as_one_rank(path: str, prompts, sps, outs, kv_cache_config: dict) -> None:
    """`outs` (RequestOutputs of some layout) equal a one-rank LLM's: tokens exactly, logprobs and
    prompt logprobs within assert_logprobs_close's tolerance."""
    from meshserve import LLM
    with LLM(path, kv_cache_config=kv_cache_config, show_progress=False) as llm:
        want = llm.generate(prompts, sps, use_tqdm=False)
    for got, ref in zip(outs, want):
        assert got.outputs[0].token_ids == ref.outputs[0].token_ids
        assert_logprobs_close(got.outputs[0].logprobs, ref.outputs[0].logprobs)
        assert_logprobs_close(got.prompt_logprobs, ref.prompt_logprobs)


def served_token_ids(base_url: str, prompts, max_tokens: int = 8) -> list:
    """Greedy token ids of each prompt through a server's /v1/completions, with the official client."""
    from openai import OpenAI
    client = OpenAI(base_url=base_url + "/v1", api_key="EMPTY")
    model = client.models.list().data[0].id
    out = client.completions.create(model=model, prompt=prompts, max_tokens=max_tokens, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    return [c.model_extra["token_ids"] for c in sorted(out.choices, key=lambda c: c.index)]


def wait_healthy(proc, base_url: str, log_tail, timeout_s: float = 180.0) -> None:
    """Until `base_url`/health answers 200: a RuntimeError with `log_tail()` if `proc` exits first,
    a TimeoutError with it after `timeout_s`."""
    import time

    import httpx
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_tail()}")
        try:
            if httpx.get(base_url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"server not ready in {timeout_s} s:\n{log_tail()}")
