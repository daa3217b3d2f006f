"""`meshserve bench throughput` through the real LLM on a tiny checkpoint: the reported counts are
the requests and tokens that were asked for (ignore_eos fixes the output lengths), and per-request
end-to-end latency is reported."""
import json
import subprocess
import sys

from helpers import build_checkpoint


def test_offline_throughput_on_a_real_engine(tmp_path):
    build_checkpoint(str(tmp_path / "m"), "llama")
    out = tmp_path / "t.json"
    r = subprocess.run([sys.executable, "-m", "meshserve", "bench", "throughput", str(tmp_path / "m"),
                        "--input-len", "16", "--output-len", "8", "--num-requests", "12", "--result-json", str(out),
                        "--disable-tqdm"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["num_requests"] == 12 and res["total_output_tokens"] == 12 * 8
    assert res["total_input_tokens"] == 12 * 16 and res["output_throughput"] > 0
    # end-to-end latency comes from each request's finished_time: no request can take longer than
    # the whole run, nor finish before its first token
    assert 0 < res["mean_e2el_ms"] <= res["elapsed_time"] * 1000
    assert res["median_ttft_ms"] <= res["median_e2el_ms"]
