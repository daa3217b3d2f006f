"""The LLM API end to end on a tiny random checkpoint, against transformers where it has an answer:
seeds, stop strings, logprobs, penalties, n, streaming, chat, and bad input."""
import asyncio

import pytest
import torch

from helpers import build_checkpoint, hf_greedy
from meshserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    hf = build_checkpoint(path, "llama")
    return path, hf


@pytest.fixture(scope="module")
def llm(ckpt):
    with LLM(ckpt[0], kv_cache_config={"tokens_per_block": 4, "max_tokens": 2048}, max_seq_len=128,
             show_progress=False) as llm:
        yield llm


PROMPTS = ["Hello world", "The capital of France", "def add(a, b):", "1 2 3"]


def test_same_seed_same_output_and_batch_independent(llm):
    sp = SamplingParams(max_tokens=16, temperature=1.0, seed=42, ignore_eos=True)
    a = llm.generate(PROMPTS, sp, use_tqdm=False)
    b = llm.generate(PROMPTS[::-1], sp, use_tqdm=False)[::-1]
    alone = llm.generate(PROMPTS[1], sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert alone.outputs[0].token_ids == a[1].outputs[0].token_ids
    c = llm.generate(PROMPTS[1], SamplingParams(max_tokens=16, temperature=1.0, seed=43, ignore_eos=True),
                     use_tqdm=False)
    assert c.outputs[0].token_ids != a[1].outputs[0].token_ids


def test_top_k_one_equals_greedy(llm, ckpt):
    ids = llm.tokenizer.encode(PROMPTS[0])
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0.8, top_k=1, ignore_eos=True),
                       use_tqdm=False)
    assert out.outputs[0].token_ids == hf_greedy(ckpt[1], ids, 10)


def test_stop_string_cuts_across_token_boundaries(llm):
    base = llm.generate(PROMPTS[2], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), use_tqdm=False)
    text = base.outputs[0].text
    assert len(text) > 12
    stop = text[5:9]  # four characters that need not align with token boundaries
    cut = text.index(stop)
    out = llm.generate(PROMPTS[2], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=stop),
                       use_tqdm=False).outputs[0]
    assert out.text == text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    out = llm.generate(PROMPTS[2], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop],
                                                  include_stop_str_in_output=True), use_tqdm=False).outputs[0]
    assert out.text == text[:cut + len(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    base = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    ids = base.outputs[0].token_ids
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[ids[2]]),
                       use_tqdm=False).outputs[0]
    assert out.token_ids == ids[:ids.index(ids[2]) + 1] and out.stop_reason == ids[2]
    # end_id acts as EOS; min_tokens masks it until 6 tokens exist
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, end_id=ids[0], min_tokens=6),
                       use_tqdm=False).outputs[0]
    assert len(out.token_ids) >= 6 and ids[0] not in out.token_ids[:5]


def test_logprobs_equal_transformers_log_softmax(llm, ckpt):
    hf = ckpt[1]
    prompt = llm.tokenizer.encode(PROMPTS[1])
    out = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3,
                                              prompt_logprobs=2), use_tqdm=False)
    gen = out.outputs[0].token_ids
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + gen])).logits[0].double()
    ref = torch.log_softmax(logits, -1)
    for i, (tok, lp) in enumerate(zip(gen, out.outputs[0].logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert abs(lp[tok] - row[tok].item()) < 1e-4
        top = row.topk(3)
        for rank, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist()), 1):
            assert abs(lp[t] - v) < 1e-4
            # vLLM's / TensorRT-LLM's Logprob attributes: the same number, its rank, its text
            assert lp[t].logprob == float(lp[t]) and lp[t].rank == rank
            assert lp[t].decoded_token == llm.tokenizer.decode([t], skip_special_tokens=False)
        assert list(lp)[0] == tok and lp[tok].rank == 1  # greedy: the chosen token first, and the likeliest
    assert abs(out.outputs[0].cumulative_logprob - sum(ref[len(prompt) - 1 + i, t].item()
                                                       for i, t in enumerate(gen))) < 1e-3
    plp = out.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    for j in range(1, len(prompt)):
        assert abs(plp[j][prompt[j]].logprob - ref[j - 1, prompt[j]].item()) < 1e-4
        assert len(plp[j]) >= 2
        best = ref[j - 1].topk(2).indices.tolist()
        assert [plp[j][t].rank for t in best] == [1, 2]
        assert plp[j][prompt[j]].rank == vocab_rank(ref[j - 1], prompt[j], plp[j][prompt[j]].rank)
    sampled = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=1.5, seed=5, ignore_eos=True, logprobs=1),
                           use_tqdm=False).outputs[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + sampled.token_ids])).logits[0].double(), -1)
    ranks = [lp[t].rank for t, lp in zip(sampled.token_ids, sampled.logprobs)]
    assert max(ranks) > 1  # sampled, not greedy: the chosen tokens' ranks are their places in the vocabulary
    for i, (t, r) in enumerate(zip(sampled.token_ids, ranks)):
        assert r == vocab_rank(ref[len(prompt) - 1 + i], t, r), i


