"""`meshserve bench soak` (meshserve/bench/soak.py): 64 streams for 20 s against the embedded model (the
tool's default is 60 s; a third of it keeps CI within its time budget),
a fifth cancelled at random points, every completed stream equal to its non-streamed twin, the
server back to no sequence and no KV block afterwards, resident memory within the bound; and the
tool's own failure detection against a mock server that loses and mismatches."""
import json
import subprocess
import sys

import httpx
import pytest

from serve_util import API_KEY, REPO, start_server


def test_soak_64_streams_for_20_s_on_the_embedded_model(tmp_path):
    srv = start_server(None)
    try:
        out = tmp_path / "soak.json"
        proc = subprocess.run([sys.executable, "-m", "meshserve", "bench", "soak", "--base-url", srv.base_url,
                               "--api-key", API_KEY, "--concurrency", "64", "--duration", "20",
                               "--cancel-fraction", "0.2", "--result-json", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr + srv.log_tail()
        res = json.loads(out.read_text())
        assert res["completed"] > 64 and res["cancelled"] > 0, res
        assert res["mismatched"] == 0 and res["errors"] == 0 and res["ok"], res
        assert res["running_after"] == 0 and res["waiting_after"] == 0 and res["kv_used_blocks_after"] == 0
        assert res["rss_before"] > 0 and res["rss_after"] - res["rss_before"] <= res["rss_growth_bound"]
        m = srv.metrics()
        assert m.get("meshserve_requests_total[abort]", 0) >= 1  # the cancelled streams were aborted
        # the server still answers afterwards
        r = httpx.post(srv.base_url + "/v1/completions", headers=srv.headers, timeout=60,
                       json={"model": res["model"], "prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200
    finally:
        srv.stop()


def _mock_server(stream_text: str, kv_held: int):
    """An OpenAI-shaped mock whose streamed text may differ from the non-streamed one and whose
    /metrics may keep KV blocks held."""
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "mock"}]})
        if request.url.path == "/metrics":
            return httpx.Response(200, text=(f'meshserve_num_requests_running{{model_name="mock"}} 0.0\n'
                                             f'meshserve_num_requests_waiting{{model_name="mock"}} 0.0\n'
                                             f'meshserve_kv_cache_used_blocks{{model_name="mock"}} {kv_held}.0\n'
                                             f'process_resident_memory_bytes 1000.0\n'))
        body = json.loads(request.content)
        if not body.get("stream"):
            return httpx.Response(200, json={"choices": [{"text": " Paris.", "finish_reason": "length"}]})
        events = [{"choices": [{"text": t, "finish_reason": None}]} for t in stream_text.split("|")]
        events[-1]["choices"][0]["finish_reason"] = "length"
        sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})
    return httpx.MockTransport(handler)


@pytest.mark.parametrize("stream_text,kv_held,what", [(" Paris|.", 0, None), (" Lyon|.", 0, "mismatched"),
                                                       (" Paris|.", 3, "not settled")])
def test_soak_detects_mismatches_and_leaks(monkeypatch, tmp_path, stream_text, kv_held, what):
    import argparse

    from meshserve.bench import soak
    transport = _mock_server(stream_text, kv_held)
    real = httpx.AsyncClient

    def client(**kw):
        return real(transport=transport, **kw)
    monkeypatch.setattr(soak.httpx, "AsyncClient", client)
    monkeypatch.setattr(soak, "PROMPTS", ["The capital of France is"])
    args = argparse.Namespace(base_url="http://mock", model=None, api_key=None, concurrency=4, duration=0.3,
                              cancel_fraction=0.0, max_rss_growth_mb=512, settle_timeout=0.5, request_timeout=5,
                              seed=0, result_json=str(tmp_path / "r.json"))
    rc = soak.main(args)
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["completed"] > 0 and res["errors"] == 0
    if what is None:
        assert rc == 0 and res["mismatched"] == 0 and res["settled_s"] is not None
    elif what == "mismatched":
        assert rc == 1 and res["mismatched"] == res["completed"] and "Lyon" in res["samples"][0]
    else:
        assert rc == 1 and res["settled_s"] is None and res["kv_used_blocks_after"] == 3
        assert "not settled" in res["samples"][-1]
