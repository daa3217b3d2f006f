"""Prometheus metrics of the API server (GET /metrics), all named `meshserve_*`.

Request-level figures (tokens, TTFT, TPOT, end-to-end latency, finish reasons) come from the
AsyncEngine as requests finish; engine-level ones (running/waiting, KV usage, prefix-cache hit
rate, queue time, iteration latency) come from the stats the engine process attaches to its outputs.
Each server owns its registry, so several servers can live in one process (tests).
"""
from __future__ import annotations

from typing import Optional

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics,
                               generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from meshserve.engine.detokenizer import RequestState

CONTENT_TYPE = CONTENT_TYPE_LATEST
disable_created_metrics()  # the *_created samples only add noise to a scrape

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                  1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_LENGTH_BUCKETS = tuple(m * 10 ** e for e in range(7) for m in (1, 2, 5))  # vLLM's 1-2-5 series: tokens
_ITERATION_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024,
                      2.048, 4.096, 8.192)


class ServerMetrics:
    """Implements AsyncEngine's EngineObserver and renders the Prometheus text."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, {"model_name": model_name}

        def counter(name, doc, extra=()):
            return Counter(f"meshserve_{name}", doc, ["model_name", *extra], registry=r)

        def histogram(name, doc, buckets):
            return Histogram(f"meshserve_{name}", doc, ["model_name"], buckets=buckets, registry=r).labels(**labels)

        def gauge(name, doc):
            return Gauge(f"meshserve_{name}", doc, ["model_name"], registry=r).labels(**labels)

        self.labels = labels
        self.requests = counter("requests", "Finished sequences, by finish reason (stop, length, abort)",
                                ("finish_reason",))
        self.errors = counter("request_errors", "Requests answered with an error, by HTTP status", ("status",))
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests").labels(**labels)
        self.generation_tokens = counter("generation_tokens", "Generated tokens").labels(**labels)
        self.preemptions = counter("num_preemptions", "Sequences preempted by the scheduler").labels(**labels)
        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first token",
                              _LATENCY_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Mean time between output tokens, per request",
                              _TOKEN_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token",
                             _LATENCY_BUCKETS)
        # vLLM's request_prompt_tokens / request_generation_tokens (per request, its longest sample) and
        # request_decode_time_seconds (first token to the last)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens of each finished request",
                                               _LENGTH_BUCKETS)
        self.request_generation_tokens = histogram("request_generation_tokens", "Generated tokens of each "
                                                   "finished request (its longest sample)", _LENGTH_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds", "Time from a request's first token to its "
                                     "last", _LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Time a sequence waited before it was first "
                                    "scheduled", _LATENCY_BUCKETS)
        self.iteration = histogram("iteration_latency_seconds", "Engine iteration (step) latency: from a batch's "
                                   "launch, or the previous batch's outputs if later, to its outputs (schedule, "
                                   "run the model on every rank, sample)", _ITERATION_BUCKETS)
        self.running = gauge("num_requests_running", "Sequences in the engine's running batch")
        self.waiting = gauge("num_requests_waiting", "Sequences in the engine's waiting queue")
        self.kv_usage = gauge("kv_cache_usage_ratio", "Fraction of KV cache blocks held by live sequences (0-1)")
        self.kv_used = gauge("kv_cache_used_blocks", "KV cache blocks held by live sequences")
        self.kv_total = gauge("kv_cache_total_blocks", "Usable KV cache blocks")
        self.prefix_hit_rate = gauge("prefix_cache_hit_rate", "Fraction of looked-up prompt tokens found in the "
                                     "prefix cache (0-1)")
        # vLLM's prefix_cache_queries / prefix_cache_hits: rate() of the two is the hit rate over a window
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache").labels(
            **labels)
        self.prefix_hits = counter("prefix_cache_hits", "Looked-up prompt tokens found in the prefix cache").labels(
            **labels)
        self.healthy = gauge("engine_healthy", "1 while the engine process serves, 0 after it failed")
        self.engine_rss = gauge("engine_resident_memory_bytes", "Resident memory of the engine process (the "
                                "API server's own is process_resident_memory_bytes)")
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc. of this (the API server's) process
        self.stage_busy = Gauge("meshserve_pipeline_stage_busy_ratio", "Fraction of the last ~1 s each pipeline "
                                "stage spent computing (1 - bubbles); absent without pipeline parallelism",
                                ["model_name", "stage"], registry=r)
        self.expert_tokens = Counter("meshserve_moe_expert_tokens", "Tokens routed to each expert of each MoE "
                                     "layer (graph per layer to see imbalance)", ["model_name", "layer", "expert"],
                                     registry=r)
        # without samples until the first report (a dense model never has one): 0 would read as a ratio
        self.expert_ratio_mean = Gauge("meshserve_moe_expert_load_ratio_mean", "Mean over recent steps of the "
                                       "max/mean tokens-per-expert ratio of a step (averaged over MoE layers); "
                                       "1 = balanced", ["model_name"], registry=r)
        self.expert_ratio_max = Gauge("meshserve_moe_expert_load_ratio_max", "Largest max/mean tokens-per-expert "
                                      "ratio of one step over the last reported window (averaged over MoE layers)",
                                      ["model_name"], registry=r)
        dp = ["model_name", "dp_rank"]  # attention DP: one series per rank (absent without it)
        self.dp_running = Gauge("meshserve_attention_dp_requests_running", "Sequences running on each attention "
                                "DP rank", dp, registry=r)
        self.dp_waiting = Gauge("meshserve_attention_dp_requests_waiting", "Sequences waiting on each attention "
                                "DP rank", dp, registry=r)
        self.dp_kv_usage = Gauge("meshserve_attention_dp_kv_cache_usage_ratio", "Fraction of each attention DP "
                                 "rank's KV cache blocks held by live sequences (0-1)", dp, registry=r)
        self.dp_placed = Gauge("meshserve_attention_dp_requests_placed", "Requests placed on each attention DP "
                               "rank since start", dp, registry=r)
        self._last_preemptions = 0
        self._last_prefix = (0, 0)  # the engine's cumulative (queries, hits) at its last report

    # ---- EngineObserver ------------------------------------------------------------------------------
    def on_request_added(self, state: RequestState) -> None:
        self.prompt_tokens.inc(len(state.prompt_token_ids))

    def on_tokens(self, num_generated: int) -> None:
        self.generation_tokens.inc(num_generated)

    def on_request_finished(self, state: RequestState, finish_time: float) -> None:
        for seq in state.seqs.values():
            self.requests.labels(finish_reason=seq.finish_reason or "abort", **self.labels).inc()
        if state.first_token_time is None:
            return
        self.ttft.observe(state.first_token_time - state.arrival_time)
        self.e2e.observe(finish_time - state.arrival_time)
        self.decode_time.observe(finish_time - state.first_token_time)
        num_tokens = max(len(s.token_ids) for s in state.seqs.values())
        self.request_prompt_tokens.observe(len(state.prompt_token_ids))
        self.request_generation_tokens.observe(num_tokens)
        if num_tokens > 1:
            self.tpot.observe((finish_time - state.first_token_time) / (num_tokens - 1))

    def on_engine_stats(self, stats: dict) -> None:
        self.running.set(stats.get("num_running", 0))
        self.waiting.set(stats.get("num_waiting", 0))
        self.kv_usage.set(stats.get("kv_cache_usage", 0.0))
        total = stats.get("num_blocks", 0)
        self.kv_total.set(total)
        self.kv_used.set(total - stats.get("num_free_blocks", total))
        self.prefix_hit_rate.set(stats.get("prefix_cache_hit_rate", 0.0))
        queries, hits = stats.get("prefix_cache_queries", 0), stats.get("prefix_cache_hits", 0)
        if queries >= self._last_prefix[0] and hits >= self._last_prefix[1]:
            self.prefix_queries.inc(queries - self._last_prefix[0])
            self.prefix_hits.inc(hits - self._last_prefix[1])
        self._last_prefix = (queries, hits)
        if stats.get("rss_bytes"):
            self.engine_rss.set(stats["rss_bytes"])
        preemptions = stats.get("num_preemptions", 0)
        if preemptions > self._last_preemptions:
            self.preemptions.inc(preemptions - self._last_preemptions)
            self._last_preemptions = preemptions
        for stage, fraction in enumerate(stats.get("pipeline_stage_busy_fraction") or ()):
            self.stage_busy.labels(stage=str(stage), **self.labels).set(fraction)
        for rank in stats.get("attention_dp_ranks") or ():
            labels = {"dp_rank": str(rank["dp_rank"]), **self.labels}
            self.dp_running.labels(**labels).set(rank["num_running"])
            self.dp_waiting.labels(**labels).set(rank["num_waiting"])
            self.dp_kv_usage.labels(**labels).set(rank["kv_cache_usage"])
            self.dp_placed.labels(**labels).set(rank["num_requests_placed"])
        for rep in stats.get("expert_load_reports") or ():
            for layer, counts in zip(rep["layers"], rep["tokens"]):
                for expert, n in enumerate(counts):
                    if n:
                        self.expert_tokens.labels(layer=str(layer), expert=str(expert), **self.labels).inc(n)
            self.expert_ratio_mean.labels(**self.labels).set(rep["ratio_mean"])
            self.expert_ratio_max.labels(**self.labels).set(rep["ratio_max"])
        for v in stats.get("iteration_latencies_s", ()):
            self.iteration.observe(v)
        for v in stats.get("queue_times_s", ()):
            self.queue_time.observe(v)

    # ---- server side ---------------------------------------------------------------------------------
    def on_error(self, status: int) -> None:
        self.errors.labels(status=str(status), **self.labels).inc()

    def render(self, healthy: Optional[bool] = None) -> bytes:
        if healthy is not None:
            self.healthy.set(1 if healthy else 0)
        return generate_latest(self.registry)
