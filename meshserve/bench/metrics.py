"""Turns per-request records of an online benchmark into the report.

serve.py fills one `RequestRecord` per request; `compute_metrics` reduces them (pure numpy, no I/O)
to a dict whose keys match the result JSON of `vllm bench serve`, and `format_report` prints it.
Times inside records are seconds; every `*_ms` figure in the report is milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

# The latency families of the report, in print order, with their titles.
LATENCY_METRICS = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}
DEFAULT_PERCENTILES = (90.0, 99.0)
SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """What one request measured. Times are seconds from the moment the request was sent.
    A failed request has success False and a non-empty error."""
    prompt_len: int
    success: bool = False
    error: str = ""
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between consecutive text chunks
    latency: float = 0.0  # end to end
    generated_text: str = ""
    start_time: float = 0.0  # perf_counter at send, to place the request on the run's timeline


def request_tpot(record: RequestRecord) -> Optional[float]:
    """(e2el - ttft) / (output_tokens - 1) in seconds; None when there is no second token."""
    if not record.success or record.output_tokens <= 1:
        return None
    return (record.latency - record.ttft) / (record.output_tokens - 1)


def percentile_key(p: float) -> str:
    """99 -> 'p99', 99.9 -> 'p99.9' (vLLM's spelling)."""
    return f"p{int(p)}" if float(p) == int(p) else f"p{p}"


def parse_percentiles(text: Optional[str]) -> list[float]:
    """'50,90,99' -> [50.0, 90.0, 99.0]; always includes the defaults p90 and p99."""
    values = set(DEFAULT_PERCENTILES)
    for part in (text or "").replace(" ", ",").split(","):
        if not part:
            continue
        try:
            p = float(part)
        except ValueError:
            raise ValueError(f"--percentiles: {part!r} is not a number; expected e.g. 50,90,99") from None
        if not 0.0 <= p <= 100.0:
            raise ValueError(f"--percentiles: {p} is outside [0, 100]")
        values.add(p)
    return sorted(values)


def parse_slo(text: Optional[str]) -> dict[str, float]:
    """'ttft:200,tpot:50' -> {'ttft': 200.0, 'tpot': 50.0} (milliseconds)."""
    slo: dict[str, float] = {}
    for part in (text or "").replace(" ", ",").split(","):
        if not part:
            continue
        key, sep, value = part.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--slo: {part!r} is not KEY:MS with KEY one of {', '.join(SLO_KEYS)}")
        try:
            slo[key] = float(value)
        except ValueError:
            raise ValueError(f"--slo: {value!r} in {part!r} is not a number of milliseconds") from None
        if slo[key] <= 0:
            raise ValueError(f"--slo: {part!r} must be a positive number of milliseconds")
    return slo


def _summarize(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict:
    # vLLM reports 0 rather than NaN when nothing was measured (e.g. every request failed).
    ms = np.asarray(values_s if len(values_s) else [0.0], dtype=np.float64) * 1000.0
    out = {
        f"mean_{name}_ms": float(np.mean(ms)),
        f"median_{name}_ms": float(np.median(ms)),
        f"std_{name}_ms": float(np.std(ms)),
    }
    for p in percentiles:
        out[f"{percentile_key(p)}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    if not record.success:
        return False
    measured_ms = {
        "ttft": record.ttft * 1000.0,
        "tpot": (request_tpot(record) or 0.0) * 1000.0,
        "e2el": record.latency * 1000.0,
    }
    return all(measured_ms[key] <= limit for key, limit in slo.items())


def compute_metrics(records: Sequence[RequestRecord], duration_s: float,
                    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                    slo: Optional[dict[str, float]] = None) -> dict:
    """The report for one run: counts, throughputs, latency statistics and per-request lists."""
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    percentiles = sorted(set(percentiles) | set(DEFAULT_PERCENTILES))
    ok = [r for r in records if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    tpots = [t for t in (request_tpot(r) for r in ok) if t is not None]
    samples = {
        "ttft": [r.ttft for r in ok],
        "tpot": tpots,
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    report = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": (sum(meets_slo(r, slo) for r in ok) / duration_s) if slo else None,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
    }
    for name in LATENCY_METRICS:
        report.update(_summarize(name, samples[name], percentiles))
    report.update({
        "input_lens": [r.prompt_len for r in records],
        "output_lens": [r.output_tokens if r.success else 0 for r in records],
        "ttfts": [r.ttft for r in records],
        "itls": [list(r.itl) for r in records],
        "errors": [r.error for r in records],
        # Not in vLLM's JSON; kept so plots can be redrawn from a saved result.
        "e2els": [r.latency for r in records],
        "tpots": [request_tpot(r) for r in records],
    })
    return report


def format_report(report: dict, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> str:
    """The terminal table, laid out like vLLM's."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value) -> None:
        if isinstance(value, float):
            lines.append("{:<40} {:<10.2f}".format(label, value))
        else:
            lines.append("{:<40} {:<10}".format(label, str(value)))

    rate = report.get("request_rate", "inf")
    row("Successful requests:", report["completed"])
    row("Failed requests:", report["failed"])
    row("Maximum request concurrency:", report.get("max_concurrency"))
    row("Request rate configured (RPS):", rate if isinstance(rate, str) else float(rate))
    row("Benchmark duration (s):", float(report["duration"]))
    row("Total input tokens:", report["total_input_tokens"])
    row("Total generated tokens:", report["total_output_tokens"])
    row("Request throughput (req/s):", float(report["request_throughput"]))
    if report.get("request_goodput") is not None:
        row("Request goodput (req/s):", float(report["request_goodput"]))
    row("Output token throughput (tok/s):", float(report["output_throughput"]))
    row("Total Token throughput (tok/s):", float(report["total_token_throughput"]))
    shown = sorted(set(percentiles) | set(DEFAULT_PERCENTILES))
    for name, title in LATENCY_METRICS.items():
        upper = name.upper()
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        row(f"Mean {upper} (ms):", report[f"mean_{name}_ms"])
        row(f"Median {upper} (ms):", report[f"median_{name}_ms"])
        for p in shown:
            key = f"{percentile_key(p)}_{name}_ms"
            if key in report:
                row(f"{percentile_key(p).upper()} {upper} (ms):", report[key])
    lines.append("=" * 50)
    return "\n".join(lines)
