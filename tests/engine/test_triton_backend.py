"""The engine's Triton attention backend (the tile plan of every step, chunked prefill beside decode
rows, the KV write, the paged attention kernel) against transformers' greedy ids in fp32, with the
small-step and the large-step prefill tiles, the latter chosen through LLM(kernel_config=...): on
CPU under Triton's interpreter, on a GPU directly (there with CUDA graphs for decode and mixed
steps)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from helpers import build_checkpoint, hf_greedy, make_prompts  # noqa: E402
from meshserve import LLM, SamplingParams  # noqa: E402
from meshserve.kernels import paged_attention as pa  # noqa: E402

SP = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
GROUP = 4  # query heads per kv head of the checkpoint below
# Under the interpreter every program costs milliseconds, and a decode row launches 16 KV-split
# programs per layer (decode_num_splits on INTERPRETER_SMS): the tests below run the fewest prompts
# and tokens that still reach each path they name; greedy ids are compared with the prefix of
# transformers' (greedy decoding of fewer tokens gives the first of the same ids).
SHORT = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)  # two decode steps


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("triton-cpu"))
    hf = build_checkpoint(path, "qwen3", num_hidden_layers=2, num_key_value_heads=1)  # GQA group 4
    # lengths 1, 2, 18, 34, 50, 66: the 66-token prompt's first decode step reads 67 keys, past one
    # 64-key decode tile (the > SMALL_DECODE batches' tiles, two per split: both run)
    prompts = make_prompts(6, 320, 66, seed=5)
    return path, prompts, [hf_greedy(hf, p, SP.max_tokens) for p in prompts]


def ids(llm, prompts, sp):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


def prefix(ref, sp):
    return [r[:sp.max_tokens] for r in ref]


# (kernel_config, its large-step threshold, rows of large-step tiles, rows of small-step tiles)
CASES = {
    "small-step": ({}, 2048, 256, 128),  # the H200's defaults: every step here is a small one
    # every step past 16 tokens planned with the large prefill tiles, which have 64 rows, not 256
    "large-step": ({"attn_prefill_large_tokens": 16, "attn_prefill_rows": 64}, 16, 64, 128),
}


@pytest.mark.parametrize("tiles", list(CASES))
def test_triton_backend_under_the_interpreter_gives_transformers_ids(ckpt, tiles, monkeypatch):
    path, prompts, ref = ckpt
    # lengths 1, 18, 66: a step of 1 + 18 + a 29-token chunk, later one of two decode rows beside the
    # 66-token prompt's last 37 tokens (both > 16 tokens: large tiles in the large-step case), and
    # decode steps
    prompts, ref = [prompts[i] for i in (0, 2, 5)], [ref[i] for i in (0, 2, 5)]
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    kernel_config, large_tokens, rows, rows_small = CASES[tiles]
    planned = []
    real = pa.plan_tiles
    monkeypatch.setattr(pa, "plan_tiles", lambda lens, bq, dev: planned.append((sum(lens), bq)) or real(lens, bq, dev))
    # 48 tokens a step: the 66-token prompt is chunked, chunks share steps with decode rows
    with LLM(path, show_progress=False, dtype="float32", attention_backend="triton", max_num_tokens=48,
             kv_cache_config={"tokens_per_block": 16, "max_tokens": 2048}, kernel_config=kernel_config) as llm:
        runner = llm._core.executor.runner
        assert runner.attn_backend.name == "triton"
        assert runner.attn_backend.settings.attn_prefill_rows == rows
        got = ids(llm, prompts, sp)
    assert got == prefix(ref, sp)
    prefill = {(t, bq) for t, bq in planned if bq > 1}
    assert prefill and any(bq == 1 for _, bq in planned)  # prefill / mixed steps and decode steps
    for t, bq in prefill:  # each step's tiles: by its token count, with the configured rows
        assert bq == (rows_small if t <= large_tokens else rows) // GROUP, (t, bq)
    assert any(t > large_tokens for t, _ in prefill) == (tiles == "large-step")


class _Spy:
    """Stands in for a Triton kernel: records each launch's keyword arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(dict(kwargs, _rows=args[0].shape[0]))  # rows: the first tensor's (q)
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_decode_tiles_from_kernel_config(ckpt, monkeypatch):
    """kernel_config.attn_decode_block_n / attn_decode_split_tiles reach the decode launches (16-key
    tiles, one tile per KV split, so the splits' merge runs) and the ids stay transformers'."""
    path, prompts, ref = ckpt
    spy = _Spy(pa._attn_kernel)
    monkeypatch.setattr(pa, "_attn_kernel", spy)
    with LLM(path, show_progress=False, dtype="float32", attention_backend="triton",
             kv_cache_config={"tokens_per_block": 16, "max_tokens": 2048},
             kernel_config={"attn_decode_block_n": 16, "attn_decode_split_tiles": 1}) as llm:
        got = ids(llm, prompts[:3], SHORT)  # the 18-token prompt's decode steps read 19, 20 keys: 2 splits
    assert got == prefix(ref[:3], SHORT)
    decode = [k for k in spy.launches if k["BLOCK_Q"] == 1]
    assert decode and all(k["BLOCK_N"] == 16 and k["SPLIT_TILES"] == 1 for k in decode)
    assert any(k["NUM_SPLITS"] > 1 for k in decode)
    prefill = [k for k in spy.launches if k["BLOCK_Q"] > 1]
    assert prefill and all(k["BLOCK_N"] != 16 for k in prefill)  # prefill tiles keep their own setting


