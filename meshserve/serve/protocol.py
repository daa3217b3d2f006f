"""The OpenAI wire format: request bodies (pydantic), their mapping onto SamplingParams, and the
OpenAI-shaped error `{"error": {"message", "type", "param", "code"}}`.

As vLLM does, a field this server does not know (a newer OpenAI one such as `reasoning_effort`) is
ignored with a logged warning, unless it is a setting this server cannot honour (REFUSED_FIELDS) or a
misspelt known field: a 400 naming it; a known field with a bad value is a 400 naming it. Numbers are
range-checked by SamplingParams.validate (and `n` against the engine's max_n when submitted).

Field names and extensions (top_k, min_p, repetition_penalty, ignore_eos, min_tokens,
stop_token_ids, include_stop_str_in_output, skip_special_tokens) follow vLLM / trtllm-serve.
"""
from __future__ import annotations

import asyncio

import json
import logging
import re
from typing import Any, ClassVar, Literal, Optional, Union

import msgspec
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from meshserve.chat_format import MessageError, template_messages
from meshserve.errors import nearest
from meshserve.engine.structured_output import check_syntax
from meshserve.sampling_params import SamplingParams, StructuredOutputsParams, short_repr

logger = logging.getLogger(__name__)

# OpenAI's message roles (`developer` is o1's `system`; `function` is the deprecated tool role)
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class APIError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[Union[str, int]] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


