"""vLLM's `POST /tokenize` and `POST /detokenize`: a prompt (or chat messages, rendered by the chat
template as /v1/chat/completions renders them) to the token ids a completion would see, and token ids
back to text. The server's own tokenizer and template; no engine step runs.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from meshserve.serve.protocol import ChatCompletionRequest, ChatMessage, OpenAIModel, bad_request


class TokenizeCompletionRequest(OpenAIModel):
    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True  # as /v1/completions
    return_token_strs: bool = False


class TokenizeChatRequest(OpenAIModel):
    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # as /v1/chat/completions: the template writes them
    return_token_strs: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None  # handed to the template, as the chat route does

    template_messages = ChatCompletionRequest.template_messages


class DetokenizeRequest(OpenAIModel):
    model: Optional[str] = None
    tokens: list[int]


async def tokenize(serving, raw) -> dict:
    """{"count", "max_model_len", "tokens"[, "token_strs"]}, as vLLM answers."""
    data = await serving.read_json(raw)
    req = serving.validate(data, TokenizeChatRequest if "messages" in data else TokenizeCompletionRequest)
    serving.check_model(req.model)
    if isinstance(req, TokenizeChatRequest):
        serving.check_chat_template(req)
        _, ids = await serving.chat_prompt(req)
    else:
        [(_, ids)] = await serving.completion_prompts([req.prompt], req.add_special_tokens)
    lim = serving.engine.limits
    body = {"count": len(ids), "max_model_len": lim.max_seq_len if lim else None, "tokens": ids}
    if req.return_token_strs:
        body["token_strs"] = serving.tokenizer.convert_ids_to_tokens(ids)
    return body


async def detokenize(serving, raw) -> dict:
    """{"prompt": the text of `tokens`}; an id outside the model's vocabulary is a 400 naming it."""
    req = serving.validate(await serving.read_json(raw), DetokenizeRequest)
    serving.check_model(req.model)
    lim = serving.engine.limits
    vocab = lim.vocab_size if lim else 2**63
    bad = next((i for i, t in enumerate(req.tokens) if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"tokens[{bad}]={req.tokens[bad]} is outside the vocabulary (valid ids are "
                          f"0..{vocab - 1})", "tokens")
    try:
        text = serving.tokenizer.decode(req.tokens)
    except Exception as e:  # noqa: BLE001 - an id the model has but its tokenizer lacks (padded vocabularies)
        raise bad_request(f"tokens cannot be decoded by this model's tokenizer: {e}", "tokens") from None
    return {"prompt": text}