def BATCH(xs):
    """A decode batch of SMALL_DECODE + 1 sequences: the 1- and 2-token prompts four times each and the
    66-token one (its 67 keys take two of the larger batches' 64-key tiles)."""
    return xs[:2] * 4 + xs[5:6]


def test_decode_tiles_by_batch_when_unset(ckpt, monkeypatch):
    """Without attn_decode_* set, a decode step of up to 8 sequences takes 128-key tiles, one per
    split, 4 warps; a larger one 64-key tiles, two per split, 2 warps (paged_attention.decode_tiles);
    the ids stay transformers' either way."""
    path, prompts, ref = ckpt
    spy = _Spy(pa._attn_kernel)
    monkeypatch.setattr(pa, "_attn_kernel", spy)
    many, many_ref = BATCH(prompts), BATCH(ref)
    with LLM(path, show_progress=False, dtype="float32", attention_backend="triton",
             kv_cache_config={"tokens_per_block": 16, "max_tokens": 4096}) as llm:
        assert ids(llm, prompts[:1], SHORT) == prefix(ref[:1], SHORT)
        assert ids(llm, many, SHORT) == prefix(many_ref, SHORT)
    decode = [(k["_rows"], k["BLOCK_N"], k["SPLIT_TILES"], k["num_warps"]) for k in spy.launches
              if k["BLOCK_Q"] == 1]
    assert any(t == 1 for t, *_ in decode) and any(t > 8 for t, *_ in decode)
    assert all((n, tiles, w) == ((128, 1, 4) if t <= 8 else (64, 2, 2)) for t, n, tiles, w in decode), decode


