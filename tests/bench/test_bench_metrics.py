"""metrics.py against hand computations and an independent numpy reduction."""
import numpy as np
import pytest

from meshserve.bench.metrics import (RequestRecord, compute_metrics, format_report, parse_percentiles,
                                     parse_slo)


def _records():
    return [
        RequestRecord(prompt_len=100, success=True, output_tokens=10, ttft=0.1, latency=1.0,
                      itl=[0.1] * 9),
        RequestRecord(prompt_len=200, success=True, output_tokens=11, ttft=0.2, latency=2.2,
                      itl=[0.15, 0.25] * 5),
        RequestRecord(prompt_len=300, success=False, error="HTTP 500: boom"),
        RequestRecord(prompt_len=50, success=True, output_tokens=1, ttft=0.3, latency=0.3),
    ]


def test_counts_and_throughputs_count_only_successes():
    m = compute_metrics(_records(), duration_s=4.0)
    assert (m["completed"], m["failed"]) == (3, 1)
    assert m["total_input_tokens"] == 350
    assert m["total_output_tokens"] == 22
    assert m["request_throughput"] == pytest.approx(3 / 4.0)
    assert m["output_throughput"] == pytest.approx(22 / 4.0)
    assert m["total_token_throughput"] == pytest.approx(372 / 4.0)
    assert m["request_goodput"] is None


def test_ttft_statistics_by_hand():
    m = compute_metrics(_records(), duration_s=1.0, percentiles=[50, 99.9])
    # successes' TTFTs 100, 200, 300 ms; linear interpolation: p90 at rank 1.8 -> 280, p99 -> 298
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["std_ttft_ms"] == pytest.approx(np.sqrt((100**2 + 0 + 100**2) / 3))
    assert m["p90_ttft_ms"] == pytest.approx(280.0)
    assert m["p99_ttft_ms"] == pytest.approx(298.0)
    assert m["p50_ttft_ms"] == pytest.approx(200.0)
    assert m["p99.9_ttft_ms"] == pytest.approx(299.8)


def test_tpot_is_decode_time_over_tokens_after_the_first():
    m = compute_metrics(_records(), duration_s=1.0)
    # (1.0-0.1)/9 = 100 ms and (2.2-0.2)/10 = 200 ms; the 1-token request has no TPOT
    assert m["mean_tpot_ms"] == pytest.approx(150.0)
    assert m["p90_tpot_ms"] == pytest.approx(190.0)
    assert m["tpots"][2] is None and m["tpots"][3] is None


def test_itl_and_e2el_match_an_independent_numpy_reduction():
    records = _records()
    m = compute_metrics(records, duration_s=1.0, percentiles=[25])
    itl_ms = 1000.0 * np.array([g for r in records if r.success for g in r.itl], dtype=np.float64)
    e2el_ms = 1000.0 * np.array([r.latency for r in records if r.success])
    for name, ref in (("itl", itl_ms), ("e2el", e2el_ms)):
        assert m[f"mean_{name}_ms"] == pytest.approx(ref.mean())
        assert m[f"median_{name}_ms"] == pytest.approx(np.median(ref))
        assert m[f"std_{name}_ms"] == pytest.approx(ref.std())
        for p in (25, 90, 99):
            assert m[f"p{p}_{name}_ms"] == pytest.approx(np.percentile(ref, p))


@pytest.mark.parametrize("slo,expected_good", [
    ("ttft:250", 2),            # 100 and 200 ms pass, 300 ms fails
    ("tpot:150", 2),            # 100 ms passes, 200 ms fails, the 1-token request counts as 0
    ("ttft:250,tpot:150", 1),   # every SLO must hold
    ("e2el:1000", 2),           # 1000 ms (equal) and 300 ms pass
    ("ttft:50", 0),
])
def test_goodput_counts_requests_meeting_every_slo(slo, expected_good):
    m = compute_metrics(_records(), duration_s=2.0, slo=parse_slo(slo))
    assert m["request_goodput"] == pytest.approx(expected_good / 2.0)


def test_all_failed_reports_zeros_not_nan():
    m = compute_metrics([RequestRecord(prompt_len=5, error="x")], duration_s=1.0)
    assert m["completed"] == 0 and m["failed"] == 1
    assert m["mean_ttft_ms"] == 0.0 and m["p99_itl_ms"] == 0.0


def test_parsers_reject_bad_values():
    assert parse_percentiles("50, 99.9") == [50.0, 90.0, 99.0, 99.9]
    assert parse_slo("ttft:200 tpot:50") == {"ttft": 200.0, "tpot": 50.0}
    for bad in ("ttft", "itl:5", "ttft:abc", "ttft:-1"):
        with pytest.raises(ValueError):
            parse_slo(bad)
    with pytest.raises(ValueError):
        parse_percentiles("101")


def test_report_table_has_vllm_layout():
    m = compute_metrics(_records(), duration_s=2.0, slo={"ttft": 250.0})
    m.update(request_rate=16.0, max_concurrency=None)
    text = format_report(m)
    assert text.splitlines()[0] == "============ Serving Benchmark Result ============"
    for label in ("Successful requests:", "Failed requests:", "Request goodput (req/s):",
                  "Mean TTFT (ms):", "P99 ITL (ms):", "Median E2EL (ms):", "Mean TPOT (ms):"):
        assert label in text