def vocab_rank(row: torch.Tensor, token: int, got: int) -> int:
    """`got` when it is token's place in the vocabulary by float64 row, within float32's reach (near-ties may
    swap), else the float64 rank (so the assertion shows it)."""
    v = row[token].item()
    lo, hi = (row > v + 1e-4).sum().item() + 1, (row > v - 1e-4).sum().item() + 1
    return got if lo <= got <= hi else (row > v).sum().item() + 1


def test_prompt_logprobs_survive_preemption_and_one_token_prompts(ckpt):
    """A preempted request recomputes its prompt: its prompt logprobs still come once per position
    (they came twice), equal to transformers'; a one-token prompt's are [None] (they were None)."""
    from helpers import make_prompts

    hf = ckpt[1]
    prompts = make_prompts(9, 320, 15, seed=8)
    assert len(prompts[0]) == 1
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=1)
    with LLM(ckpt[0], kv_cache_config={"tokens_per_block": 4, "max_tokens": 40, "enable_block_reuse": False},
             show_progress=False) as small:
        outs = small.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert small.get_stats()["num_preemptions"] > 0
    for prompt, out in zip(prompts, outs):
        plp = out.prompt_logprobs
        assert plp is not None and len(plp) == len(prompt) and plp[0] is None
        if len(prompt) > 1:
            with torch.no_grad():
                ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].double(), -1)
            for j in range(1, len(prompt)):
                assert abs(plp[j][prompt[j]] - ref[j - 1, prompt[j]].item()) < 1e-4


def test_repetition_penalty_matches_transformers(llm, ckpt):
    hf = ckpt[1]
    prompt = llm.tokenizer.encode(PROMPTS[3])
    out = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                              repetition_penalty=1.5), use_tqdm=False)
    hf.generation_config.eos_token_id = None
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, repetition_penalty=1.5,
                      pad_token_id=0)[0, len(prompt):].tolist()
    assert out.outputs[0].token_ids == ref


def test_n_samples_with_seed_are_reproducible(llm):
    sp = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    a = llm.generate(PROMPTS[0], sp, use_tqdm=False)
    b = llm.generate(PROMPTS[0], sp, use_tqdm=False)
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1


def test_generate_async_streams_to_the_same_text(llm):
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    full = llm.generate(PROMPTS[1], sp, use_tqdm=False).outputs[0].text

    async def run():
        parts = []
        async for out in llm.generate_async(PROMPTS[1], sp, streaming=True):
            parts.append(out)
        final = await llm.generate_async(PROMPTS[1], sp)
        return parts, final

    parts, final = asyncio.run(run())
    assert parts[-1].finished and parts[-1].outputs[0].text == full and final.outputs[0].text == full
    assert len(parts) > 1


def test_stream_interval_sends_the_first_token_then_every_n(ckpt):
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    async def run(llm):
        return [len(out.outputs[0].token_ids) async for out in llm.generate_async(PROMPTS[1], sp, streaming=True)]

    with LLM(ckpt[0], kv_cache_config={"tokens_per_block": 4}, max_seq_len=128, stream_interval=5) as llm:
        full = llm.generate(PROMPTS[1], sp, use_tqdm=False).outputs[0].token_ids
        lengths = asyncio.run(run(llm))
        with pytest.raises(Exception, match="stream_interval"):
            LLM(ckpt[0], stream_interval=0)
    assert lengths == [1, 6, 11, 12] and len(full) == 12


