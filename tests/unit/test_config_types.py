"""LLM() / serve YAML settings: an integer setting given a boolean is refused naming it (pydantic
took True as 1, so `moe_expert_parallel_size=True` ran as 1), while real booleans and integers pass."""
from __future__ import annotations

import re

import pytest

from meshserve.config import build_llm_args


@pytest.mark.parametrize("kw,where", [
    (dict(moe_expert_parallel_size=True), "moe_expert_parallel_size=True"),
    (dict(tensor_parallel_size=False), "tensor_parallel_size=False"),
    (dict(cache_transceiver_config={"max_tokens_in_buffer": True}), "cache_transceiver_config.max_tokens_in_buffer=True"),
    (dict(kv_cache_config={"tokens_per_block": True}), "kv_cache_config.tokens_per_block=True"),
    (dict(cuda_graph_config={"batch_sizes": [1, True]}), "cuda_graph_config.batch_sizes"),
    (dict(kv_cache_config={"free_gpu_memory_fraction": True}), "kv_cache_config.free_gpu_memory_fraction=True"),
])
def test_a_boolean_for_an_integer_is_refused_naming_it(kw, where):
    with pytest.raises(ValueError) as e:
        build_llm_args("LLM()", model="m", **kw)
    msg = str(e.value)
    assert where in msg and "\n" not in msg, msg


def test_booleans_and_integers_where_they_belong_pass():
    a = build_llm_args("LLM()", model="m", tensor_parallel_size=2, moe_expert_parallel_size=2,
                       cache_transceiver_config={"verify_payload": True, "max_tokens_in_buffer": 64},
                       kv_cache_config={"enable_block_reuse": False, "tokens_per_block": 16})
    assert (a.tensor_parallel_size, a.moe_expert_parallel_size) == (2, 2)
    assert a.cache_transceiver_config.verify_payload is True and a.cache_transceiver_config.max_tokens_in_buffer == 64
    assert a.kv_cache_config.enable_block_reuse is False and a.kv_cache_config.tokens_per_block == 16


def test_triton_experts_without_a_gpu_are_refused_before_loading(tmp_path, monkeypatch):
    """moe_config.backend=TRITON on a CPU was refused only when the engine built the model; now
    check_parallel_layout (the CLI's and LLM()'s check before loading) says so in one line. With
    Triton's interpreter (tests) it is allowed."""
    from helpers import build_checkpoint
    from meshserve.engine.setup import check_parallel_layout
    from meshserve.models.config import ModelConfig

    build_checkpoint(str(tmp_path), "qwen3_moe", tokenizer=False)
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    args = build_llm_args("LLM()", model=str(tmp_path), device="cpu", moe_config={"backend": "TRITON"})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"^moe_config.backend='TRITON' cannot run here: it needs a CUDA device"):
        check_parallel_layout(args, cfg)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_parallel_layout(args, cfg)
    check_parallel_layout(build_llm_args("LLM()", model=str(tmp_path), device="cpu",
                                         moe_config={"backend": "VANILLA"}), cfg)


@pytest.mark.parametrize("kw,hint", [
    (dict(max_model_len=4096), "unknown key 'max_model_len' in LLM() (vLLM's name; here: max_seq_len); accepted keys: "),
    (dict(gpu_memory_utilization=0.9), "(vLLM's name; here: kv_cache_config.free_gpu_memory_fraction)"),
    (dict(enforce_eager=True), "(vLLM's name; here: cuda_graph_config={'enable': False})"),
    (dict(tensor_paralel_size=2), "unknown key 'tensor_paralel_size' in LLM() (did you mean 'tensor_parallel_size'?)"),
    (dict(kv_cache_config={"free_gpu_mem_fraction": 0.5}),
     "unknown key 'kv_cache_config.free_gpu_mem_fraction' in LLM() (did you mean 'free_gpu_memory_fraction'?); "
     "accepted keys: cpu_kv_cache_gb, dtype, enable_block_reuse, free_gpu_memory_fraction, max_tokens, tokens_per_block"),
    (dict(kv_cache_config={"max_model_len": 8}), "unknown key 'kv_cache_config.max_model_len' in LLM(); accepted"),
    (dict(zz=1), "unknown key 'zz' in LLM(); accepted keys: attention_backend, "),  # nothing close: no hint
])
def test_an_unknown_key_names_the_one_it_is_close_to(kw, hint):
    with pytest.raises(ValueError) as e:
        build_llm_args("LLM()", model="m", **kw)
    assert hint in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_every_vllm_name_points_at_a_setting_that_exists():
    from meshserve.config import VLLM_KEYS, LlmArgs
    for ours in VLLM_KEYS.values():
        top, _, sub = ours.split("=")[0].partition(".")
        assert top in LlmArgs.model_fields, ours
        if sub:
            ann = LlmArgs.model_fields[top].annotation
            model = next(a for a in getattr(ann, "__args__", (ann,)) if hasattr(a, "model_fields"))
            assert sub in model.model_fields, ours


@pytest.mark.parametrize("kw,hint", [
    ({"temprature": 0.5}, "did you mean 'temperature'?"),
    ({"max_token": 4}, "did you mean 'max_tokens'?"),
    ({"max_new_tokens": 4}, "here: max_tokens"),
    ({"num_return_sequences": 2}, "here: n"),
    ({"use_beam_search": True}, "beam search is LLM.beam_search"),
    ({"guided_json": {}}, "here: structured_outputs=StructuredOutputsParams(json=..."),
    ({"frobnicate": 1}, "accepted: max_tokens, min_tokens, temperature"),
])
def test_an_unknown_sampling_argument_says_what_to_use_instead(kw, hint):
    from meshserve import SamplingParams
    with pytest.raises(TypeError, match="unexpected keyword argument") as exc:
        SamplingParams(**kw)
    assert hint in str(exc.value) and next(iter(kw)) in str(exc.value)
    assert SamplingParams(temperature=0.5, max_tokens=4).max_tokens == 4  # known ones as before


def test_every_foreign_sampling_hint_names_no_field_that_exists():
    """A hint is for names SamplingParams lacks: one it has would never reach the hint."""
    import dataclasses

    from meshserve.sampling_params import FOREIGN_ARGS, SamplingParams
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert not fields & set(FOREIGN_ARGS)
    for hint in FOREIGN_ARGS.values():  # "here: x" names a field that exists
        if "here: " in hint and "temperature=0" not in hint:
            assert re.match(r"\w+", hint.split("here: ")[1]).group() in fields, hint
