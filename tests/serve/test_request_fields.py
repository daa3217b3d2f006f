"""Request fields a vLLM or OpenAI client sends that this server cannot honour are 400s naming the field
(beam search, priorities, structural tags, ...), a misspelt known field is a 400 naming the field it is
close to, and vLLM's `add_special_tokens` is honoured (completions add the BOS by default, chat does
not), checked against the checkpoint's own tokenizer, which adds one. Genuinely unknown fields stay
ignored with a warning (test_input_limits.py)."""
from __future__ import annotations

import json
import os

import httpx
import pytest

from helpers import build_checkpoint
from serve_util import start_server

MODEL = "tiny-bos"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "Hello world", "max_tokens": 2}


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory) -> str:
    """The tiny Llama of tests/helpers.py whose tokenizer adds <|endoftext|> before each text, as
    Llama's tokenizers add <s>."""
    from tokenizers import Tokenizer, processors

    path = str(tmp_path_factory.mktemp("models") / MODEL)
    build_checkpoint(path, "llama", max_position_embeddings=512)
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    bos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
                                                       special_tokens=[("<|endoftext|>", bos)])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    cfg["add_bos_token"] = True
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return path


@pytest.fixture(scope="module")
def server(bos_model):
    srv = start_server(bos_model, "--max_seq_len", "256", "--max_batch_size", "4", "--trust_request_chat_template")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def reference(bos_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(bos_model)


def post(http: httpx.Client, kind: str, extra: dict) -> httpx.Response:
    body = {**(CHAT if kind == "chat" else COMPLETION), **extra}
    return http.post("/v1/chat/completions" if kind == "chat" else "/v1/completions", json=body)


REFUSED = [  # (endpoint, field, value, words of the message)
    ("completion", "guided_whitespace_pattern", r"\s*", "structured outputs take structured_outputs"),
    ("chat", "guided_whitespace_pattern", " ", "not supported by this server"),
    ("chat", "priority", 1, "first come, first served"),
    ("chat", "functions", [{"name": "f", "parameters": {}}], "function calling"),
    ("chat", "modalities", ["text", "audio"], "modalities"),
    ("completion", "kv_transfer_params", {"do_remote_decode": True}, "disaggregated_params"),
]


@pytest.mark.parametrize("kind,field,value,words", REFUSED, ids=[f"{r[0]}-{r[1]}" for r in REFUSED])
def test_a_setting_the_server_cannot_honour_is_a_400_naming_it(http, kind, field, value, words):
    r = post(http, kind, {field: value})
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["param"] == field and err["message"].startswith(f"{field}=") and words in err["message"], err
    assert "\n" not in err["message"]
    assert post(http, kind, {}).status_code == 200  # the server goes on


@pytest.mark.parametrize("kind,field,value", [("completion", "use_beam_search", False), ("chat", "priority", 0),
                                              ("completion", "length_penalty", 1.0), ("chat", "modalities", ["text"]),
                                              ("chat", "echo", False), ("completion", "guided_json", None)])
def test_the_same_fields_asking_for_nothing_are_accepted(http, kind, field, value):
    r = post(http, kind, {field: value})
    assert r.status_code == 200, (r.status_code, r.text)


@pytest.mark.parametrize("kind,field,close", [("completion", "temprature", "temperature"),
                                              ("chat", "max_token", "max_tokens"),
                                              ("chat", "logprob", "logprobs"),
                                              ("completion", "top_logprobs", "logprobs"),
                                              ("chat", "stream_option", "stream_options")])
def test_a_misspelt_field_is_a_400_naming_the_field_it_is_close_to(http, kind, field, close):
    body = {**(CHAT if kind == "chat" else COMPLETION), field: 1}
    body.pop(close, None)  # a misspelling, not a second copy of a field the body already has
    r = http.post("/v1/chat/completions" if kind == "chat" else "/v1/completions", json=body)
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["param"] == field and f"did you mean '{close}'" in err["message"], err


def prompt_ids(http, kind: str, extra: dict) -> list[int]:
    r = post(http, kind, {"return_token_ids": True, **extra})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["prompt_token_ids"] if kind == "chat" else body["choices"][0]["prompt_token_ids"]


def test_add_special_tokens_as_vllm(http, reference):
    text = COMPLETION["prompt"]
    with_bos, without = reference.encode(text), reference.encode(text, add_special_tokens=False)
    assert with_bos != without  # the reference tokenizer adds a BOS, so the field is visible
    assert prompt_ids(http, "completion", {}) == with_bos
    assert prompt_ids(http, "completion", {"add_special_tokens": True}) == with_bos
    assert prompt_ids(http, "completion", {"add_special_tokens": False}) == without
    rendered = reference.apply_chat_template(CHAT["messages"], tokenize=False, add_generation_prompt=True)
    assert prompt_ids(http, "chat", {}) == reference.encode(rendered, add_special_tokens=False)
    assert prompt_ids(http, "chat", {"add_special_tokens": True}) == reference.encode(rendered)


# concatenates each message's content as SmolLM2's template does: a missing content is an error there
CONCAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_an_assistant_turn_of_only_tool_calls_renders_as_empty_content(http, reference):
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    ids = prompt_ids(http, "chat", {"messages": messages, "chat_template": CONCAT_TEMPLATE})
    expected = [dict(m, content=m["content"] or "") for m in messages]  # vLLM renders a null content as ""
    rendered = reference.apply_chat_template(expected, tokenize=False, add_generation_prompt=True,
                                             chat_template=CONCAT_TEMPLATE)
    assert "<|im_start|>assistant\n<|im_end|>" in rendered
    assert ids == reference.encode(rendered, add_special_tokens=False)


# ---- vLLM's /tokenize and /detokenize -------------------------------------------------------------

def test_tokenize_a_prompt_as_the_reference_tokenizer(http, reference):
    text = "Hello world, numbers 1 2 3"
    r = http.post("/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == reference.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 256
    assert body["token_strs"] == reference.convert_ids_to_tokens(reference.encode(text))
    r = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    assert r.json()["tokens"] == reference.encode(text, add_special_tokens=False) != body["tokens"]
    assert "token_strs" not in r.json()


def test_tokenize_chat_messages_as_the_chat_route_sees_them(http, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    r = http.post("/tokenize", json={"model": MODEL, "messages": messages})
    assert r.status_code == 200, r.text
    rendered = reference.apply_chat_template([messages[0], {"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert r.json()["tokens"] == reference.encode(rendered, add_special_tokens=False)
    assert r.json()["tokens"] == prompt_ids(http, "chat", {"messages": messages})  # what a chat request prefills
    r = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False})
    no_prompt = reference.apply_chat_template([messages[0], {"role": "user", "content": "Hi"}], tokenize=False)
    assert r.json()["tokens"] == reference.encode(no_prompt, add_special_tokens=False)


def test_detokenize_as_the_reference_tokenizer(http, reference):
    ids = reference.encode("Ünïcödé tëxt and 42", add_special_tokens=False)
    r = http.post("/detokenize", json={"model": MODEL, "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": reference.decode(ids)}, r.text


@pytest.mark.parametrize("route,body,param", [
    ("/detokenize", {"tokens": [1, 10**6]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"prompt": "hi", "model": "gpt-4"}, "model"),
])
def test_tokenize_and_detokenize_refuse_bad_input_naming_the_field(http, route, body, param):
    r = http.post(route, json=body)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param and "\n" not in r.json()["error"]["message"]
    assert http.post("/detokenize", json={"tokens": [5]}).status_code == 200  # the server goes on


def test_tokenize_takes_the_requests_chat_template_where_trusted(http, reference):
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template": CONCAT_TEMPLATE}
    rendered = reference.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True,
                                             chat_template=CONCAT_TEMPLATE)
    assert http.post("/tokenize", json=body).json()["tokens"] == reference.encode(rendered, add_special_tokens=False)


def test_tools_with_tool_choice_none_reach_the_template(http, reference):
    """As vLLM: tools are rendered into the prompt (the model may be told of them) and no call is parsed."""
    template = CONCAT_TEMPLATE + "{% if tools %}tools={% for t in tools %}{{ t['function']['name'] }};{% endfor %}{% endif %}"
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "hi"}]
    rendered = reference.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                             chat_template=template)
    assert "tools=lookup;" in rendered
    expected = reference.encode(rendered, add_special_tokens=False)
    body = {"messages": messages, "chat_template": template, "tools": tools}
    assert prompt_ids(http, "chat", {**body, "tool_choice": "none"}) == expected
    assert http.post("/tokenize", json=body).json()["tokens"] == expected
    r = post(http, "chat", {**body, "tool_choice": "auto"})  # a call would have to be parsed: no parser here
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    # a named call is held to its schema (test_tool_calls.py): the tools reach the template all the same
    assert prompt_ids(http, "chat", {**body, "tool_choice": {"type": "function", "function": {"name": "lookup"}},
                                     "max_tokens": 40}) == expected


def test_a_model_card_by_name_as_openais_models_retrieve(server):
    import openai
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0, timeout=30)
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.id == client.models.list().data[0].id
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("org/other-model")
    assert exc.value.body["code"] == "model_not_found" and "`org/other-model` does not exist" in exc.value.body["message"]
    r = httpx.get(server.base_url + "/v1/nothing", headers=server.headers)
    assert "GET /v1/models/{model}," in r.json()["error"]["message"]  # the route as a user would write it


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(http, reference):
    text = "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 and then some more words"
    full = reference.encode(text)
    assert len(full) > 6
    assert prompt_ids(http, "completion", {"prompt": text, "truncate_prompt_tokens": 6}) == full[-6:]
    assert prompt_ids(http, "completion", {"prompt": text, "truncate_prompt_tokens": 500}) == full
    r = post(http, "completion", {"prompt": text, "truncate_prompt_tokens": 6, "echo": True, "max_tokens": 1})
    assert r.json()["choices"][0]["text"].startswith(reference.decode(full[-6:]))  # echo shows what the model saw
    messages = [{"role": "user", "content": text}]
    chat = reference.encode(reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)
    assert prompt_ids(http, "chat", {"messages": messages, "truncate_prompt_tokens": 5}) == chat[-5:]
    long_text = " ".join(["word"] * 400)  # past max_seq_len 256: -1 keeps the last 256, which leave no room
    r = post(http, "completion", {"prompt": long_text, "truncate_prompt_tokens": -1, "max_tokens": 1})
    assert r.status_code == 400 and "max_seq_len" in r.json()["error"]["message"], r.text
    r = post(http, "completion", {"prompt": long_text, "truncate_prompt_tokens": 100, "max_tokens": 1})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 100, r.text
    for bad in (0, -2):
        r = post(http, "completion", {"truncate_prompt_tokens": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens", r.text


def test_a_cache_salt_is_taken_and_an_empty_one_refused(http):
    """vLLM's cache_salt reaches the engine (test_llm_api.py: the salt's effect; the engine wire it crosses)."""
    assert post(http, "chat", {"cache_salt": "tenant-a"}).status_code == 200
    assert post(http, "completion", {"cache_salt": "tenant-a"}).status_code == 200
    r = post(http, "completion", {"cache_salt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt", r.text


def test_allowed_token_ids_keep_every_token_among_them(http):
    allowed = [40, 41, 42]
    r = post(http, "completion", {"allowed_token_ids": allowed, "max_tokens": 8, "temperature": 1.0, "seed": 1,
                                  "ignore_eos": True, "return_token_ids": True})
    assert r.status_code == 200, r.text
    assert set(r.json()["choices"][0]["token_ids"]) <= set(allowed) and len(r.json()["choices"][0]["token_ids"]) == 8
    r = post(http, "chat", {"allowed_token_ids": [1, 10**7]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "allowed_token_ids", r.text


def test_bad_words_as_vllm(http, reference):
    """The free greedy answer's words are banned: neither spelling (alone, after a space) of the word
    appears in the new answer's ids (tests/engine/test_bad_words.py holds the ids to transformers)."""
    body = {**COMPLETION, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    free = http.post("/v1/completions", json=body).json()["choices"][0]["token_ids"]

    def spellings(word):
        return [reference.encode(w, add_special_tokens=False) for w in (word, " " + word)]

    def written(ids, word):
        return any(ids[i:i + len(s)] == s for s in spellings(word) for i in range(len(ids)))

    # a word of the free answer that the tokenizer spells with the answer's own ids
    word = next(w for n in (2, 1) for i in range(len(free) - n + 1)
                if (w := reference.decode(free[i:i + n]).strip()) and written(free, w))
    r = http.post("/v1/completions", json={**body, "bad_words": [word]})
    assert r.status_code == 200, r.text
    ids = r.json()["choices"][0]["token_ids"]
    assert ids != free and not written(ids, word)
    r = http.post("/v1/completions", json={**body, "bad_words": [" "]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "bad_words"


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_return_tokens_as_token_ids_names_logprobs_tokens_by_id(http, reference, kind):
    """vLLM's return_tokens_as_token_ids: every token logprobs name (chosen and top) is "token_id:<id>";
    chat's bytes stay the token's text's and completions' text offsets index the text, as without it."""
    lp = {"logprobs": True, "top_logprobs": 3} if kind == "chat" else {"logprobs": 3}
    body = {"max_tokens": 6, "temperature": 0, "ignore_eos": True, "return_token_ids": True, **lp}
    plain, named = post(http, kind, body).json(), post(http, kind, {**body, "return_tokens_as_token_ids": True}).json()
    ids = named["choices"][0]["token_ids"]
    assert ids == plain["choices"][0]["token_ids"] and len(ids) == 6
    if kind == "chat":
        content = named["choices"][0]["logprobs"]["content"]
        assert [c["token"] for c in content] == [f"token_id:{t}" for t in ids]
        assert [c["bytes"] for c in content] == [list(reference.decode([t]).encode()) for t in ids]
        for c, p in zip(content, plain["choices"][0]["logprobs"]["content"]):
            assert [t["token"].startswith("token_id:") for t in c["top_logprobs"]] == [True] * 3
            assert [t["logprob"] for t in c["top_logprobs"]] == [t["logprob"] for t in p["top_logprobs"]]
    else:
        got, want = named["choices"][0]["logprobs"], plain["choices"][0]["logprobs"]
        assert got["tokens"] == [f"token_id:{t}" for t in ids]
        assert want["tokens"] == [reference.decode([t]) for t in ids]
        assert got["text_offset"] == want["text_offset"] and got["token_logprobs"] == want["token_logprobs"]
        for top, t in zip(got["top_logprobs"], ids):
            assert f"token_id:{t}" in top and all(k.startswith("token_id:") for k in top)  # greedy: among the top
    r = post(http, kind, {**body, "return_tokens_as_token_ids": "yes please"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "return_tokens_as_token_ids", r.text


def test_the_server_flag_return_tokens_as_token_ids_is_the_default_a_request_overrides():
    from types import SimpleNamespace

    from meshserve.serve.openai_server import OpenAIServing, ServerConfig
    from meshserve.serve.protocol import CompletionRequest

    serving = SimpleNamespace(config=ServerConfig("m", "/m", return_tokens_as_token_ids=True))
    for field, want in ((None, True), (False, False), (True, True)):
        req = CompletionRequest.model_validate({"prompt": "x", "return_tokens_as_token_ids": field})
        ctx = SimpleNamespace(tokens_as_ids=bool(field))
        OpenAIServing.configure(serving, ctx, req)
        assert ctx.tokens_as_ids is want, field


def test_chat_echo_puts_the_continued_assistant_message_before_the_answer(http):
    """vLLM's chat `echo`: with the last message the assistant's (continue_final_message), each answer's
    content begins with it, streamed (a chunk after the role's) or not; other last roles echo nothing."""
    partial = "The numbers are"
    messages = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": partial}]
    body = {"messages": messages, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "add_generation_prompt": False, "continue_final_message": True, "n": 2}
    plain = post(http, "chat", body).json()["choices"]
    echoed = post(http, "chat", {**body, "echo": True}).json()["choices"]
    assert [c["message"]["content"] for c in echoed] == [partial + c["message"]["content"] for c in plain]
    with http.stream("POST", "/v1/chat/completions", json={**CHAT, **body, "echo": True, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    for i in range(2):
        deltas = [e["choices"][0]["delta"] for e in events if e["choices"] and e["choices"][0]["index"] == i]
        assert deltas[0] == {"role": "assistant", "content": ""} and deltas[1] == {"content": partial}, deltas[:2]
        assert "".join(d.get("content", "") for d in deltas) == echoed[i]["message"]["content"]
    user_last = post(http, "chat", {"messages": messages[:1], "max_tokens": 5, "temperature": 0, "echo": True})
    assert user_last.status_code == 200
    assert user_last.json()["choices"][0]["message"]["content"] == post(http, "chat", {
        "messages": messages[:1], "max_tokens": 5, "temperature": 0}).json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("kind,prefix", [("completion", "cmpl"), ("chat", "chatcmpl")])
def test_a_bodys_request_id_names_the_request(http, kind, prefix):
    """vLLM's request_id field, as an X-Request-Id header: the answer's id (and the engine's, in its log
    lines) carries it, made safe, with a unique suffix; an empty one is a 400 naming it."""
    r = post(http, kind, {"request_id": "job 42/a"})
    assert r.status_code == 200 and r.json()["id"].startswith(f"{prefix}-job42a-"), r.text
    assert post(http, kind, {"request_id": "job 42/a"}).json()["id"] != r.json()["id"]
    r = post(http, kind, {"request_id": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "request_id", r.text
