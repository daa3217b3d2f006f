"""PNG figures of `bench serve` results (matplotlib, Agg backend, nothing shown on screen).

Input is the list of result dicts serve.py produces (or reads back from --result-json): one per
request rate. One rate: latency CDFs of TTFT, TPOT, ITL and E2E. Several rates: the same CDFs
with one line per rate, plus mean/p99 latencies and output throughput against the rate.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

_CDF_PANELS = (("TTFT", "ttfts"), ("TPOT", "tpots"), ("ITL", "itls"), ("E2E latency", "e2els"))
_SWEEP_PANELS = (("TTFT", "ttft"), ("ITL", "itl"), ("TPOT", "tpot"), ("E2E latency", "e2el"))


def _values_ms(result: dict, key: str) -> np.ndarray:
    """Per-request (per-gap for ITL) values of successful requests, in ms."""
    ok = [not e for e in result.get("errors", [])]
    values = result.get(key) or []
    if key == "itls":
        flat = [gap for good, gaps in zip(ok, values) if good for gap in gaps]
    else:
        flat = [v for good, v in zip(ok, values) if good and v is not None]
    return np.sort(np.asarray(flat, dtype=np.float64)) * 1000.0


def _rate_label(result: dict) -> str:
    rate = result.get("request_rate", "inf")
    text = "inf" if rate == "inf" else f"{float(rate):g}"
    concurrency = result.get("max_concurrency")
    return f"{text} req/s" + (f", c={concurrency}" if concurrency else "")


def plot_results(results: Sequence[dict], path: str) -> None:
    """Write the figure for `results` (one dict per rate) to `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = len(results) > 1
    fig, axes = plt.subplots(2 if sweep else 1, 4, figsize=(18, 8.5 if sweep else 4.5), squeeze=False)
    model = results[0].get("model_id", "")
    fig.suptitle(f"meshserve bench serve: {model}" if model else "meshserve bench serve")
    for ax, (title, key) in zip(axes[0], _CDF_PANELS):
        for result in results:
            values = _values_ms(result, key)
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post",
                        label=_rate_label(result))
        ax.set_title(f"{title} CDF")
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if key != "itls" else "fraction of gaps")
        ax.grid(alpha=0.3)
        if sweep:
            ax.legend(fontsize=7)
    if sweep:
        positions = np.arange(len(results))
        labels = [_rate_label(r).replace(" req/s", "") for r in results]
        for ax, (title, name) in zip(axes[1][:3], _SWEEP_PANELS):
            ax.plot(positions, [r[f"mean_{name}_ms"] for r in results], "o-", label="mean")
            ax.plot(positions, [r[f"p99_{name}_ms"] for r in results], "s--", label="p99")
            ax.set_title(f"{title} against request rate")
            ax.set_ylabel("ms")
        ax = axes[1][3]
        ax.plot(positions, [r["output_throughput"] for r in results], "o-")
        ax.set_title("Output throughput against request rate")
        ax.set_ylabel("output tok/s")
        for ax in axes[1]:
            ax.set_xticks(positions, labels)
            ax.set_xlabel("request rate (req/s)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