def test_fused_rope_attention_gives_transformers_ids(ckpt, monkeypatch):
    """kernel_config.fuse_rope_attention: decode steps rotate q, apply Qwen3's q/k norm and write
    the new token's k / v inside the attention kernel (rotary_store_kv runs only in prefill and
    mixed steps); greedy ids stay transformers'."""
    from meshserve.layers.attention.backends import triton as backend

    path, prompts, ref = ckpt
    spy = _Spy(pa._attn_kernel)
    monkeypatch.setattr(pa, "_attn_kernel", spy)
    separate = []
    real = backend.rotary_store_kv
    monkeypatch.setattr(backend, "rotary_store_kv", lambda q, *a, **k: separate.append(q.shape[0]) or real(q, *a, **k))
    with LLM(path, show_progress=False, dtype="float32", attention_backend="triton",
             kv_cache_config={"tokens_per_block": 16, "max_tokens": 2048},
             kernel_config={"fuse_rope_attention": True, "attn_decode_block_n": 16}) as llm:
        # lengths 1, 18, 66: 16-key tiles over 2..3, 19..20 and 67..68 keys, so the split that writes the
        # new token (the last active one) is split 0, split 1 and split 4
        got = ids(llm, [prompts[i] for i in (0, 2, 5)], SHORT)
    assert got == prefix([ref[i] for i in (0, 2, 5)], SHORT)
    decode = [k for k in spy.launches if k["BLOCK_Q"] == 1]
    assert decode and all(k.get("ROPE") for k in decode) and any(k["NUM_SPLITS"] > 1 for k in decode)
    assert not any(k.get("ROPE") for k in spy.launches if k["BLOCK_Q"] > 1)
    assert separate and len(separate) < len(spy.launches)  # prefill steps only


def test_decode_l2_prefetch_names_each_layers_o_proj(ckpt, monkeypatch):
    """kernel_config.decode_l2_prefetch: a decode step of up to 8 sequences hands each layer's
    attention its own o_proj weight to prefetch (kernels/prefetch.py; the prefetch instruction itself
    runs only on a GPU), larger decode steps and prompt steps hand none; the ids stay transformers'."""
    path, prompts, ref = ckpt
    calls = []
    real = pa.paged_attention
    monkeypatch.setattr(pa, "paged_attention",
                        lambda q, *a, **k: calls.append((q.shape[0], a[6], k.get("prefetch"))) or real(q, *a, **k))
    many, many_ref = BATCH(prompts), BATCH(ref)
    with LLM(path, show_progress=False, dtype="float32", attention_backend="triton",
             kv_cache_config={"tokens_per_block": 16, "max_tokens": 4096},
             kernel_config={"decode_l2_prefetch": True}) as llm:
        assert llm._core.executor.runner.attn_backend.settings.decode_l2_prefetch
        layers = llm._core.executor.runner.model.model.layers
        o_proj = [layer.self_attn.o_proj.weight for layer in layers]
        assert ids(llm, prompts[:1], SHORT) == prefix(ref[:1], SHORT)
        assert ids(llm, many, SHORT) == prefix(many_ref, SHORT)
    small = [c for c in calls if c[1] == 1 and c[0] <= pa.SMALL_DECODE]
    assert small and all(w is not None for *_, w in small)
    # every layer in turn, each naming its own weight (the same tensor object, not a copy)
    n = len(o_proj)
    assert all(w is o_proj[i % n] for i, (*_, w) in enumerate(small)), [w.shape for *_, w in small]
    large = [c for c in calls if c[1] == 1 and c[0] > pa.SMALL_DECODE]
    assert large and all(w is None for *_, w in large)
    assert all(w is None for t, bq, w in calls if bq > 1)


@pytest.mark.parametrize("nbytes,parts", [(1, 1), (127, 3), (128 * 64, 64), (16_777_216, 64), (1000, 12),
                                          (4096 * 2048 * 2 + 6, 12)])
def test_l2_prefetch_lines_cover_the_weight_once(nbytes, parts):
    """The prefetching programs share the weight's 128-byte lines: together every line from its first
    byte to its last, none twice (the split runs under the interpreter; the prefetch itself on a GPU)."""
    from meshserve.kernels.prefetch import line_ranges

    ranges = line_ranges(nbytes, parts)
    assert len(ranges) == parts
    covered = [line for first, last in ranges for line in range(first, last)]
    assert covered == list(range(-(-nbytes // 128)))  # in program order, each line once


def test_triton_backend_on_cpu_without_the_interpreter_is_refused(ckpt, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="attention_backend='triton' needs a CUDA device"):
        LLM(ckpt[0], show_progress=False, dtype="float32", device="cpu", attention_backend="triton")