def test_chat_uses_the_template(llm, ckpt):
    msgs = [{"role": "user", "content": "Hi"}]
    out = llm.chat(msgs, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    ids = llm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert out.prompt_token_ids == llm.tokenizer.encode(ids, add_special_tokens=False)


# shows what reaches the template: each message, the tools' names, a template keyword
TOOLS_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] + ':' + m['content'] }}<|im_end|>{% endfor %}"
                  "{% if tools %}tools={% for t in tools %}{{ t['function']['name'] }};{% endfor %}{% endif %}"
                  "{% if style %}style={{ style }}{% endif %}{% if add_generation_prompt %}<|im_start|>{% endif %}")


def test_chat_as_vllms(llm, ckpt):
    """Text parts, a tool-calls-only assistant turn, tools and chat_template_kwargs reach the template
    as transformers renders them; continue_final_message continues the last message."""
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(ckpt[0])
    sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
                                                                    "function": {"name": "lookup", "arguments": "{}"}}]},
            {"role": "tool", "content": "42", "tool_call_id": "1"}]
    out = llm.chat(msgs, sp, chat_template=TOOLS_TEMPLATE, tools=tools, chat_template_kwargs={"style": "terse"})
    as_strings = [dict(msgs[0], content="Hi there"), dict(msgs[1], content=""), msgs[2]]
    text = ref.apply_chat_template(as_strings, tools=tools, tokenize=False, add_generation_prompt=True,
                                   chat_template=TOOLS_TEMPLATE, style="terse")
    assert "tools=lookup;" in text and "style=terse" in text and "assistant:<|im_end|>" in text
    assert out.prompt_token_ids == ref.encode(text, add_special_tokens=False)
    partial = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    out = llm.chat(partial, sp, add_generation_prompt=False, continue_final_message=True)
    text = ref.apply_chat_template(partial, tokenize=False, continue_final_message=True)
    assert text.endswith("Hel") and out.prompt_token_ids == ref.encode(text, add_special_tokens=False)
    assert llm.get_tokenizer() is llm.tokenizer


@pytest.mark.parametrize("messages,kw,match", [
    ([{"role": "user", "content": None}], {}, r"messages\[0\].content is null"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], {}, "part type 'image_url'"),
    ([[{"role": "user", "content": "ok"}], [{"role": "user", "content": 5}]], {}, "conversation 1: messages"),
    ([{"role": "user", "content": "Hi"}], {"continue_final_message": True}, "add_generation_prompt=False"),
])
def test_bad_chat_messages_are_a_value_error_naming_the_message(llm, messages, kw, match):
    with pytest.raises(ValueError, match=match):
        llm.chat(messages, SamplingParams(max_tokens=1), **kw)
    assert llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=1)).outputs[0].token_ids


@pytest.mark.parametrize("prompt,params,match", [
    ([], None, "prompts is empty"),
    ("", None, "prompt is empty"),
    ([5, 99999], None, "token id 99999"),
    (list(range(3, 200)), None, "max_seq_len is 128"),
    (list(range(3, 100)), SamplingParams(max_tokens=50), "exceeds max_seq_len=128"),
])
def test_bad_input_is_a_clear_error_and_the_next_request_succeeds(llm, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompt, params, use_tqdm=False)
    ok = llm.generate("Hello", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(ok.outputs[0].token_ids) == 3


@pytest.mark.parametrize("kw,field", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(n=0), "n"), (dict(min_p=2), "min_p"), (dict(logprobs=99), "logprobs"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(stop=[""]), "stop"),
    # booleans are not numbers here, nor anything else a switch; containers of the wrong kind name their field
    (dict(n=True), "n"), (dict(max_tokens=True), "max_tokens"), (dict(logprobs=True), "logprobs"),
    (dict(temperature=True), "temperature"), (dict(detokenize="no"), "detokenize"), (dict(ignore_eos=None), "ignore_eos"),
    (dict(skip_special_tokens=2), "skip_special_tokens"), (dict(stop=5), "stop"), (dict(stop_token_ids="12"), "stop_token_ids"),
    (dict(logit_bias=[1, 2]), "logit_bias"),
])
def test_invalid_sampling_params_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
        SamplingParams(**kw)


