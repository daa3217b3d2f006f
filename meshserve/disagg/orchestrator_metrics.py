"""The orchestrator's Prometheus metrics (`/metrics`: `meshserve_disagg_*`): per-hop histograms,
retry/failure/failover counters and per-server gauges."""
from __future__ import annotations

import contextlib
from typing import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from meshserve.disagg.router import Server


_HOP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0)
_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                  1.0, 2.5, 5.0, 10.0)


class DisaggMetrics:
    """The orchestrator's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("meshserve_disagg_requests", "Requests received, by route", ["route"], registry=r)
        self.errors = Counter("meshserve_disagg_request_errors", "Requests answered with an error, by HTTP status "
                              "(the servers' errors passed on included)", ["status"], registry=r)
        self.retries = Counter("meshserve_disagg_retries", "Requests re-sent to another server after a failure, "
                               "by stage", ["stage"], registry=r)
        self.failures = Counter("meshserve_disagg_failures", "Server hops that failed (connection error, timeout, "
                                "5xx, a stream cut short or stalled), retried or not, by stage", ["stage"], registry=r)
        self.failovers = Counter("meshserve_disagg_failovers", "Requests whose generation server failed (died, "
                                 "stalled past stall_timeout, or sent a 5xx error event) continued on another "
                                 "server", registry=r)
        self.context = Histogram("meshserve_disagg_context_seconds", "Context hop: from sending the context-only "
                                 "request to its answer (prefill + first token: the context TTFT)",
                                 buckets=_HOP_BUCKETS, registry=r)
        self.gen_first_byte = Histogram("meshserve_disagg_generation_first_byte_seconds", "Generation hop: from "
                                        "sending the generation-only request to the first body bytes (KV transfer "
                                        "+ first chunk; a non-streaming answer: all of it)", buckets=_HOP_BUCKETS,
                                        registry=r)
        self.gen_tpot = Histogram("meshserve_disagg_generation_tpot_seconds", "Mean time between output tokens "
                                  "of a streamed generation (tokens from usage when the client asked for it, else "
                                  "one per content chunk)", buckets=_TOKEN_BUCKETS, registry=r)
        self.ttft = Histogram("meshserve_disagg_time_to_first_token_seconds", "Streamed requests: from arrival to "
                              "the first generated chunk passed on", buckets=_HOP_BUCKETS, registry=r)
        self.e2e = Histogram("meshserve_disagg_request_seconds", "From arrival to the last byte answered",
                             buckets=_HOP_BUCKETS, registry=r)
        self.healthy = Gauge("meshserve_disagg_server_healthy", "1 while the server answers /health, else 0",
                             ["role", "server"], registry=r)
        self.inflight = Gauge("meshserve_disagg_server_inflight", "Requests this orchestrator has open on the "
                              "server", ["role", "server"], registry=r)

    def forget(self, server: Server) -> None:
        """A server that left (/unregister): its gauges go."""
        for gauge in (self.healthy, self.inflight):
            with contextlib.suppress(KeyError):
                gauge.remove(server.role, server.address)

    def render(self, servers: Sequence[Server]) -> bytes:
        for s in servers:
            self.healthy.labels(s.role, s.address).set(1 if s.healthy else 0)
            self.inflight.labels(s.role, s.address).set(s.inflight)
        return generate_latest(self.registry)
