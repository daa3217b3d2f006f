"""The API server's settings (`meshserve serve`'s flags as the front uses them): ServerConfig."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from meshserve.serve.protocol import MAX_REQUEST_BODY_BYTES, MAX_REQUEST_HEADER_BYTES, REQUEST_BODY_TIMEOUT_S

# A request's prompts, when they come to at least this many characters together, are tokenized
# (chat templates rendered) on a worker thread, as vLLM does: an 8k-token prompt takes tens of ms
# to encode, during which the event loop would send no stream chunks to anyone. The tokenizers'
# batch encode releases the GIL. Shorter ones stay inline: a thread hop costs more than they do.
TOKENIZE_OFFLOAD_CHARS = 4096  # default of serve --tokenize_offload_chars


@dataclass
class ServerConfig:
    served_model_name: str
    model_path: str
    api_key: Optional[str] = None
    chat_template: Optional[str] = None
    tokenize_offload_chars: int = TOKENIZE_OFFLOAD_CHARS  # prompts this long are tokenized off the loop
    model_aliases: tuple = ()  # other names a request may give (the MODEL argument as typed: a Hub id)
    # a request's own `chat_template` is rendered only with this (serve --trust_request_chat_template, as
    # vLLM's flag): a Jinja template is a program, and one request's could take the server's memory or CPU
    trust_request_chat_template: bool = False
    max_request_body_bytes: int = MAX_REQUEST_BODY_BYTES  # a larger body is a 413 (serve --max_request_body_mb)
    max_request_header_bytes: int = MAX_REQUEST_HEADER_BYTES  # larger headers are a 431 (--max_request_header_kb)
    request_body_timeout_s: float = REQUEST_BODY_TIMEOUT_S  # no new piece of a body this long: a 408
    # tool_choice "auto": the parser of the model's tool calls (serve --enable_auto_tool_choice
    # --tool_call_parser NAME, as vLLM's flags); None: such a request is a 400 (serve/tools.py)
    tool_call_parser: Optional[str] = None
    # usage.prompt_tokens_details.cached_tokens (serve --enable_prompt_tokens_details, as vLLM's flag)
    enable_prompt_tokens_details: bool = False
    # logprobs name tokens "token_id:<id>" unless a request says otherwise (serve --return_tokens_as_token_ids)
    return_tokens_as_token_ids: bool = False
    # the model's generation_config.json sampling values (generation_defaults.py; serve --generation_config)
    sampling_defaults: dict = field(default_factory=dict)
    # chat answers' thinking to reasoning_content (serve --reasoning_parser, as vLLM's; serve/reasoning.py)
    reasoning_parser: Optional[str] = None
    # cross-origin requests from browsers (serve --allowed_origins ..., as vLLM's flags): Starlette's
    # CORSMiddleware keywords (allow_origins, allow_methods, allow_headers, allow_credentials); None: off
    cors: Optional[dict] = None
    max_beam_width: Optional[int] = None  # the most beams a request may ask (serve --max_beam_width)
