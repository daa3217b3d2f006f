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
import threading
import traceback
from typing import Any, AsyncIterator, Optional, Sequence, Union

from tqdm import tqdm

from meshserve.config import LlmArgs, build_llm_args
from meshserve.engine.detokenizer import RequestState
from meshserve.engine.engine_core import EngineCore
from meshserve.engine.output_processor import OutputProcessor
from meshserve.engine.setup import create_engine_core, launch_for
from meshserve.errors import API_DEBUG_HINT, RankFailedError, describe
from meshserve.models.config import ModelConfig
from meshserve.models.resolve import resolve_model_path, resolve_tokenizer_path
from meshserve.outputs import RequestOutput
from meshserve.sampling_params import SamplingParams
from meshserve.tokenize import PromptEncoder
from meshserve.utils import all_ints
from meshserve.worker.main import exit_launched_rank, run_launched_rank

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


class LLM:
    def __init__(self, model: Optional[str] = None, tokenizer: Optional[str] = None, **kwargs: Any):
        self.args: LlmArgs = build_llm_args("LLM()", model=model, tokenizer=tokenizer, **kwargs)
        self.model_path = resolve_model_path(self.args.model, self.args.show_progress, self.args.load_format)
        launch = launch_for(self.args)
        if launch is not None and launch.rank != 0:
            # A launcher (mpirun, srun, torchrun) ran this script on every rank: rank 0 runs the
            # engine, this rank holds its shard until rank 0 shuts down. Its script does not go on
            # past LLM(): its generate() would have nothing to run. meshserve-launch avoids
            # running the script on worker ranks at all.
            code = run_launched_rank(self.args, self.model_path, launch)
            logger.info("rank %d: rank 0 shut down; this worker rank exits with code %d", launch.rank, code)
            exit_launched_rank(code)
        ModelConfig.from_pretrained(self.model_path)  # a bad config.json: our one-line error, not the tokenizer's
        tokenizer_path = resolve_tokenizer_path(self.args.tokenizer) or self.model_path
        self.tokenizer = None if self.args.skip_tokenizer_init else load_tokenizer(tokenizer_path)
        self._encoder = PromptEncoder(self.tokenizer) if self.tokenizer is not None else None
        try:
            self._core: Optional[EngineCore] = create_engine_core(
                self.args, self.model_path, launch, logging.getLevelName(logging.getLogger().getEffectiveLevel()))
        except RankFailedError as e:  # a worker's error, one line; its traceback is in that rank's DEBUG log
            if e.expected:
                raise
            raise RankFailedError(f"{e} ({API_DEBUG_HINT})") from None
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._outputs = OutputProcessor(self.tokenizer, self.args.stream_interval)
        self._errors: dict[str, Exception] = {}  # request id -> why processing its output failed
        self._async_streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, bool]] = {}
        self._ids = itertools.count()
        self._bg: Optional[threading.Thread] = None
        self._closed = False
        self._error: Optional[BaseException] = None

    # ---- inputs -------------------------------------------------------------------------------------
    def _tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer (skip_tokenizer_init=True was set); pass token ids")
            return prompt, self._encoder.encode(prompt)
        if isinstance(prompt, dict):
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

    def _prepare(self, prompt: PromptType, params: SamplingParams) -> tuple[Optional[str], list[int], SamplingParams,
                                                                            list[int]]:
        """Tokenize and validate; nothing is registered or added to the engine yet. A dict prompt's
        `resume_output_token_ids` continues an earlier run's output (the same params; the result
        as AsyncEngine.add_request describes it)."""
        text, ids = self._tokenize(prompt)
        resume = list(prompt.get("resume_output_token_ids") or ()) if isinstance(prompt, dict) else []
        self._core.validate(ids, params, resume)
        return text, ids, params, resume

    def _submit(self, text: Optional[str], ids: list[int], params: SamplingParams,
                resume: Sequence[int] = ()) -> RequestState:
        state, seqs = self._outputs.add_request(str(next(self._ids)), text, ids + list(resume), params)
        if resume:
            state.resume_output(list(resume))
        for sid, p in seqs:
            self._core.add_request(sid, ids, p, resume_output_token_ids=resume)
        return state

    # ---- the engine loop ---------------------------------------------------------------------------
    def _step(self) -> None:
        """One engine step (caller holds the lock); routes outputs to their requests."""
        try:
            outputs = self._core.step()
        except BaseException as e:
            self._fail_all(e)
            raise
        res = self._outputs.process(outputs)
        if res.abort_seq_ids:
            self._core.abort_requests(res.abort_seq_ids)
        for state, err in res.failed:
            self._errors[state.request_id] = err
            stream = self._async_streams.pop(state.request_id, None)
            if stream is not None:
                stream[0].call_soon_threadsafe(stream[1].put_nowait, err)
        for state in res.due:
            stream = self._async_streams.get(state.request_id)
            if stream is not None and stream[2]:  # a streaming reader
                stream[0].call_soon_threadsafe(stream[1].put_nowait, state.make_output())
        for state in res.finished:
            stream = self._async_streams.pop(state.request_id, None)
            if stream is not None:
                stream[0].call_soon_threadsafe(stream[1].put_nowait, state.make_output())

    def _fail_all(self, err: BaseException) -> None:
        self._error = err
        for rid, (loop, queue, _) in list(self._async_streams.items()):
            loop.call_soon_threadsafe(queue.put_nowait, err)
        self._async_streams.clear()

    # ---- public API ----------------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True) -> Union[RequestOutput, list[RequestOutput]]:
        single = isinstance(prompts, (str, dict)) or (
            isinstance(prompts, (list, tuple)) and bool(prompts) and all_ints(prompts))
        items = self._normalize(prompts)
        if sampling_params is None:
            params_list = [SamplingParams()] * len(items)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(items)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(items):
                raise ValueError(f"sampling_params has {len(params_list)} entries but there are {len(items)} prompts")
        with self._lock:
            self._check_open()
            prepared = [self._prepare(p, sp) for p, sp in zip(items, params_list)]  # all validated first
            states = [self._submit(*item) for item in prepared]
            bar = tqdm(total=len(states), desc="Processed prompts", disable=not use_tqdm, unit="req")
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
            rid, err = errors[0]
            raise RuntimeError(f"request {rid} failed: {type(err).__name__}: {err}") from err
        outs = [s.make_output() for s in states]
        return outs[0] if single else outs

    def generate_async(self, prompt: PromptType, sampling_params: Optional[SamplingParams] = None,
                       streaming: bool = True) -> "AsyncRequest":
        """Start a request; the result can be awaited (final output) or iterated with `async for`
        (partial outputs with the text so far, when streaming)."""
        params = sampling_params or SamplingParams()
        loop = asyncio.get_event_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._check_open()
            state = self._submit(*self._prepare(prompt, params))
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
            loop.call_soon_threadsafe(queue.put_nowait, state.make_output())

    def chat(self, messages, sampling_params: Optional[SamplingParams] = None, use_tqdm: bool = False,
             chat_template: Optional[str] = None, add_generation_prompt: bool = True):
        """One conversation (a list of {"role", "content"}) or a list of conversations."""
        if self.tokenizer is None:
            raise ValueError("chat() needs a tokenizer (skip_tokenizer_init=True was set)")
        single = bool(messages) and isinstance(messages[0], dict)
        convs = [messages] if single else list(messages)
        prompts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      chat_template=chat_template) for c in convs]
        # The template already holds the special tokens: encode without adding a BOS again.
        ids = [{"prompt": p, "prompt_token_ids": self._encoder.encode(p, add_special_tokens=False)} for p in prompts]
        outs = self.generate(ids, sampling_params, use_tqdm=use_tqdm)
        return outs[0] if single else outs

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
