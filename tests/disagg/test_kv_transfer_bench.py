"""benchmarks/kv_transfer.py (the `kv-transfer` GPU scenario) in its --smoke size on the CPU: the
bandwidth part (two processes per backend, every installed backend, checksums per layer, the copy
floor; NIXL's memory types and UCX's protocols recorded) and the serve part (context + generation
servers behind the orchestrator, then an aggregated server, the same client; the orchestrator's
per-hop histograms). ~15 s + ~45 s here."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "kv_transfer.py")


def _load():
    spec = importlib.util.spec_from_file_location("kv_transfer_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(args, out, timeout):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    env.pop("MESHSERVE_SECRET", None)  # the script makes one for its servers
    proc = subprocess.Popen([sys.executable, SCRIPT, "--smoke", "--out", str(out), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        text = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text = proc.communicate()[0]
        pytest.fail(f"kv_transfer.py --smoke {args} timed out after {timeout} s:\n{text[-4000:]}")
    assert proc.returncode == 0, text[-4000:]
    return json.loads((out / "summary.json").read_text()), text


def _installed(backend):
    module = {"NIXL": "nixl_cu13", "UCX": "ucxx", "MPI": "mpi4py"}[backend]
    return importlib.util.find_spec(module) is not None and (backend != "MPI" or shutil.which("mpirun"))


@pytest.mark.timeout(120)
def test_bandwidth_smoke(tmp_path):
    report, text = _run(["--part", "bandwidth"], tmp_path, 110)
    bw = report["bandwidth"]
    assert bw["kv_bytes"] == 2 * 4 * 512 * 2 * 64 * 2  # K and V x layers x tokens x heads x dim x bf16
    assert bw["floor"]["status"] == "ok" and bw["floor"]["seconds"] > 0
    for backend in ("DEFAULT", "NIXL", "UCX", "MPI"):
        res = bw["backends"][backend]
        if backend != "DEFAULT" and not _installed(backend):
            assert res["status"].startswith(("failed: ", "skipped: ")), res
            continue
        assert res["status"] == "ok", (backend, res, text[-3000:])
        rows = res["rows"]
        # every chunk setting x verify_payload on and off (where the sink has that setting; NIXL ignores it)
        assert sorted({str(r["max_tokens_in_buffer"]) for r in rows}) == ["2048", "None"]
        tcp_rows = [r for r in rows if r.get("cuda_ipc") != "auto"]
        verifies = {r["verify_payload"] for r in tcp_rows}
        assert verifies == ({None} if backend == "NIXL" else verifies) and verifies in ({None}, {True, False})
        assert len(tcp_rows) == 2 * len(verifies)
        # each backend's own channel moved the bytes (UCX and MPI sinks: DEFAULT's IPC path off)
        want = {"DEFAULT": "tcp", "NIXL": "nixl", "UCX": "ucx", "MPI": "mpi"}[backend]
        assert {r["path"] for r in tcp_rows} == {want}, tcp_rows
        if backend == "DEFAULT":  # those over TCP (cuda_ipc false), then cuda_ipc auto per chunk: TCP on a CPU
            assert {r["cuda_ipc"] for r in tcp_rows} == {False} and {r["path"] for r in tcp_rows} == {"tcp"}
            ipc_rows = [r for r in rows if r.get("cuda_ipc") == "auto"]
            assert len(ipc_rows) == 2 and {r["path"] for r in ipc_rows} == {"tcp"}, ipc_rows
        for row in rows:
            assert row["verified"] and row["bytes"] == bw["kv_bytes"] and len(row["runs_seconds"]) == 2, row
            assert row["gb_s"] > 0 and row["x_floor"] > 0
    nixl = bw["backends"]["NIXL"]
    if nixl["status"] == "ok":  # on the CPU the caches are DRAM; on a GPU this says VRAM
        assert nixl["context"]["nixl_registered_mem"] == "DRAM"
        assert all(r["nixl_transfer_mem"] == ["local DRAM <- remote DRAM"] and r["nixl_direct_reads"] > 0
                   and r["nixl_staged_reads"] == 0 for r in nixl["rows"])
        assert any("remote memory read" in p and "host memory" in p for p in nixl["ucx_protocols"]), nixl
    assert "copy floor" in text and "DEFAULT" in text and "cuda_ipc" in text


@pytest.mark.timeout(150)
def test_serve_smoke(tmp_path):
    report, text = _run(["--part", "serve", "--num-prompts", "3", "--num-warmups", "1"], tmp_path, 140)
    sv = report["serve"]
    dis, agg = sv["disaggregated"], sv["aggregated"]
    assert dis["status"] == "ok", dis
    assert agg["status"] == "ok", agg
    for part in (dis, agg):
        assert part["client"]["completed"] == 3 and part["client"]["failed"] == 0, part
        assert part["client"]["mean_ttft_ms"] > 0 and part["client"]["output_throughput"] > 0
    hops = dis["orchestrator_hops"]
    for name in ("meshserve_disagg_context_seconds", "meshserve_disagg_generation_first_byte_seconds",
                 "meshserve_disagg_time_to_first_token_seconds"):
        assert hops[name]["count"] == 3 and hops[name]["mean_s"] > 0, (name, hops[name])  # warm-ups left out
    assert dis["orchestrator_counters"]["meshserve_disagg_failures_total"] == 0
    for role in ("context_server", "generation_server"):
        assert dis[role]["kv_cache_used_blocks"] == 0, dis[role]  # nothing left pinned
    assert "orchestrator hops" in text


def test_histogram_delta_and_protocol_parsing(tmp_path):
    kt = _load()
    before = kt.parse_metrics('h_bucket{le="0.1"} 1.0\nh_bucket{le="1.0"} 1.0\nh_bucket{le="+Inf"} 1.0\n'
                              "h_count 1.0\nh_sum 0.05\n")
    after = kt.parse_metrics('h_bucket{le="0.1"} 3.0\nh_bucket{le="1.0"} 11.0\nh_bucket{le="+Inf"} 11.0\n'
                             "h_count 11.0\nh_sum 4.05\n")
    d = kt.histogram_delta(before, after, "h")
    assert d["count"] == 10 and d["mean_s"] == pytest.approx(0.4)
    assert d["p50_s"] == pytest.approx(0.1 + 0.9 * 3 / 8)  # 2 in (0, 0.1], 8 in (0.1, 1]: rank 5 is the 3rd of 8
    log = tmp_path / "gen.log"
    log.write_text(
        "[1.0] [h:1:1]   | agent intra-node cfg#1                                          |\n"
        "[1.0] [h:1:1]   | remote memory read by ucp_get*(multi) into cuda memory from cuda |\n"
        "[1.0] [h:1:1]   +--------+-------------+------------------+\n"
        "[1.0] [h:1:1]   | Range  | Description | Config           |\n"
        "[1.0] [h:1:1]   +--------+-------------+------------------+\n"
        "[1.0] [h:1:1]   | 0..inf | zero-copy   | cuda_ipc/cuda0   |\n"
        "[1.0] [h:1:1]   +--------+-------------+------------------+\n"
        "  NIXL chunk=None run 1: 1.074 GB\n")
    assert kt.ucx_protocols(str(log)) == [
        "remote memory read by ucp_get*(multi) into cuda memory from cuda: 0..inf zero-copy cuda_ipc/cuda0"]