def test_unknown_keyword_and_architecture_are_errors(tmp_path, ckpt):
    with pytest.raises(ValueError, match="unknown key 'tensor_paralel_size'"):
        LLM(ckpt[0], tensor_paralel_size=2)
    import json, shutil
    bad = tmp_path / "bad"
    shutil.copytree(ckpt[0], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="supported: LlamaForCausalLM, MistralForCausalLM"):
        LLM(str(bad))


@pytest.mark.parametrize("cg,match", [
    ({"prefill_token_sizes": [64, 0]}, r"prefill_token_sizes=\[64, 0\]: every size must be a positive integer"),
    ({"prefill_max_tokens": -1}, "prefill_max_tokens"),
    ({"batch_sizes": [-2]}, r"batch_sizes=\[-2\]"),
])
def test_bad_cuda_graph_config_names_the_field(ckpt, cg, match):
    with pytest.raises(ValueError, match=match):
        LLM(ckpt[0], cuda_graph_config=cg)


def test_abort_ends_an_async_stream(llm):
    async def run():
        with llm._lock:  # the engine's background loop cannot step (and finish it on a busy CI machine) meanwhile
            req = llm.generate_async("Hello world", SamplingParams(max_tokens=110, ignore_eos=True), streaming=True)
            req.abort()  # long before 110 tokens exist
        return [out async for out in req]

    outs = asyncio.run(run())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) < 110
    assert llm._core.kv.usage == 0.0 or not llm._core.scheduler.running


@pytest.mark.parametrize("prompt,match", [
    ({"prompt": "Hi", "multi_modal_data": {"image": None}}, "multimodal inputs are not supported"),
    ({"prompt_token_ids": [5, 6], "lora_request": "a"}, "'lora_request' this engine does not take; accepted: prompt"),
    ({"text": "Hi"}, "'text' this engine does not take"),
    ({}, "needs 'prompt'"),
])
def test_a_prompt_dict_with_keys_the_engine_does_not_take_is_refused(llm, prompt, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompt, SamplingParams(max_tokens=1), use_tqdm=False)
    ok = llm.generate({"prompt": "Hi", "prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=1), use_tqdm=False)
    assert ok.prompt_token_ids == [5, 6]


def test_a_cache_salt_keeps_cached_prefixes_within_the_salt(llm):
    """vLLM's cache_salt (a prompt dict key): the same prompt reuses the cache only under the same salt."""
    ids = list(range(40, 80))  # 40 tokens: 9 full blocks of 4 before the last token
    sp = SamplingParams(max_tokens=1, temperature=0)

    def cached(salt):
        prompt = {"prompt_token_ids": ids} if salt is None else {"prompt_token_ids": ids, "cache_salt": salt}
        return llm.generate(prompt, sp, use_tqdm=False).num_cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-b") == 0  # another tenant does not see tenant-a's prefix
    assert cached(None) == 0  # nor does an unsalted request
    assert cached("tenant-a") == 36 and cached(None) == 36  # each reuses its own
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        llm.generate({"prompt_token_ids": ids, "cache_salt": ""}, sp, use_tqdm=False)


def test_reset_prefix_cache_forgets_cached_blocks_and_refuses_while_blocks_are_held(llm, ckpt):
    """vLLM's LLM.reset_prefix_cache(): a repeated prompt finds nothing cached after it, and its tokens
    still equal transformers'; while a stream holds KV blocks it answers False and the cache stays."""
    ids = list(range(90, 130))  # 40 tokens: 9 full blocks of 4 before the last token
    sp = SamplingParams(max_tokens=4, temperature=0)
    first = llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)
    assert first.outputs[0].token_ids == hf_greedy(ckpt[1], ids, 4)
    assert llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False).num_cached_tokens == 36
    assert llm.reset_prefix_cache() is True
    again = llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)
    assert again.num_cached_tokens == 0 and again.outputs[0].token_ids == first.outputs[0].token_ids

    async def reset_while_held():
        with llm._lock:  # the engine's background loop waits for it: one step, then the request is held
            req = llm.generate_async({"prompt_token_ids": list(range(20, 40))},
                                     SamplingParams(max_tokens=100, temperature=0, ignore_eos=True), streaming=True)
            llm._step()  # its prefill: its KV blocks are allocated
            answer = llm.reset_prefix_cache()
            req.abort()
        outs = [out async for out in req]
        return answer, outs[-1].outputs[0].finish_reason

    assert asyncio.run(reset_while_held()) == (False, "abort")  # nothing changed
    assert llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False).num_cached_tokens == 36


