"""The offline Python API: LLM(...).generate / generate_async / chat.

The LLM owns an EngineCore in this process (its executor may spawn worker ranks), the tokenizer and
an OutputProcessor (the one the API server uses too). Whichever thread steps the engine routes
every output to its request through it, so a blocking `generate` and background `generate_async`
streams can share one engine.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional, Sequence, Union

from meshserve.chat_format import MessageError, template_messages
from meshserve.config import LlmArgs, build_llm_args
from meshserve.engine.detokenizer import RequestState
from meshserve.engine.engine_core import EngineCore, check_priority
from meshserve.engine import disagg
from meshserve.engine.messages import DisaggRequest
from meshserve.engine.output_processor import OutputProcessor
from meshserve.engine.setup import create_engine_core, launch_for
from meshserve.engine.structured_output import check_syntax
from meshserve.generation_defaults import describe as describe_defaults, sampling_defaults
from meshserve.errors import API_DEBUG_HINT, RankFailedError, describe
from meshserve.models.config import ModelConfig
from meshserve.models.resolve import resolve_model_path, resolve_tokenizer_path
from meshserve.outputs import DisaggregatedParams, RequestOutput
from meshserve.progress import progress_bar
from meshserve.sampling_params import SamplingParams
from meshserve.tokenize import PromptEncoder
from meshserve.utils import all_ints
from meshserve.worker.main import run_launched_rank

if TYPE_CHECKING:
    from meshserve.beam_search import BeamSearchOutput, BeamSearchParams

logger = logging.getLogger(__name__)

PromptType = Union[str, list[int]]


def load_tokenizer(path: str):
    """The tokenizer; one that cannot be loaded (a config.json transformers rejects, missing tokenizer
    files) is a one-line ValueError naming the folder and the reason."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; each is a bad folder here
        logger.debug("loading the tokenizer from %s failed:\n%s", path, traceback.format_exc())
        raise ValueError(f"tokenizer {path}: cannot load it: {describe(e)}") from None


PROMPT_KEYS = ("prompt", "prompt_token_ids", "resume_output_token_ids", "cache_salt")


def _check_prompt_keys(prompt: dict) -> None:
    """A dict prompt (vLLM's TextPrompt / TokensPrompt): keys this engine does not take are refused."""
    unknown = [k for k in prompt if k not in PROMPT_KEYS]
    if unknown:
        multimodal = [k for k in unknown if k in ("multi_modal_data", "mm_processor_kwargs", "multi_modal_uuids")]
        why = ("multimodal inputs are not supported" if multimodal
               else f"accepted: {', '.join(PROMPT_KEYS)}")
        raise ValueError(f"prompt dict has key(s) {', '.join(map(repr, unknown))} this engine does not take; {why}")
    if "prompt" not in prompt and "prompt_token_ids" not in prompt:
        raise ValueError("a prompt dict needs 'prompt' (text) or 'prompt_token_ids'")


