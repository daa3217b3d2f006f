"""The engine on a CUDA GPU, on a tiny Qwen3 (q/k norm, MQA): in fp32 the Triton attention backend
gives transformers' greedy ids with decode-batch graphs, with mixed-step (prefill) graphs, with
exact-size graphs and no padding, eagerly, and through the multi-process executor on NCCL; in bf16
graphs on and off give the same tokens; and bf16 agrees with fp32 on the embedded model. (The CPU
parity suite also runs unchanged on a GPU machine.)"""
import pytest

from helpers import bf16_agreement_with_fp32, build_checkpoint, hf_greedy, make_prompts
from meshserve import LLM, SamplingParams

pytestmark = pytest.mark.gpu
SP = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gpu-qwen3"))
    hf = build_checkpoint(path, "qwen3", num_hidden_layers=3, num_key_value_heads=1)
    prompts = make_prompts(12, 320, 40, seed=5)
    return path, prompts, [hf_greedy(hf, p, 16) for p in prompts]


def generate(path, prompts, **kw):
    with LLM(path, show_progress=False, kv_cache_config={"tokens_per_block": 16, "max_tokens": 8192}, **kw) as llm:
        runner = llm._core.executor.runner
        assert runner.attn_backend.name == "triton"
        graphs = runner.graphs
        outs = llm.generate(prompts, SP, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], graphs


def test_fp32_decode_graphs_match_transformers(ckpt):
    """Decode batches replay the batch-size graphs (prompts run eagerly here: no mixed-step graphs)."""
    path, prompts, ref = ckpt
    got, graphs = generate(path, prompts, dtype="float32", cuda_graph_config={"prefill_max_tokens": 0})
    assert graphs is not None and graphs.replays > 0
    assert got == ref


@pytest.mark.parametrize("max_num_tokens", [8192, 48])
def test_fp32_prefill_graphs_match_transformers(ckpt, max_num_tokens):
    """Mixed steps replay the token-bucket graphs (whole prompts up to 320 tokens; with a 48-token
    budget, prompt chunks next to decode rows) and still give transformers' ids."""
    path, prompts, ref = ckpt
    with LLM(path, show_progress=False, dtype="float32", max_num_tokens=max_num_tokens,
             kv_cache_config={"tokens_per_block": 16, "max_tokens": 8192}) as llm:
        pg = llm._core.executor.runner.prefill_graphs
        assert pg is not None and pg.sizes[-1] == min(2048, max_num_tokens)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, SP, use_tqdm=False)]
        assert pg.replays > 0
        # then smaller buckets than the batch's: nothing stale from the bigger steps may leak
        alone = [llm.generate([p], SP, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:3]]
    assert got == ref
    assert alone == ref[:3]


def test_fp32_exact_size_graphs_without_padding_match_transformers(ckpt):
    """enable_padding false: decode batches of exactly 1 or 4 sequences replay graphs, the others
    and every mixed step run eagerly; the ids are transformers' either way."""
    path, prompts, ref = ckpt
    got, graphs = generate(path, prompts, dtype="float32",
                           cuda_graph_config={"enable_padding": False, "batch_sizes": [1, 4]})
    assert graphs.sizes == [1, 4] and not graphs.can_run(3) and graphs.can_run(4)
    assert got == ref


def test_bf16_same_tokens_with_and_without_prefill_graphs(ckpt):
    path, prompts, _ = ckpt
    with_graphs, _ = generate(path, prompts, dtype="bfloat16", max_num_tokens=64)
    without, _ = generate(path, prompts, dtype="bfloat16", max_num_tokens=64,
                          cuda_graph_config={"prefill_max_tokens": 0})
    assert with_graphs == without


def test_fp32_eager_matches_transformers(ckpt):
    path, prompts, ref = ckpt
    got, graphs = generate(path, prompts, dtype="float32", cuda_graph_config=None)
    assert graphs is None and got == ref


def test_bf16_same_tokens_with_and_without_graphs(ckpt):
    path, prompts, _ = ckpt
    with_graphs, _ = generate(path, prompts, dtype="bfloat16")
    without, _ = generate(path, prompts, dtype="bfloat16", cuda_graph_config={"enable": False})
    assert with_graphs == without


def test_embedded_model_bf16_agrees_with_fp32():
    """Triton attention, CUDA graphs and the fused kernels in bf16 against fp32 on the embedded
    model: >= 95% of tokens agree, each judged on fp32's prefix (helpers.bf16_agreement_with_fp32)."""
    try:
        from meshserve.models.resolve import default_gguf_path
        default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    forced, free = bf16_agreement_with_fp32()
    print(f"bf16 vs fp32 on the GPU: teacher-forced {forced:.3f}, free-running {free:.3f}")
    assert forced >= 0.95, f"bf16 agrees with fp32 on {forced:.1%} of tokens (teacher-forced)"


def test_tp1_through_the_multiprocess_executor_with_nccl(ckpt):
    """One rank through the same executor path as TP>1 (process group on NCCL, control channel,
    KV sizing by message): tokens equal transformers."""
    import torch.distributed as dist

    path, prompts, ref = ckpt
    with LLM(path, show_progress=False, dtype="float32", orchestrator_type="mp",
             kv_cache_config={"tokens_per_block": 16, "max_tokens": 8192}) as llm:
        assert type(llm._core.executor).__name__ == "MultiProcExecutor"
        assert dist.get_backend() == "nccl"
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, SP, use_tqdm=False)]
    assert got == ref