def test_the_cache_salt_and_priority_cross_the_engine_wire():
    """The server's path: EngineCoreRequest (msgpack) -> EngineCore.add_core_request -> the Request."""
    import msgspec

    from meshserve.engine.messages import EngineCoreRequest
    wire = msgspec.msgpack.encode([EngineCoreRequest("r", [1, 2], {"max_tokens": 1}, cache_salt="t", priority=-7)])
    [back] = msgspec.msgpack.Decoder(list[EngineCoreRequest]).decode(wire)
    assert back.cache_salt == "t" and back.priority == -7
    seen = {}

    class Core:
        def add_request(self, *args):
            seen["args"] = args

    from meshserve.engine.engine_core import EngineCore
    EngineCore.add_core_request(Core(), back)
    assert seen["args"][-2:] == ("t", -7)


def test_allowed_token_ids_greedy_equals_the_argmax_over_them(llm, ckpt):
    """vLLM's allowed_token_ids against transformers: each greedy step is the argmax of the model's
    logits over the allowed ids alone; sampled tokens stay among them too."""
    hf = ckpt[1]
    prompt, allowed = [5, 17, 33, 90, 101, 7], [11, 42, 77, 150, 201]
    ids, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(6):
            logits = hf(torch.tensor([ids])).logits[0, -1].double()
            pick = allowed[int(torch.argmax(logits[allowed]))]
            expected.append(pick)
            ids.append(pick)
    out = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0, allowed_token_ids=allowed), use_tqdm=False)
    assert out.outputs[0].token_ids == expected
    assert expected != hf_greedy(hf, prompt, 6)  # the mask changed the answer, so the test can tell
    sampled = llm.generate(prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=3, ignore_eos=True,
                                                  allowed_token_ids=allowed[:2]), use_tqdm=False)
    assert set(sampled.outputs[0].token_ids) <= set(allowed[:2])
    for bad, match in (([], "non-empty list"), ([5, 10**6], "contains token id 1000000")):
        with pytest.raises(ValueError, match=match):
            llm.generate(prompt, SamplingParams(max_tokens=1, allowed_token_ids=bad), use_tqdm=False)


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(llm, ckpt):
    """vLLM's SamplingParams.truncate_prompt_tokens on the LLM API: the model sees the prompt's last k
    tokens (greedy ids equal transformers' on those k alone); -1 keeps the last max_seq_len (128 here)."""
    hf = ckpt[1]
    prompt = list(range(3, 43))  # 40 token ids
    out = llm.generate(prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, truncate_prompt_tokens=7),
                       use_tqdm=False)
    assert out.prompt_token_ids == prompt[-7:]
    assert out.outputs[0].token_ids == hf_greedy(hf, prompt[-7:], 5)
    assert hf_greedy(hf, prompt[-7:], 5) != hf_greedy(hf, prompt, 5)  # the cut changes the answer: the test can tell
    text = "The capital of France is a city with many old streets and bridges"
    full = llm.get_tokenizer().encode(text)
    out = llm.generate(text, SamplingParams(max_tokens=1, truncate_prompt_tokens=4), use_tqdm=False)
    assert out.prompt_token_ids == full[-4:] and out.prompt == llm.get_tokenizer().decode(full[-4:])
    out = llm.generate(text, SamplingParams(max_tokens=1, truncate_prompt_tokens=500), use_tqdm=False)
    assert out.prompt_token_ids == full and out.prompt == text  # shorter than k: unchanged
    long_prompt = list(range(3, 203))  # 200 tokens, past max_seq_len 128: -1 keeps 128, leaving no room
    with pytest.raises(ValueError, match="max_seq_len is 128"):
        llm.generate(long_prompt, SamplingParams(max_tokens=1, truncate_prompt_tokens=-1), use_tqdm=False)
    out = llm.generate(long_prompt, SamplingParams(max_tokens=1, truncate_prompt_tokens=100), use_tqdm=False)
    assert out.prompt_token_ids == long_prompt[-100:]
    for bad in (0, -2, 1.5, True, "3"):
        with pytest.raises(ValueError, match="SamplingParams.truncate_prompt_tokens="):
            SamplingParams(truncate_prompt_tokens=bad)
