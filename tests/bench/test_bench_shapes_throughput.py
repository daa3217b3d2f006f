"""shapes.py writes real configs and a working tokenizer; throughput.py drives an LLM-like object."""
import json
import types

import pytest

from meshserve.bench import shapes, throughput


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return shapes.materialize_shape("qwen3-0.6b", tmp_path_factory.mktemp("shapes") / "qwen3-0.6b")


def test_qwen3_shape_has_the_real_config_and_tokenizer_size(qwen_dir):
    from transformers import AutoConfig, AutoTokenizer

    config = json.load(open(f"{qwen_dir}/config.json"))
    expected = {"hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16,
                "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072,
                "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1000000,
                "rms_norm_eps": 1e-06, "max_position_embeddings": 40960, "model_type": "qwen3"}
    assert {k: config[k] for k in expected} == expected
    assert AutoConfig.from_pretrained(qwen_dir).hidden_size == 1024
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    assert len(tok) == 151669  # the real Qwen3 tokenizer's size, below the padded vocab_size
    assert tok.convert_tokens_to_ids("<|im_end|>") == config["eos_token_id"] == 151645
    text = "The quick brown fox jumps over the lazy dog."
    assert tok.decode(tok(text).input_ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


def test_shape_is_reused_and_names_resolve(qwen_dir, tmp_path):
    assert shapes.materialize_shape("Qwen/Qwen3-0.6B", qwen_dir) == str(qwen_dir)
    assert shapes.resolve_model("some/other-model", cache_dir=tmp_path) == "some/other-model"
    with pytest.raises(ValueError, match="known shapes"):
        shapes.materialize_shape("gpt-5", tmp_path / "x")


def test_llama_8b_config_and_weight_bytes():
    config = shapes.SHAPES["llama-3.1-8b"].config
    assert config["rope_scaling"] == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (4096, 32, 14336)
    # Llama-3.1-8B has 8,030,261,248 parameters.
    assert shapes.weight_bytes(config) == 2 * 8_030_261_248
    assert shapes.kv_bytes_per_token(config) == 32 * 8 * 128 * 2 * 2
    # docs/BENCHMARKS.md: 15.0 GB read per batch-1 decode step (the embedding table is only indexed)
    assert shapes.decode_weight_bytes(config) == pytest.approx(15.0e9, rel=0.01)
    mixtral = shapes.SHAPES["mixtral-8x7b"].config
    assert shapes.weight_bytes(mixtral) == 2 * 46_702_792_704  # Mixtral-8x7B's parameter count


class _FakeLLM:
    """Stands in for meshserve.LLM: echoes max_tokens ids and stamps vLLM-style metrics."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.tokenizer = list(range(500))  # only len() is used for random ids

    def generate(self, prompts, params, use_tqdm=True):
        params = params if isinstance(params, list) else [params] * len(prompts)
        outs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            assert all(0 <= t < 500 for t in prompt) and p.ignore_eos and p.temperature == 0
            completion = types.SimpleNamespace(token_ids=[1] * p.max_tokens)
            metrics = {"arrival_time": 10.0, "first_token_time": 10.1 + i, "finished_time": 11.0 + i}
            outs.append(types.SimpleNamespace(outputs=[completion], metrics=metrics))
        return outs


def test_throughput_main_with_a_fake_llm(monkeypatch, tmp_path):
    import meshserve
    from meshserve.commands.bench import build_parser

    created = {}

    def fake_llm(**kwargs):
        created["llm"] = _FakeLLM(**kwargs)
        return created["llm"]

    monkeypatch.setattr(meshserve, "LLM", fake_llm, raising=False)
    monkeypatch.setattr(meshserve, "SamplingParams",
                        lambda **kw: types.SimpleNamespace(**kw), raising=False)
    out = tmp_path / "tp.json"
    args = build_parser().parse_args(
        ["throughput", "my-model", "--input-len", "30", "--output-len", "20", "--num-requests", "4",
         "--range-ratio", "0.5", "--tp_size", "2", "--load-format", "dummy", "--result-json", str(out)])
    result = args.bench_main(args)
    assert created["llm"].kwargs == {"model": "my-model", "tensor_parallel_size": 2,
                                     "pipeline_parallel_size": 1, "load_format": "dummy"}
    saved = json.loads(out.read_text())
    assert saved["num_requests"] == 4
    assert 4 * 10 <= saved["total_output_tokens"] <= 4 * 30
    assert saved["output_throughput"] == pytest.approx(saved["total_output_tokens"] / saved["elapsed_time"])
    assert saved["mean_e2el_ms"] == pytest.approx(2500.0)  # (1 + 2 + 3 + 4) s / 4
    assert saved["mean_ttft_ms"] == pytest.approx(1600.0)
    assert result["requests_per_second"] == pytest.approx(4 / result["elapsed_time"])


def test_latencies_are_omitted_without_metrics():
    out = types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=[1, 2])], metrics=None)
    result = throughput.summarize([out], [[5, 6, 7]], elapsed_s=2.0)
    assert result["total_output_tokens"] == 2 and result["total_input_tokens"] == 3
    assert not any(k.endswith("_ms") for k in result)