# what str.splitlines breaks a line at
_LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` with its line breaks escaped (a newline becomes the two characters \\n): an error that
    quotes what the client sent (a model name, a field name, a chat template's exception) stays one line."""
    return _LINE_BREAKS.sub(lambda m: repr(m.group())[1:-1], text)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[Union[str, int]] = None) -> dict:
    if isinstance(param, str):
        param = one_line(param)
    return {"error": {"message": one_line(str(message)), "type": type, "param": param, "code": code}}


def http_error(request, status: int, detail, headers: Optional[dict] = None) -> APIError:
    """Starlette's routing errors in the OpenAI shape, naming what was asked and what is served: a 404
    lists the routes (`POST /v1/embeddings` is not one), a 405 the methods the path takes."""
    asked = f"{request.method} {request.url.path}"
    if status == 404:
        routes = sorted({f"{m} {re.sub(r':path}', '}', r.path)}" for r in request.app.routes
                         for m in sorted(getattr(r, "methods", None) or ()) if m != "HEAD"})
        return APIError(404, f"{asked} is not served here; this server serves {', '.join(routes)}",
                        code="not_found")
    if status == 405:
        allow = (headers or {}).get("Allow") or "other methods"  # starlette's header for a 405
        return APIError(405, f"{asked}: method not allowed; {request.url.path} takes {allow}",
                        headers=headers, code="method_not_allowed")
    return APIError(status, str(detail), headers=headers)


# The largest request body the server and the orchestrator read (--max_request_body_mb of serve and disaggregated): a
# 128k-token prompt is about half a megabyte of text or one of token ids; a body beyond this is a
# 413 before it is held in memory, so one client cannot take the server's.
MAX_REQUEST_BODY_BYTES = 64 * 2**20
MAX_REQUEST_HEADER_BYTES = 64 * 2**10  # --max_request_header_kb: larger headers (names + values) are a 431


REQUEST_BODY_TIMEOUT_S = 60.0  # serve --request_body_timeout: the longest wait for the next piece of a body


async def read_body(raw, limit: int = MAX_REQUEST_BODY_BYTES, timeout: float = REQUEST_BODY_TIMEOUT_S) -> bytes:
    """A request's body, read up to `limit` bytes; a 413 naming the limit past it (a declared
    Content-Length over it is refused before anything is read); a 408 when `timeout` seconds pass
    without a new piece of it (nginx's client_body_timeout: between reads, not in total)."""
    def too_large(size: str) -> APIError:
        return APIError(413, f"the request body is {size}, more than this server reads ({limit} bytes; "
                             f"--max_request_body_mb raises it)", "invalid_request_error", None,
                        "request_too_large")

    declared = raw.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(f"{int(declared)} bytes")
    chunks, size = [], 0
    stream = raw.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise APIError(408, f"no part of the request body arrived for {timeout:g} s after {size} bytes "
                                f"(--request_body_timeout)", "invalid_request_error", None,
                           "request_timeout") from None
        size += len(chunk)
        if size > limit:
            raise too_large(f"over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json_body(body: bytes):
    """A request body's JSON (any value), or a 400: not JSON, or nested too deeply to decode (a
    RecursionError in the decoder, from thousands of nested arrays)."""
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply (thousands of levels of arrays or objects)") \
            from None


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


def from_validation_error(err: ValidationError) -> APIError:
    """A pydantic error as a 400 naming the first offending field."""
    messages, first = [], None
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        first = first or loc or None
        if e["type"] == "missing":
            messages.append(f"{loc!r} is required")
        else:
            messages.append(f"{loc}={short_repr(e.get('input'))}: {e['msg']}")
    return bad_request("; ".join(messages), first)


_PARAM_IN_MESSAGE = re.compile(r"SamplingParams\.(\w+)|^(structured_outputs|response_format|guided_\w+|structural_tag)\b")


def from_value_error(err: ValueError, renames: Optional[dict] = None, default_param: Optional[str] = None) -> APIError:
    """A SamplingParams / engine validation error as a 400; `renames` maps SamplingParams field
    names back to the request's (e.g. logprobs -> top_logprobs for chat)."""
    message = str(err)
    m = _PARAM_IN_MESSAGE.search(message)
    if m:
        param = m.group(1) or m.group(2)
    elif "max_tokens" in message:
        param = "max_tokens"
    else:
        param = default_param
    if renames and param in renames:
        message = re.sub(rf"(SamplingParams\.)?\b{param}\b", renames[param], message)
        param = renames[param]
    return bad_request(message.replace("SamplingParams.", ""), param)


_warned_unknown: set = set()  # (model, field) pairs already logged at WARNING


def _log_ignored(model: str, fields: list[str]) -> None:
    """WARNING the first time a field is seen (a client sends the same ones on every request), then DEBUG."""
    new = [f for f in fields if (model, f) not in _warned_unknown]
    if new and len(_warned_unknown) < 1024:
        _warned_unknown.update((model, f) for f in new)
        logger.warning("ignoring request field(s) this server does not know: %s (in %s)", _names(new), model)
    else:
        logger.debug("ignoring request field(s) this server does not know: %s (in %s)", _names(fields), model)


def _names(fields: list) -> str:
    """Field names as a log line shows them: the client's, so each is cut to 40 characters and its
    line breaks escaped (a name holding a newline cannot forge a log line)."""
    return one_line(", ".join(f if len(f) <= 40 else f[:37] + "..." for f in map(str, fields[:20]))
                    + (f", ... ({len(fields)} in all)" if len(fields) > 20 else ""))


_STRUCTURED = ("not supported by this server; structured outputs take structured_outputs (json, regex, choice, "
               "grammar, json_object, structural_tag), response_format or guided_json / guided_regex / guided_choice / "
               "guided_grammar")
_TOOLS = "tools / function calling are not supported by this server"
# Fields vLLM or OpenAI define that change what is generated and this server cannot honour: set to
# anything but a value that asks for nothing, each is a 400 naming it (a setting is refused, never
# accepted and ignored). field -> (the values that ask for nothing, why it is refused)
REFUSED_FIELDS: dict[str, tuple[tuple, str]] = {
    "guided_whitespace_pattern": ((None,), _STRUCTURED),
    "logits_processors": ((None, []), "custom logits processors are not supported by this server"),
    "kv_transfer_params": ((None,), "kv_transfer_params (vLLM's) is not this server's disaggregation interface; "
                                    "use disaggregated_params (docs/disaggregated.md)"),
    "functions": ((None, []), _TOOLS),
    "function_call": ((None, "none"), _TOOLS),
    "audio": ((None,), "audio output is not supported by this server"),
    "modalities": ((None, ["text"]), "only text output is supported: modalities must be [\"text\"] or left out"),
    "prediction": ((None,), "predicted outputs are not supported by this server"),
    "web_search_options": ((None,), "web search is not supported by this server"),
    "documents": ((None, []), "documents are not supported by this server"),
    "mm_processor_kwargs": ((None, {}), "multimodal inputs are not supported by this server"),
    "echo": ((None, False), "echo is a field of completions and chat completions"),  # theirs: known (Responses')
}


class OpenAIModel(BaseModel):
    """A request body's part. As vLLM does, a field it does not know is ignored with a warning in the
    log, unless it is one REFUSED_FIELDS names (`refuses`) or looks like a misspelt known field: a 400."""
    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    refuses: ClassVar[bool] = False  # check REFUSED_FIELDS (the request bodies, not their parts)

    @model_validator(mode="before")
    @classmethod
    def _ignore_unknown(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            for i, k in enumerate(unknown):
                if not isinstance(k, str):  # not from JSON (a Python caller's dict): pydantic names it
                    continue
                if cls.refuses and k in REFUSED_FIELDS and not _asks_nothing(data[k], REFUSED_FIELDS[k][0]):
                    raise bad_request(f"{k}={short_repr(data[k])}: {REFUSED_FIELDS[k][1]}", k)
                # a field name's typo (the first 20 unknown names of up to 64 characters: a body of many
                # long names costs no more than its parse)
                close = nearest(k, cls.model_fields, cutoff=0.8) if i < 20 and len(k) <= 64 else None
                if close and close not in data:
                    raise bad_request(f"unknown field {short_repr(k)}; did you mean {close!r}?", k)
            if unknown:
                _log_ignored(cls.__name__, unknown)
        return data


def _asks_nothing(value, nothing: tuple) -> bool:
    """`value` is one of `nothing` (None, False, a number, an empty list...), with booleans kept apart
    from numbers."""
    for n in nothing:
        if n is None or isinstance(n, bool) or isinstance(value, bool):
            if value is n:
                return True
        elif isinstance(n, (int, float)) and isinstance(value, (int, float)):
            if value == n:
                return True
        elif type(value) is type(n) and value == n:
            return True
    return False


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class DisaggregatedParams(OpenAIModel):
    """Disaggregated serving (docs/disaggregated.md), TensorRT-LLM's field names: what the
    orchestrator sends a context server (request_type only) and a generation server (what the
    context server answered)."""
    request_type: Literal["context_only", "generation_only"]
    first_gen_tokens: Optional[list[int]] = None
    ctx_request_id: Optional[Union[str, int]] = None
    opaque_state: Optional[str] = None
    draft_tokens: Optional[list[int]] = None  # TensorRT-LLM's; refused when not empty (no speculative decoding)


class SamplingRequest(OpenAIModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    refuses: ClassVar[bool] = True
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    n: int = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    allowed_token_ids: Optional[list[int]] = None  # vLLM's: sample only among these ids
    bad_words: Optional[list[str]] = None  # vLLM's: words never generated
    ignore_eos: bool = False
    # vLLM's beam search (meshserve/beam_search.py): n beams, the best n returned, ranked by
    # cum_logprob / length ** length_penalty
    use_beam_search: bool = False
    length_penalty: float = 1.0
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    disaggregated_params: Optional[DisaggregatedParams] = None
    # vLLM's: each choice carries its `token_ids` (streamed: the chunk's), and the prompt's
    # `prompt_token_ids` come with the answer (streamed: with the first chunk)
    return_token_ids: bool = False
    # vLLM's: logprobs name each token "token_id:<id>" (a token whose text is not valid UTF-8 alone still
    # says which it is); None: the server's --return_tokens_as_token_ids
    return_tokens_as_token_ids: Optional[bool] = None
    # vLLM's: the tokenizer's special tokens (a BOS) added to the prompt's text; None: the endpoint's
    # default, True for completions, False for chat (its template writes them)
    add_special_tokens: Optional[bool] = None
    # vLLM's: only the prompt's last k tokens are used (-1: the last max_seq_len)
    truncate_prompt_tokens: Optional[int] = Field(None, ge=-1)
    # vLLM's: the prompt's cached prefix is shared only with requests of the same salt (a tenant's)
    cache_salt: Optional[str] = Field(None, min_length=1)
    # vLLM's: the request's id in the server's log lines and its engine (as an X-Request-Id header does)
    request_id: Optional[str] = Field(None, min_length=1, max_length=256)
    # vLLM's: the request's place under --scheduling_policy priority (lower first); else it must be 0
    priority: int = Field(0, ge=-2**63, le=2**63 - 1)
    # structured outputs (vLLM's fields; engine/structured_output.py): at most one of them
    response_format: Optional[dict[str, Any]] = None
    structured_outputs: Optional[dict[str, Any]] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    structural_tag: Optional[Union[str, dict[str, Any]]] = None  # vLLM's older field: structured_outputs.structural_tag
    guided_decoding_backend: Optional[str] = None
    _structured_field: str = PrivateAttr("structured_outputs")  # which field set the constraint (its errors name it)
    # accepted and ignored: they change nothing in what this server computes
    metadata: Optional[dict[str, Any]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate_not_zero(cls, k: Optional[int]) -> Optional[int]:
        if k == 0:
            raise ValueError("expected -1 (the last max_seq_len tokens) or a number of tokens >= 1")
        return k

    def truncated(self, prompts: list[tuple[Optional[str], list[int]]],
                  max_seq_len: int) -> list[tuple[Optional[str], list[int]]]:
        """vLLM's truncate_prompt_tokens: each prompt's last k tokens (-1: the last max_seq_len); a cut
        prompt's text is its kept tokens' (echo shows what the model saw)."""
        k = self.truncate_prompt_tokens
        if k is None:
            return prompts
        keep = max_seq_len if k == -1 else k
        return [(text, ids) if len(ids) <= keep else (None, ids[-keep:]) for text, ids in prompts]

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def beam_search_params(self, max_tokens: int):
        """vLLM's to_beam_search_params: n beams; ValueError naming a field beam search cannot take."""
        from meshserve.beam_search import BeamSearchParams
        if self.stream:
            raise ValueError("stream=true: use_beam_search answers whole (the beams change until the last round); "
                             "set stream to false")
        for name in ("logprobs", "prompt_logprobs", "top_logprobs"):
            value = getattr(self, name, None)
            if value not in (None, False):
                raise ValueError(f"{name}={short_repr(value)}: not available with use_beam_search; leave it out")
        if getattr(self, "echo", False):
            raise ValueError("echo=true: not available with use_beam_search; leave it out")
        if self.structured_spec() is not None:
            raise ValueError(f"{self._structured_field}: structured outputs do not go with use_beam_search")
        if getattr(self, "best_of", None) not in (None, self.n):
            raise ValueError(f"best_of={self.best_of}: with use_beam_search, n is the beam width; leave best_of out")
        try:
            return BeamSearchParams(beam_width=self.n, max_tokens=max_tokens, ignore_eos=self.ignore_eos,
                                    length_penalty=self.length_penalty,
                                    include_stop_str_in_output=self.include_stop_str_in_output)
        except ValueError as e:
            raise ValueError(str(e).replace("BeamSearchParams.beam_width", "n").replace("BeamSearchParams.", "")) \
                from None

    def sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int],
                        prompt_logprobs: Optional[int] = None, defaults: Optional[dict] = None) -> SamplingParams:
        """Raises ValueError (naming the field) for values SamplingParams rejects. `defaults`: the
        model's generation_config.json values (generation_defaults.py) of the fields the request leaves out."""
        logit_bias = None
        if self.logit_bias:
            # token ids as OpenAI writes them: decimal digits, maybe a minus sign (range-checked by
            # SamplingParams), not whatever int() also takes (" 5 ", "5_0", "٥")
            if not all(_TOKEN_ID_KEY.fullmatch(k) for k in self.logit_bias):
                raise ValueError("SamplingParams.logit_bias keys must be token ids (integers as strings), got "
                                 f"{short_repr(list(self.logit_bias)[:5])}")
            logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if getattr(self, "prompt_logprobs", None) is not None and self.stream:
            raise ValueError(STREAMED_PROMPT_LOGPROBS)
        fields = dict(max_tokens=max_tokens, n=self.n, seed=self.seed, stop=self.stop,
                      stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
                      include_stop_str_in_output=self.include_stop_str_in_output, logit_bias=logit_bias,
                      allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words,
                      skip_special_tokens=self.skip_special_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                      spaces_between_special_tokens=self.spaces_between_special_tokens)
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            if value is None and defaults:
                value = defaults.get(name)
            if value is not None:
                fields[name] = value
        structured = self.structured_spec()
        if structured is not None:
            fields["structured_outputs"] = structured
        return SamplingParams(**fields)

    def structured_spec(self) -> Optional[StructuredOutputsParams]:
        """The request's structured outputs, from whichever one field sets them; ValueError naming it."""
        given = {}
        if self.response_format is not None:
            rf = response_format_spec(self.response_format)
            if rf is not None:
                given["response_format"] = rf
        if self.structured_outputs is not None:
            given["structured_outputs"] = StructuredOutputsParams.of(self.structured_outputs)
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar"), ("structural_tag", "structural_tag")):
            value = getattr(self, name)
            if value is not None:
                try:
                    given[name] = StructuredOutputsParams(**{kind: value})
                except ValueError as e:
                    raise ValueError(str(e).replace(f"structured_outputs.{kind}=", f"{name}=")) from None
        if self.guided_decoding_backend not in (None, "auto", "xgrammar"):
            raise ValueError(f"guided_decoding_backend={short_repr(self.guided_decoding_backend)} is not available: "
                             f"this server's structured outputs run on xgrammar ('xgrammar' or 'auto')")
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} both constrain the output: set only one of them")
        if not given:
            return None
        [(name, spec)] = given.items()
        self._structured_field = name
        return spec

    def check_structured(self, spec: StructuredOutputsParams) -> None:
        """Parse the request's schema / regex / grammar (xgrammar, no tokenizer): a 400 naming the field
        before any stream starts. The server runs it on the tokenizer thread when it is long."""
        name = self._structured_field
        try:
            check_syntax(spec)
        except ValueError as e:
            field = {"structured_outputs": f"structured_outputs.{spec.kind}",
                     "response_format": "response_format" if spec.kind == "structural_tag"
                     else "response_format.json_schema.schema"}.get(name, name)
            raise from_value_error(ValueError(str(e).replace(f"structured_outputs.{spec.kind}=", f"{field}=", 1)),
                                   ) from None

    def structured_chars(self, spec: StructuredOutputsParams) -> int:
        """How long the constraint is (what its parse costs, roughly)."""
        value = getattr(spec, spec.kind)
        try:
            return len(value) if isinstance(value, str) else len(json.dumps(value)) if isinstance(value, (dict, list)) \
                else 0
        except (RecursionError, ValueError, TypeError):
            return 1 << 30  # as deep as a body may be: off the loop


def response_format_spec(rf: dict) -> Optional[StructuredOutputsParams]:
    """OpenAI's response_format: text (nothing), json_object (any JSON object) or json_schema."""
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        js = rf.get("json_schema")
        schema = js.get("schema", js.get("json_schema")) if isinstance(js, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema is missing: a json_schema response_format needs "
                             "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}")
        return StructuredOutputsParams(json=schema)
    if kind == "structural_tag":  # vLLM's: {"structures": [...], "triggers": [...]} or {"format": {...}}
        return StructuredOutputsParams(structural_tag=dict(rf))
    raise ValueError(f"response_format.type={short_repr(kind)} is not supported: expected 'text', 'json_object', "
                     f"'json_schema' or 'structural_tag'")


_TOKEN_ID_KEY = re.compile(r"-?[0-9]+")
STREAMED_PROMPT_LOGPROBS = ("prompt_logprobs are answered by non-streaming requests only (as vLLM's); set stream to "
                            "false or leave prompt_logprobs out")


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    prompt_logprobs: Optional[int] = Field(None, ge=0, le=20)
    best_of: Optional[int] = Field(None, ge=1)
    suffix: Optional[str] = None
    # disaggregated serving's failover (docs/disaggregated.md): the output tokens of an earlier run
    # of this prompt; the server prefills prompt + these and generates on from there
    resume_output_token_ids: Optional[list[int]] = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls, tool_call_id, ...: handed to the template
    role: Role
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    prompt_logprobs: Optional[int] = Field(None, ge=0, le=20)  # vLLM's: the answer's top-level prompt_logprobs
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # vLLM's: the answer's content begins with the last message's when that is the assistant's (a reply
    # continued with continue_final_message)
    echo: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None

    def echo_text(self, messages: list[dict]) -> str:
        """What `echo` puts before each answer: the last of the template's `messages` when it is the
        assistant's (its text), else nothing."""
        last = messages[-1] if self.echo and messages else {}
        content = last.get("content") if last.get("role") == "assistant" else None
        if isinstance(content, list):  # text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""

    def template_messages(self) -> list[dict]:
        """Messages as the chat template wants them (chat_format.py); a 400 naming a bad one."""
        try:
            return template_messages([m.model_dump(exclude_none=True) for m in self.messages])
        except MessageError as e:
            raise bad_request(str(e), e.param) from None