class LLM:
    def __init__(self, model: Optional[str] = None, tokenizer: Optional[str] = None, **kwargs: Any):
        self.args: LlmArgs = build_llm_args("LLM()", model=model, tokenizer=tokenizer, **kwargs)
        self.model_path = resolve_model_path(self.args.model, self.args.show_progress, self.args.load_format,
                                             self.args.revision)
        if self.args.cache_transceiver_config is not None:
            _settle_disagg_key()  # before any rank starts (launched ones too): they authenticate KV transfers with it
        launch = launch_for(self.args)
        if launch is not None and launch.rank != 0:
            # A launcher (mpirun, srun, torchrun) ran this script on every rank: rank 0 runs the
            # engine, this rank holds its shard until rank 0 shuts down. Its script does not go on
            # past LLM(): its generate() would have nothing to run. meshserve-launch avoids
            # running the script on worker ranks at all.
            run_launched_rank(self.args, self.model_path, launch)  # ends the process
        ModelConfig.from_pretrained(self.model_path)  # a bad config.json: our one-line error, not the tokenizer's
        tokenizer_path = resolve_tokenizer_path(self.args.tokenizer, self.args.tokenizer_revision,
                                                self.args.model) or self.model_path
        self.tokenizer = None if self.args.skip_tokenizer_init else load_tokenizer(tokenizer_path)
        self._encoder = PromptEncoder(self.tokenizer) if self.tokenizer is not None else None
        try:
            self._core: Optional[EngineCore] = create_engine_core(
                self.args, self.model_path, launch, logging.getLevelName(logging.getLogger().getEffectiveLevel()))
        except RankFailedError as e:  # a worker's error, one line; its traceback is in that rank's DEBUG log
            if e.expected:
                raise
            raise RankFailedError(f"{e} ({API_DEBUG_HINT})") from None
        self._core.structured.tokenizer = self.tokenizer  # structured outputs compile against it (None: refused)
        self.sampling_defaults = sampling_defaults(self.model_path, self.args.generation_config)
        if self.sampling_defaults:
            logger.info("default sampling settings from the model's generation_config.json: %s",
                        describe_defaults(self.sampling_defaults))
        if self.tokenizer is None:
            self._core.structured.tokenizer_path = None
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._outputs = OutputProcessor(self.tokenizer, self.args.stream_interval)
        self._errors: dict[str, Exception] = {}  # request id -> why processing its output failed
        self._async_streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, bool]] = {}
        self._ids = itertools.count()
        # context_only requests' ids are signed into their params and name their KV on the ranks' sources:
        # unique across LLM instances (plain counters would repeat in a later LLM on the same endpoint)
        self._ctx_prefix = f"ctx-{secrets.token_hex(4)}-"
        self._bg: Optional[threading.Thread] = None
        self._closed = False
        self._error: Optional[BaseException] = None
        self._context_only: dict[str, SamplingParams] = {}  # request id -> params, for its disaggregated_params

    # ---- inputs -------------------------------------------------------------------------------------
    def _tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer (skip_tokenizer_init=True was set); pass token ids")
            return prompt, self._encoder.encode(prompt)
        if isinstance(prompt, dict):
            _check_prompt_keys(prompt)
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            return self._tokenize(prompt["prompt"])
        if isinstance(prompt, (list, tuple)) and all_ints(prompt):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    @staticmethod
    def _normalize(prompts) -> list:
        if isinstance(prompts, str) or isinstance(prompts, dict):
            return [prompts]
        if isinstance(prompts, (list, tuple)) and prompts and all_ints(prompts):
            return [list(prompts)]
        if isinstance(prompts, (list, tuple)) and not prompts:
            raise ValueError("prompts is empty: pass a string, a list of token ids, or a list of those")
        return list(prompts)

    def _prepare(self, prompt: PromptType, params: SamplingParams,
                 disaggregated_params: Optional[DisaggregatedParams] = None, priority: int = 0):
        """Tokenize and validate; nothing is registered or added to the engine yet. A dict prompt's
        `resume_output_token_ids` continues an earlier run's output (the same params; the result
        as AsyncEngine.add_request describes it); its `cache_salt` (vLLM's) shares its cached prefix
        only with prompts of the same salt. `priority`: vLLM's (scheduling_policy "priority"; lower
        first). Returns (text, ids, params, resume, disagg, salt, priority)."""
        text, ids = self._tokenize(prompt)
        text, ids = self._truncated(text, ids, params.truncate_prompt_tokens)
        params = params.with_bad_words_tokenized(self.tokenizer)
        if params.structured_outputs is not None:  # before any prompt of the call reaches the engine
            check_syntax(params.structured_outputs)
        resume = list(prompt.get("resume_output_token_ids") or ()) if isinstance(prompt, dict) else []
        client_params = params
        params, kv = self._disagg_request(ids, params, disaggregated_params)
        if kv is not None and resume:
            raise ValueError("resume_output_token_ids and disaggregated_params do not go together")
        if kv is not None and kv.kind == "context_only":  # the whole request must fit max_seq_len, as there
            self._core.validate(ids, client_params, kv_capacity=False)
        self._core.validate(ids, params, resume)
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        if salt is not None and not (isinstance(salt, str) and salt):
            raise ValueError(f"cache_salt must be a non-empty string, got {salt!r}")
        check_priority(self._core.limits, priority)
        return text, ids, params, resume, kv, salt, priority

    def _truncated(self, text: Optional[str], ids: list[int], k: Optional[int]) -> tuple[Optional[str], list[int]]:
        """vLLM's truncate_prompt_tokens: the prompt's last k tokens (-1: the last max_seq_len). A cut
        prompt's text is its kept tokens' (what the model saw), as the API server's echo shows it."""
        keep = self._core.limits.max_seq_len if k == -1 else k
        if keep is None or len(ids) <= keep:
            return text, ids
        ids = ids[-keep:]
        return (self.tokenizer.decode(ids) if self.tokenizer is not None else None), ids

    def _disagg_request(self, ids: list[int], params: SamplingParams,
                        dp: Optional[DisaggregatedParams]) -> tuple[SamplingParams, Optional[DisaggRequest]]:
        """The engine's params and DisaggRequest of a request with `disaggregated_params` (as the
        API server's: a context_only request samples one token; a generation_only one is checked
        against the context side's signed state); a one-line ValueError for what cannot be."""
        if dp is None:
            return params, None
        if not isinstance(dp, DisaggregatedParams):
            raise ValueError(f"disaggregated_params must be a meshserve.llmapi.DisaggregatedParams, got "
                             f"{type(dp).__name__}")
        if self.args.cache_transceiver_config is None:
            raise ValueError(f"disaggregated_params: this LLM was made without cache_transceiver_config (pass "
                             f"cache_transceiver_config={{'backend': 'DEFAULT'}}), so it runs no {dp.request_type} "
                             f"requests")
        if params.n != 1:
            raise ValueError(f"disaggregated_params: a {dp.request_type} request has one sequence; n={params.n}")
        if dp.request_type == "context_only":
            return disagg.context_only_params(params), DisaggRequest("context_only")
        kv = disagg.generation_request(dp.opaque_state, ids, self._core.kv_layouts, dp.first_gen_tokens,
                                       dp.ctx_request_id, logprobs=params.logprobs,
                                       prompt_logprobs=params.prompt_logprobs)
        return params, kv

    def _submit(self, text: Optional[str], ids: list[int], params: SamplingParams,
                resume: Sequence[int] = (), kv: Optional[DisaggRequest] = None,
                cache_salt: Optional[str] = None, priority: int = 0) -> RequestState:
        rid = str(next(self._ids))
        if kv is not None and kv.kind == "context_only":
            rid = self._ctx_prefix + rid
        state, seqs = self._outputs.add_request(rid, text, ids + list(resume), params)
        if resume:
            state.resume_output(list(resume))
        for sid, p in seqs:
            self._core.add_request(sid, ids, p, disagg=kv, resume_output_token_ids=resume, cache_salt=cache_salt,
                                   priority=priority)
        if kv is not None and kv.kind == "context_only":
            self._context_only[state.request_id] = params
        return state

    def _output(self, state: RequestState) -> RequestOutput:
        """The request's output; a finished context_only request's with its disaggregated_params
        (None when its first token ended it: then no KV is kept, the output is the whole answer).
        The params are made once per request (a step may hand its final output out twice)."""
        out = state.make_output()
        if not out.finished:
            return out
        if not hasattr(state, "disaggregated_params"):
            params = self._context_only.pop(state.request_id, None)
            dp = disagg.context_answer(out, params, self._core.kv_layouts) if params is not None else None
            state.disaggregated_params = None if dp is None else DisaggregatedParams(
                dp["request_type"], dp["first_gen_tokens"], dp["ctx_request_id"], dp["opaque_state"])
        out.disaggregated_params = state.disaggregated_params
        return out

    # ---- the engine loop ---------------------------------------------------------------------------
    def _step(self) -> None:
        """One engine step (caller holds the lock); routes outputs to their requests."""
        try:
            outputs = self._core.step()
        except BaseException as e:
            self._fail_all(e)
            raise
        if not outputs and self._core.scheduler.has_transfers() and not self._core.scheduler.has_unfinished():
            time.sleep(0.0005)  # only handovers pending (a pull runs on the ranks' threads): no busy loop
        res = self._outputs.process(outputs)
        if res.abort_seq_ids:
            self._core.abort_requests(res.abort_seq_ids)
        for state, err in res.failed:
            self._errors[state.request_id] = err
            self._context_only.pop(state.request_id, None)
            stream = self._async_streams.pop(state.request_id, None)
            if stream is not None:
                stream[0].call_soon_threadsafe(stream[1].put_nowait, err)
        for state in res.due:
            stream = self._async_streams.get(state.request_id)
            if stream is not None and stream[2]:  # a streaming reader
                stream[0].call_soon_threadsafe(stream[1].put_nowait, self._output(state))
        for state in res.finished:
            stream = self._async_streams.pop(state.request_id, None)
            if stream is not None:
                stream[0].call_soon_threadsafe(stream[1].put_nowait, self._output(state))

    def _fail_all(self, err: BaseException) -> None:
        self._error = err
        self._context_only.clear()
        for rid, (loop, queue, _) in list(self._async_streams.items()):
            loop.call_soon_threadsafe(queue.put_nowait, err)
        self._async_streams.clear()

    # ---- public API ----------------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True,
                 disaggregated_params: Union[DisaggregatedParams, Sequence[Optional[DisaggregatedParams]], None] = None,
                 priority: Optional[Sequence[int]] = None) -> Union[RequestOutput, list[RequestOutput]]:
        """`disaggregated_params` (one for all prompts, or one per prompt): disaggregated serving
        from the API (meshserve.llmapi.DisaggregatedParams; the LLM needs cache_transceiver_config).
        `priority` (vLLM's): one integer per prompt, lower first, for an LLM made with
        scheduling_policy="priority"."""
        single = isinstance(prompts, (str, dict)) or (
            isinstance(prompts, (list, tuple)) and bool(prompts) and all_ints(prompts))
        items = self._normalize(prompts)
        if sampling_params is None:
            params_list = [self.get_default_sampling_params()] * len(items)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(items)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(items):
                raise ValueError(f"sampling_params has {len(params_list)} entries but there are {len(items)} prompts")
        if disaggregated_params is None or isinstance(disaggregated_params, DisaggregatedParams):
            dps = [disaggregated_params] * len(items)
        else:
            dps = list(disaggregated_params)
            if len(dps) != len(items):
                raise ValueError(f"disaggregated_params has {len(dps)} entries but there are {len(items)} prompts")
        if priority is None:
            priorities = [0] * len(items)
        elif isinstance(priority, (list, tuple)) and len(priority) == len(items):
            priorities = list(priority)
        else:
            raise ValueError(f"priority={priority!r} is invalid: expected a list of one integer per prompt "
                             f"({len(items)})")
        with self._lock:
            self._check_open()
            prepared = [self._prepare(p, sp, dp, pr)  # all validated first
                        for p, sp, dp, pr in zip(items, params_list, dps, priorities)]
            states = [self._submit(*item) for item in prepared]
            bar = progress_bar(total=len(states), desc="Processed prompts", disable=not use_tqdm, unit="req")
            done = 0
            while True:
                finished = sum(s.finished for s in states)
                bar.update(finished - done)
                done = finished
                if done == len(states):
                    break
                self._step()
            bar.close()
            errors = [(s.request_id, self._errors.pop(s.request_id)) for s in states if s.request_id in self._errors]
        if errors:
            for s in states:
                self._context_only.pop(s.request_id, None)
            rid, err = errors[0]
            raise RuntimeError(f"request {rid} failed: {type(err).__name__}: {err}") from err
        outs = [self._output(s) for s in states]
        return outs[0] if single else outs

    def generate_async(self, prompt: PromptType, sampling_params: Optional[SamplingParams] = None,
                       streaming: bool = True,
                       disaggregated_params: Optional[DisaggregatedParams] = None,
                       priority: int = 0) -> "AsyncRequest":
        """Start a request; the result can be awaited (final output) or iterated with `async for`
        (partial outputs with the text so far, when streaming)."""
        params = sampling_params or self.get_default_sampling_params()
        loop = asyncio.get_event_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._check_open()
            state = self._submit(*self._prepare(prompt, params, disaggregated_params, priority))
            self._async_streams[state.request_id] = (loop, queue, streaming)
            self._ensure_background()
            self._wake.notify_all()
        return AsyncRequest(self, state, queue)

    def _ensure_background(self) -> None:
        if self._bg is None or not self._bg.is_alive():
            self._bg = threading.Thread(target=self._background_loop, name="meshserve-engine", daemon=True)
            self._bg.start()

    def _background_loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._async_streams:
                    self._wake.wait(timeout=1.0)
                if self._closed:
                    return
                try:
                    self._step()
                except BaseException:
                    logger.exception("engine step failed")
                    return

    def abort(self, request_id: str) -> None:
        """Stop a request started with generate_async; its stream ends with finish_reason "abort"."""
        with self._lock:
            state = self._outputs.requests.get(request_id)
            if state is None:
                return
            self._core.abort_requests(self._outputs.abort_request(request_id))
            stream = self._async_streams.pop(request_id, None)
        if stream is not None:
            loop, queue, _ = stream
            loop.call_soon_threadsafe(queue.put_nowait, self._output(state))
        self._context_only.pop(request_id, None)

    def beam_search(self, prompts, params: "BeamSearchParams", use_tqdm: bool = False) -> list["BeamSearchOutput"]:
        """vLLM's LLM.beam_search (meshserve/beam_search.py): for each prompt (text, token ids, or a dict
        with either), the best `params.beam_width` beams, best first; each beam's `tokens` hold the
        prompt's and the generated ids, its `text` the generated part. Every round is one engine call
        of one token per live beam (prefix caching reuses the beams' shared KV)."""
        from meshserve.beam_search import BeamBatch, BeamSearch, BeamSearchParams
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a meshserve.beam_search.BeamSearchParams, got {type(params).__name__}")
        searches = [BeamSearch(self._tokenize(p)[1], params, self._core.limits.eos_token_ids)
                    for p in self._normalize(prompts)]
        batch, step = BeamBatch(searches), params.step_params()
        while asks := batch.pending():
            outs = self.generate([{"prompt_token_ids": toks} for toks in asks], step, use_tqdm=use_tqdm)
            batch.advance([o.outputs[0].logprobs[0] for o in outs])
        decode = (lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)) if self.tokenizer else (lambda ids: "")
        return [s.result(decode) for s in searches]

    def chat(self, messages, sampling_params: Optional[SamplingParams] = None, use_tqdm: bool = False,
             chat_template: Optional[str] = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: Optional[list] = None,
             chat_template_kwargs: Optional[dict] = None):
        """One conversation (a list of {"role", "content"}; content a string or OpenAI's text parts)
        or a list of conversations, rendered by the chat template as vLLM's LLM.chat does: `tools`
        and `chat_template_kwargs` go to the template (the model sees the tools; its answer is
        text, not parsed into tool calls). One conversation gives one RequestOutput."""
        if self.tokenizer is None:
            raise ValueError("chat() needs a tokenizer (skip_tokenizer_init=True was set)")
        if continue_final_message and add_generation_prompt:
            raise ValueError("chat(): continue_final_message=True continues the last (assistant) message, so it "
                             "needs add_generation_prompt=False")
        single = bool(messages) and isinstance(messages[0], dict)
        convs = [messages] if single else list(messages)
        prompts = []
        for k, conv in enumerate(convs):
            try:
                conv = template_messages(conv)
            except MessageError as e:
                raise ValueError(f"chat(): {'' if single else f'conversation {k}: '}{e}") from None
            prompts.append(self.tokenizer.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools,
                continue_final_message=continue_final_message, chat_template=chat_template,
                **(chat_template_kwargs or {})))
        # The template already holds the special tokens: encode without adding a BOS again.
        ids = [{"prompt": p, "prompt_token_ids": self._encoder.encode(p, add_special_tokens=False)} for p in prompts]
        outs = self.generate(ids, sampling_params, use_tqdm=use_tqdm)
        return outs[0] if single else outs

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: the SamplingParams a call without them uses, with the fields the model's
        generation_config.json sets (generation_config="auto", the default; "vllm": none of them)."""
        return SamplingParams(**self.sampling_defaults)

    def get_tokenizer(self):
        """The tokenizer (vLLM's accessor; `llm.tokenizer` too)."""
        return self.tokenizer

    def get_stats(self) -> dict:
        """The engine's figures (running/waiting, KV use, prefix hits, preemptions...); for models
        with experts also `expert_tokens` {layer: tokens per expert} since start."""
        with self._lock:
            stats = self._core.stats()
            load = self._core.expert_load()
            if load:
                stats["expert_tokens"] = load["tokens"]
                stats["expert_load_ratio"] = load["ratio"]
            return stats

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forget the cached prefix blocks, so later prompts are computed from scratch. True
        when done; False (nothing changed) while a request holds KV blocks (a generate_async stream)."""
        with self._lock:
            self._check_open()
            return self._core.reset_prefix_cache()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this LLM has been shut down")
        if self._error is not None:
            raise RuntimeError(f"the engine failed earlier and cannot serve: {self._error}")

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify_all()
            core, self._core = self._core, None
        if core is not None:
            core.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass


def _settle_disagg_key() -> None:
    """As `meshserve serve` does with cache_transceiver_config: MESHSERVE_SECRET, else a key file
    (MESHSERVE_SECRET_FILE, else the default one, made when missing) that this process and its ranks
    read, so KV transfers and the signed params check out between LLMs and servers holding it."""
    import os

    from meshserve.disagg import params as signed

    found = signed.server_key_file()
    if found is not None:
        os.environ[signed.SECRET_FILE_ENV] = found[0]


class AsyncRequest:
    """Handle of one generate_async request: `await` it, or `async for` its partial outputs."""

    def __init__(self, llm: LLM, state: RequestState, queue: asyncio.Queue):
        self._llm, self._state, self._queue = llm, state, queue
        self.request_id = state.request_id
        self._final: Optional[RequestOutput] = None

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self):
        while self._final is None:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise RuntimeError(f"request {self.request_id} failed: {item}") from item
            if item.finished:
                self._final = item
            yield item

    async def aresult(self) -> RequestOutput:
        async for _ in self._iterate():
            pass
        return self._final

    def __await__(self):
        return self.aresult().__await__()

    def abort(self) -> None:
        self._llm.abort(self.request_id)
