#!/usr/bin/env python
"""Scenario `kv-transfer` (issues 22 and 23): disaggregated serving's KV hand-over on one GPU.

Part `bandwidth`: the KV of one 8,192-token request of the Llama-3.1-8B shape (32 layers, 8 KV
heads, head_dim 128, bf16, K and V, blocks of the engine's default size: 1.07 GB) sits in a
context-side `KvSource` in one process and is pulled by a `KvSink` in another process (both on
cuda:0), through `create_transceiver(backend)` and the sink's `pull` with `max_tokens_in_buffer`
chunking: the engine's own path (worker/kv_transfer.py). Per backend (DEFAULT = TCP, NIXL, UCX;
MPI as the two apps of one MPMD mpirun when mpirun and mpi4py are there), chunk setting and
`verify_payload` (the payload MAC, where the tree has it; NIXL has none): one warm-up pull, then
--repeats timed pulls into zeroed caches (DEFAULT: over TCP with cuda_ipc false, and with cuda_ipc auto,
the same-host GPU-to-GPU path where both caches are CUDA tensors; each row's `path` column says how
the bytes moved, tcp or cuda_ipc), each checked layer by layer (a position-weighted checksum
of the request's tokens, on both sides) -> bytes, median seconds, GB/s, and the ratio to the copy
floor: one `Tensor.copy_` of the same bytes within the GPU, measured in the same run. NIXL's result
says which memory type its caches were registered as and which its transfers named (VRAM on a GPU),
how many reads went direct or staged, and (UCX_PROTO_INFO=y) the protocol and transport UCX chose
for its READs (cuda_ipc between VRAM regions, or a bounce through host memory). A backend whose
wheel is missing or that fails is one "failed: <reason>" line, and the next one runs.

Part `serve`: a context and a generation `meshserve serve` (random weights, the same shape; each
`kv_cache_config.free_gpu_memory_fraction` --memory-fraction, `cache_transceiver_config: {backend:
DEFAULT}`, one MESHSERVE_SECRET) on the same GPU behind `meshserve disaggregated`, the online-8b
client (`meshserve bench serve` with benchmarks/online_8b.py's flags, 467 in / 256 out) at --rate
through the orchestrator, with the orchestrator's per-hop histograms (/metrics, deltas over the
measured run); then the same client and prompts against ONE aggregated server (default memory
fraction). Warm-up requests (other prompts) go before each measured run.

Every part writes OUT/summary.json after each step (a timeout keeps what was measured) and
prints a table at the end.

    python benchmarks/kv_transfer.py --out $OUT/kv                        # both parts
    python benchmarks/kv_transfer.py --out $OUT/kv --part bandwidth
    python benchmarks/kv_transfer.py --out $OUT/kv --part serve --num-prompts 100
    python benchmarks/kv_transfer.py --smoke --out /tmp/kv                # tiny, runs on a CPU
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEY = b"kv-transfer-bench-key"
MODEL_ID = "kv-transfer-bench"
BACKENDS = ("DEFAULT", "NIXL", "UCX", "MPI")



def log(msg: str) -> None:
    print(f"[kv-transfer {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def one_line(s: str, limit: int = 300) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def default_block_size() -> int:
    from meshserve.config import KvCacheConfig
    return KvCacheConfig.model_fields["tokens_per_block"].default


def child_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.update(extra or {})
    return env


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def kill_group(proc: subprocess.Popen, grace_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Stop a child started with start_new_session=True (its pid is its process group's id) and
    everything in its group; returns once none of them is alive (GPU memory freed), or after 20 s."""
    if proc is None:
        return
    pgid = proc.pid
    if proc.poll() is None:
        try:
            os.killpg(pgid, sig)
            proc.wait(grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(pgid, signal.SIGKILL)  # whatever is left in the group
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 20
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


def log_tail(path: str, n: int = 1) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:]) if lines else "(empty log)"


def write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------------------------
# bandwidth: the roles (context, generation, floor) run in processes of their own
# ---------------------------------------------------------------------------------------------

def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_WEIGHTS: dict = {}


def checksum(cache, block_ids: list[int], block_size: int, n: int) -> str:
    """A position-weighted sum (int64, wrapping) over the request's tokens of one layer, token-major
    [2, n, heads, dim] as 16-bit words: equal on both sides iff (barring collisions) the same bytes
    sit at the same token positions, whatever the block ids and block sizes."""
    import torch
    dev = cache.device
    flat = cache.view(2, cache.shape[1] * cache.shape[2], cache.shape[3], cache.shape[4])
    t = torch.arange(n, device=dev)
    idx = torch.tensor(block_ids, device=dev)[t // block_size] * block_size + t % block_size
    words = flat.index_select(1, idx).contiguous().view(-1).view(torch.int16).to(torch.int64)
    key = (str(dev), words.numel())
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        _WEIGHTS[key] = torch.arange(words.numel(), device=dev, dtype=torch.int64) % 65521 + 1
    return format(int((words * _WEIGHTS[key]).sum()) & (2**64 - 1), "016x")


def _geometry(spec: dict):
    import torch
    from meshserve.disagg.transceiver import RankLayout
    layers = tuple(range(spec["layers"]))
    layout = RankLayout("", MODEL_ID, spec["dtype"], spec["block_size"], layers, spec["kv_heads"],
                        (0, spec["kv_heads"]), spec["head_dim"])
    need = -(-spec["tokens"] // spec["block_size"])
    num_blocks = 2 * need + 1  # a request's blocks are scattered over a cache twice its size
    shape = (2, num_blocks, spec["block_size"], spec["kv_heads"], spec["head_dim"])
    return layout, need, num_blocks, shape, torch.device(spec["device"]), getattr(torch, spec["dtype"])


def _block_ids(num_blocks: int, need: int, seed: int) -> list[int]:
    import torch
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(num_blocks - 1, generator=g)[:need] + 1).tolist()


def _wait_for(path: str, abort: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        if os.path.exists(abort):
            return False
        time.sleep(0.02)
    return False


def role_context(d: str) -> None:
    """Hold the request's KV in a KvSource until DIR/done appears."""
    import msgspec
    import torch
    from meshserve.disagg.transceiver import KvRequest, create_transceiver

    spec = read_json(os.path.join(d, "spec.json"))
    try:
        Source, _ = create_transceiver(spec["backend"])  # MPI: MPI_Init waits for the generation side too
    except ValueError as e:
        write_json(os.path.join(d, "ctx_error.json"), {"error": one_line(str(e))})
        open(os.path.join(d, "abort"), "w").close()
        return
    try:
        layout, need, num_blocks, shape, device, dtype = _geometry(spec)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        g = torch.Generator(device=device).manual_seed(1234)
        caches = []
        for _ in layout.layers:
            c = torch.empty(shape, dtype=dtype, device=device)
            c.copy_(torch.randn(shape, generator=g, device=device, dtype=torch.float32))
            caches.append(c)
        ids = _block_ids(num_blocks, need, 1)
        sums = [checksum(c, ids, spec["block_size"], spec["tokens"]) for c in caches]
        _sync(device)
        src = Source(caches, layout, host="127.0.0.1", key=KEY, require_registered=True)
    except Exception as e:  # noqa: BLE001 - the backend's failure, in one line; the traceback goes to the log
        write_json(os.path.join(d, "ctx_error.json"), {"error": one_line(f"context side: {type(e).__name__}: {e}")})
        open(os.path.join(d, "abort"), "w").close()
        raise
    try:
        src.register(KvRequest("ctx-kv-bench", [ids], spec["tokens"]))
        info = {"layout": msgspec.to_builtins(src.layout), "block_ids": ids, "checksums": sums,
                "source_class": type(src).__name__, "cache_bytes": sum(c.numel() * c.element_size() for c in caches)}
        if hasattr(src, "_mem"):  # NIXL: the memory type the caches were registered as (and granted as)
            info["nixl_registered_mem"] = src._mem
        tmp = os.path.join(d, "ctx.tmp")
        with open(tmp, "wb") as f:
            f.write(msgspec.msgpack.encode(info))
        os.replace(tmp, os.path.join(d, "ctx.msgpack"))
        _wait_for(os.path.join(d, "done"), os.path.join(d, "never"), spec["timeout_s"])
    finally:
        src.close()


_PREFIX = re.compile(r"^\[[^\]]*\]\s*\[[^\]]*\]\s*")
_DATA_PATH = re.compile(r"(remote memory read|tagged message) by \S+")
_RANGE = re.compile(r"^[0-9KMGinf.]+$")


def ucx_protocols(*paths: str) -> list[str]:
    """The data-path protocols UCX chose, from its UCX_PROTO_INFO=y tables in the logs: NIXL's READs
    ("remote memory read by ucp_get* into <cuda|host> memory from <cuda|host>") and UCX tag sends,
    each with its ranges, methods and transports (e.g. cuda_ipc/cuda0, cma/memory, tcp/lo)."""
    found: list[str] = []
    for path in paths:
        try:
            lines = open(path, errors="replace").read().splitlines()
        except OSError:
            continue
        title, rows = None, []

        def flush():
            if title and rows:
                entry = f"{title}: " + "; ".join(rows)
                if entry not in found:
                    found.append(entry)
        for raw in lines:
            line = _PREFIX.sub("", raw).strip()
            cells = [c.strip() for c in line.strip("|").split("|")] if line.startswith("|") else []
            text = " ".join(cells)
            m = _DATA_PATH.search(text)
            if m:
                flush()
                title, rows = text[m.start():].strip(), []
            elif title and len(cells) >= 3 and _RANGE.match(cells[0].replace(" ", "")):
                rows.append(" ".join(c for c in cells if c))
            elif title and not line.startswith("+") and not line.startswith("|"):
                flush()
                title, rows = None, []
        flush()
    return found[:16]


def engine_verify_default() -> Optional[bool]:
    """cache_transceiver_config.verify_payload's default (None where this tree has no such setting)."""
    from meshserve.config import CacheTransceiverConfig
    field = CacheTransceiverConfig.model_fields.get("verify_payload")
    return None if field is None else field.default


def _sink_takes(Sink, name: str) -> bool:
    """The sink's constructor has the keyword `name` (the first __init__ that names its parameters:
    UCX's passes *args, **kwargs on)."""
    import inspect
    for cls in Sink.__mro__:
        if "__init__" in cls.__dict__:
            params = inspect.signature(cls.__init__).parameters
            if name in params or not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                return name in params
    return False


def _row_settings(spec: dict, Sink) -> list[tuple[Optional[int], Optional[bool], object]]:
    """(max_tokens_in_buffer, verify_payload, cuda_ipc) of each row: every chunk setting x the
    payload-MAC settings asked for (None: the sink's default, where the sink has no such setting or
    ignores it), over TCP (cuda_ipc False where the sink has that setting: DEFAULT); then, where it
    has it and --cuda-ipc asks, every chunk setting with cuda_ipc "auto" (the GPU-to-GPU path when
    both caches are CUDA tensors on this host, else TCP: the row's `path` says which)."""
    supports = _sink_takes(Sink, "verify_payload") and spec["backend"] != "NIXL"
    takes_ipc = _sink_takes(Sink, "cuda_ipc")  # DEFAULT, and UCX / MPI, whose sinks would take DEFAULT's
    ipc = takes_ipc and spec["backend"] == "DEFAULT"  # IPC path on one host: off for them, so their channel is timed
    mode = spec["verify_payload"]
    if not supports or mode == "default":
        verifies = [None]
    else:
        verifies = {"on": [True], "off": [False], "both": [True, False]}[mode]
    ipc_mode = spec.get("cuda_ipc", "both")
    rows = []
    if not ipc or ipc_mode in ("both", "off"):
        rows += [(c, v, False if takes_ipc else None) for v in verifies for c in spec["chunks"]]
    if ipc and ipc_mode in ("both", "auto"):
        rows += [(c, None, "auto") for c in spec["chunks"]]
    return rows


def role_generation(d: str) -> None:
    """Pull the request's KV repeatedly; DIR/result.json after each chunk setting."""
    import msgspec
    import torch
    from meshserve.disagg.transceiver import KvRequest, RankLayout, TransferState, create_transceiver

    spec = read_json(os.path.join(d, "spec.json"))
    result = {"rows": [], "error": None}
    out = os.path.join(d, "result.json")
    try:
        try:
            _, Sink = create_transceiver(spec["backend"])
        except ValueError as e:
            result["error"] = one_line(str(e))
            return
        if not _wait_for(os.path.join(d, "ctx.msgpack"), os.path.join(d, "abort"), spec["timeout_s"]):
            result["error"] = "the context side never got ready"
            return
        info = msgspec.msgpack.decode(open(os.path.join(d, "ctx.msgpack"), "rb").read())
        sources = [msgspec.convert(info["layout"], RankLayout)]
        result["context"] = {k: v for k, v in info.items() if k not in ("layout", "block_ids", "checksums")}
        layout, need, num_blocks, shape, device, dtype = _geometry(spec)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in layout.layers]
        dst_ids = _block_ids(num_blocks, need, 2)
        req = KvRequest("ctx-kv-bench", [info["block_ids"]], spec["tokens"])
        for chunk, verify, ipc in _row_settings(spec, Sink):
            row = {"max_tokens_in_buffer": chunk, "verify_payload": verify, "cuda_ipc": ipc, "runs": [], "error": None}
            result["rows"].append(row)
            kwargs = {} if verify is None else {"verify_payload": verify}
            if ipc is not None:
                kwargs["cuda_ipc"] = ipc
            sink = Sink(caches, layout, max_tokens_in_buffer=chunk, key=KEY, **kwargs)
            mems: set = set()
            if hasattr(sink, "_transfer"):  # NIXL: note the memory types each transfer names
                orig = sink._transfer

                def transfer(agent, local, remote, mem_local, mem_remote, *a, _orig=orig, **k):
                    mems.add(f"local {mem_local} <- remote {mem_remote}")
                    row["nixl_descriptors_per_transfer_max"] = max(row.get("nixl_descriptors_per_transfer_max", 0),
                                                                   len(local))
                    return _orig(agent, local, remote, mem_local, mem_remote, *a, **k)
                sink._transfer = transfer
            try:
                for i in range(spec["repeats"] + 1):
                    for c in caches:
                        c.zero_()
                    _sync(device)
                    t0 = time.perf_counter()
                    r = sink.pull(sources, req, [dst_ids], spec["pull_timeout_s"])
                    _sync(device)
                    wall = time.perf_counter() - t0
                    if r.state is not TransferState.SUCCESS:
                        row["error"] = one_line(r.error or "failed")
                        break
                    sums = [checksum(c, dst_ids, spec["block_size"], spec["tokens"]) for c in caches]
                    bad = [j for j, (a, b) in enumerate(zip(sums, info["checksums"])) if a != b]
                    run = {"warmup": i == 0, "seconds": wall, "pull_seconds": r.seconds, "bytes": r.bytes,
                           "verified": not bad, "layers_differing": bad[:8], "path": getattr(r, "path", None)}
                    row["runs"].append(run)
                    row["path"] = run["path"]  # tcp, cuda_ipc, nixl(_gpu), ucx(_gpu) or mpi (the last run's)
                    print(f"  {spec['backend']} chunk={chunk} verify={verify} cuda_ipc={ipc} path={run['path']} "
                          f"{'warm-up' if i == 0 else f'run {i}'}: "
                          f"{r.bytes / 1e9:.3f} GB in {wall * 1e3:.1f} ms, verified={not bad}", flush=True)
                    write_json(out, result)
            finally:
                if mems:
                    row["nixl_transfer_mem"] = sorted(mems)
                if hasattr(sink, "direct_reads"):
                    row["nixl_direct_reads"], row["nixl_staged_reads"] = sink.direct_reads, sink.staged_reads
                sink.close()
            write_json(out, result)
            if row["error"]:
                break  # a backend that failed once fails: the next backend gets the time
        result["complete"] = True
    except Exception as e:  # noqa: BLE001 - reported as the backend's failure
        result["error"] = one_line(f"{type(e).__name__}: {e}")
        raise
    finally:
        write_json(out, result)
        open(os.path.join(d, "done"), "w").close()


def role_floor(d: str) -> None:
    """Device-to-device copy_ of the same bytes within one device: median of N after a warm-up."""
    import torch
    spec = read_json(os.path.join(d, "spec.json"))
    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(1)  # a copy of a few MB: thread-pool wake-ups would be most of it on a busy host
    n = spec["nbytes"]
    a = torch.empty(n, dtype=torch.uint8, device=device).fill_(7)
    b = torch.empty_like(a)
    times = []
    for i in range(spec["repeats"] + 2):
        if device.type == "cuda":
            torch.cuda.set_device(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            b.copy_(a)
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            b.copy_(a)
            dt = time.perf_counter() - t0
        if i >= 2:
            times.append(dt)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    write_json(os.path.join(d, "floor.json"), {"device_name": name, "bytes": n, "runs": times,
                                               "seconds": statistics.median(times), "min_seconds": min(times)})


# -- the parent side ---------------------------------------------------------------------------

def _start_role(role: str, d: str, log_name: str, env: Optional[dict] = None) -> subprocess.Popen:
    logf = open(os.path.join(d, log_name), "w")
    try:
        return subprocess.Popen([sys.executable, __file__, "--_role", role, "--_dir", d], stdout=logf,
                                stderr=subprocess.STDOUT, env=child_env(env), start_new_session=True, cwd=str(ROOT))
    finally:
        logf.close()


def _why_failed(d: str) -> str:
    for name in ("ctx_error.json",):
        err = read_json(os.path.join(d, name))
        if err and err.get("error"):
            return err["error"]
    res = read_json(os.path.join(d, "result.json"))
    if res and res.get("error"):
        return res["error"]
    for name in ("generation.log", "context.log", "mpirun.log"):
        path = os.path.join(d, name)
        if os.path.exists(path) and os.path.getsize(path):
            tail = log_tail(path, 1)
            if tail:
                return f"{name}: {one_line(tail)}"
    return "no result"


def run_floor(d: str, spec: dict, timeout_s: float) -> dict:
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d, exist_ok=True)
    write_json(os.path.join(d, "spec.json"), spec)
    proc = _start_role("floor", d, "floor.log")
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        kill_group(proc, 5)
    floor = read_json(os.path.join(d, "floor.json"))
    if not floor:
        return {"status": f"failed: {one_line(log_tail(os.path.join(d, 'floor.log')))}"}
    floor["status"] = "ok"
    floor["payload_gb_s"] = floor["bytes"] / floor["seconds"] / 1e9
    floor["traffic_gb_s"] = 2 * floor["payload_gb_s"]  # a copy reads and writes every byte
    return floor


def run_backend(backend: str, d: str, spec: dict, timeout_s: float) -> dict:
    """Run one backend's context and generation processes; its result (status ok / failed / skipped)."""
    shutil.rmtree(d, ignore_errors=True)  # a run before's endpoint / done / abort files would mislead this one
    os.makedirs(d, exist_ok=True)
    spec = dict(spec, backend=backend)
    write_json(os.path.join(d, "spec.json"), spec)
    t_start = time.monotonic()
    procs = []
    try:
        if backend == "MPI":
            if shutil.which("mpirun") is None:
                return {"status": "skipped: mpirun is not installed (the MPI backend needs both sides in one mpirun)"}
            import importlib.util
            if importlib.util.find_spec("mpi4py") is None:
                return {"status": "skipped: mpi4py is not installed"}
            from meshserve.distributed.launch import local_mpirun
            cmd = local_mpirun(btl="self,sm,tcp") + ["-x", "PYTHONPATH", "-x", "PYTHONUNBUFFERED",
                            "-np", "1", sys.executable, __file__, "--_role", "context", "--_dir", d, ":",
                            "-np", "1", sys.executable, __file__, "--_role", "generation", "--_dir", d]
            logf = open(os.path.join(d, "mpirun.log"), "w")
            procs.append(subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=child_env(),
                                          start_new_session=True, cwd=str(ROOT)))
            logf.close()
            gen = procs[0]
        else:
            # UCX prints the protocols it picks (NIXL's READs: cuda_ipc between VRAM regions, or a host bounce)
            env = {"UCX_PROTO_INFO": os.environ.get("UCX_PROTO_INFO", "y")} if backend in ("NIXL", "UCX") else {}
            ctx = _start_role("context", d, "context.log", env)
            procs.append(ctx)
            gen = _start_role("generation", d, "generation.log", env)
            procs.append(gen)
        deadline = time.monotonic() + timeout_s
        while gen.poll() is None and time.monotonic() < deadline:
            if backend != "MPI" and procs[0].poll() is not None and not os.path.exists(os.path.join(d, "done")):
                open(os.path.join(d, "abort"), "w").close()  # the context side died: the generation side stops
            time.sleep(0.1)
        timed_out = gen.poll() is None
    finally:
        open(os.path.join(d, "done"), "w").close()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                pass
            kill_group(p, 5)
    res = read_json(os.path.join(d, "result.json")) or {}
    out = {"seconds_total": time.monotonic() - t_start}
    rows = []
    for row in res.get("rows", []):
        runs = [r for r in row["runs"] if not r["warmup"]]
        entry = {k: v for k, v in row.items() if k != "runs"}
        entry["runs_seconds"] = [r["seconds"] for r in runs]
        entry["runs_pull_seconds"] = [r["pull_seconds"] for r in runs]
        entry["warmup_seconds"] = next((r["seconds"] for r in row["runs"] if r["warmup"]), None)
        entry["verified"] = bool(row["runs"]) and all(r["verified"] for r in row["runs"])
        entry["bad_layers"] = sorted({j for r in row["runs"] for j in r["layers_differing"]})
        if runs:
            entry["bytes"] = runs[0]["bytes"]
            entry["seconds"] = statistics.median(entry["runs_seconds"])
            entry["gb_s"] = entry["bytes"] / entry["seconds"] / 1e9
        rows.append(entry)
    out["rows"] = rows
    if backend in ("NIXL", "UCX"):
        out["ucx_protocols"] = ucx_protocols(os.path.join(d, "generation.log"), os.path.join(d, "context.log"))
    if res.get("context"):
        out["context"] = res["context"]
    good = [r for r in rows if r.get("seconds") and not r.get("error") and r["verified"]]
    if rows and len(good) == len(rows) and res.get("complete"):
        out["status"] = "ok"
    elif timed_out:
        out["status"] = f"failed: timed out after {timeout_s:.0f} s ({_why_failed(d)})"
    else:
        reasons = [r["error"] for r in rows if r.get("error")]
        reasons += [f"chunk {r['max_tokens_in_buffer']}: the received bytes differ from the sent ones in layers "
                    f"{r['bad_layers']}" for r in rows if r["bad_layers"]]
        out["status"] = f"failed: {one_line(reasons[0] if reasons else _why_failed(d))}"
    return out


def bandwidth_part(a, device: str, work: str, report: dict, save) -> None:
    spec = {"device": device, "dtype": "bfloat16", "layers": a.layers, "kv_heads": a.kv_heads,
            "head_dim": a.head_dim, "tokens": a.tokens, "block_size": a.block_size, "repeats": a.repeats,
            "chunks": a.chunks, "verify_payload": a.verify_payload, "cuda_ipc": a.cuda_ipc,
            "timeout_s": a.backend_timeout,
            "pull_timeout_s": min(40.0, a.backend_timeout / 2)}
    nbytes = 2 * a.layers * a.tokens * a.kv_heads * a.head_dim * 2
    bw = report["bandwidth"] = {"shape": {k: spec[k] for k in ("layers", "kv_heads", "head_dim", "tokens",
                                                                "block_size", "dtype")},
                                "device": device, "kv_bytes": nbytes, "repeats": a.repeats,
                                "chunks": a.chunks, "verify_payload": a.verify_payload, "cuda_ipc": a.cuda_ipc,
                                "engine_verify_payload_default": engine_verify_default(), "backends": {}}
    log(f"bandwidth: {a.tokens} tokens x {a.layers} layers x {a.kv_heads} heads x {a.head_dim} bf16 K+V, "
        f"blocks of {a.block_size} = {nbytes / 1e9:.3f} GB on {device}")
    bw["floor"] = run_floor(os.path.join(work, "floor"), {"device": device, "nbytes": nbytes,
                                                          "repeats": max(a.repeats, 5)}, a.backend_timeout)
    f = bw["floor"]
    if f["status"] == "ok":
        log(f"copy floor: {f['seconds'] * 1e3:.3f} ms = {f['payload_gb_s']:.1f} GB/s payload, "
            f"{f['traffic_gb_s']:.1f} GB/s read+write ({f['device_name']})")
    else:
        log(f"copy floor: {f['status']}")
    save()
    for backend in a.backends:
        log(f"backend {backend}: starting")
        res = run_backend(backend, os.path.join(work, backend.lower()), spec, a.backend_timeout)
        if f["status"] == "ok":
            for row in res.get("rows", []):
                if row.get("seconds"):
                    row["x_floor"] = row["seconds"] / f["seconds"]
        bw["backends"][backend] = res
        save()
        log(f"backend {backend}: {res['status']} ({res.get('seconds_total', 0):.0f} s)")


def print_bandwidth(bw: dict) -> None:
    f = bw.get("floor", {})
    print(f"\nkv-transfer bandwidth: {bw['kv_bytes'] / 1e9:.3f} GB ({bw['shape']['tokens']} tokens, "
          f"{bw['shape']['layers']} layers, blocks of {bw['shape']['block_size']}) on {bw['device']}, "
          f"median of {bw['repeats']} after a warm-up; MAC: verify_payload (- the sink's default: "
          f"{bw.get('engine_verify_payload_default')}, or none); cuda_ipc: the sink's setting (DEFAULT), path: "
          f"how the bytes moved")
    if f.get("status") == "ok":
        print(f"copy floor (copy_ within the device): {f['seconds'] * 1e3:.3f} ms, {f['payload_gb_s']:.1f} GB/s "
              f"payload ({f['traffic_gb_s']:.1f} GB/s read+write)")
    else:
        print(f"copy floor: {f.get('status')}")
    print(f"{'backend':>8} {'chunk':>6} {'MAC':>5} {'cuda_ipc':>8} {'path':>8} {'GB':>7} {'median ms':>10} "
          f"{'GB/s':>8} {'x floor':>8} {'checksums':>9}  notes")
    for name, res in bw.get("backends", {}).items():
        rows = res.get("rows") or []
        if res["status"] != "ok" and not any(r.get("seconds") for r in rows):
            print(f"{name:>8}  {res['status']}")
            continue
        for r in rows:
            notes = []
            if r.get("nixl_transfer_mem"):
                notes.append("; ".join(r["nixl_transfer_mem"]))
            if "nixl_direct_reads" in r:
                notes.append(f"direct {r['nixl_direct_reads']} staged {r['nixl_staged_reads']}")
            if r.get("error"):
                notes.append(f"failed: {r['error']}")
            mac = {None: "-", True: "on", False: "off", "auto": "auto"}[r.get("verify_payload")]
            ipc = {None: "-", True: "on", False: "off", "auto": "auto"}[r.get("cuda_ipc")]
            path = r.get("path") or "-"
            if not r.get("seconds"):
                print(f"{name:>8} {str(r['max_tokens_in_buffer']):>6} {mac:>5} {ipc:>8} {path:>8}  {'; '.join(notes)}")
                continue
            print(f"{name:>8} {str(r['max_tokens_in_buffer']):>6} {mac:>5} {ipc:>8} {path:>8} {r['bytes'] / 1e9:>7.3f} "
                  f"{r['seconds'] * 1e3:>10.1f} {r['gb_s']:>8.2f} {r.get('x_floor', float('nan')):>8.0f} "
                  f"{'ok' if r['verified'] else 'DIFFER':>9}  {'; '.join(notes)}")
        if res["status"] != "ok" and any(r.get("seconds") for r in rows):
            print(f"{name:>8}  {res['status']}")
    for name, res in bw.get("backends", {}).items():
        ctx = res.get("context") or {}
        if ctx.get("nixl_registered_mem"):
            print(f"{name}: caches registered as {ctx['nixl_registered_mem']} on the context side")
        reads = [p for p in res.get("ucx_protocols") or [] if "remote memory read" in p]
        for p in (reads or res.get("ucx_protocols") or [])[:3 if reads else 1]:
            print(f"{name}: UCX {p}")


# ---------------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """A server (or the orchestrator) in its own process group, its output in a log file."""

    def __init__(self, name: str, cmd: list[str], log_path: str, port: int):
        self.name, self.log_path, self.port = name, log_path, port
        self.url = f"http://127.0.0.1:{port}"
        self.started = time.monotonic()
        self.ready_s: Optional[float] = None
        logf = open(log_path, "w")
        log(f"start {name}: {' '.join(cmd)}")
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=child_env(),
                                     start_new_session=True, cwd=str(ROOT))
        logf.close()

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def wait(self, timeout_s: float, until_log: Optional[str] = None) -> "Child":
        """Until /health answers 200 (or `until_log` appears in its log); raises when it exits or times out."""
        import httpx
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {log_tail(self.log_path, 3)}")
            if until_log and until_log in self.log_text():
                return self
            try:
                if httpx.get(self.url + "/health", timeout=2.0, trust_env=False).status_code == 200:
                    self.ready_s = time.monotonic() - self.started
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f} s: {log_tail(self.log_path, 3)}")

    def kv_cache_line(self) -> Optional[str]:
        m = re.search(r"KV cache: \d+ blocks of \d+ tokens \(\d+ tokens\)", self.log_text())
        return m.group(0) if m else None

    def stop(self) -> None:
        kill_group(self.proc, 40)


def metrics_text(url: str) -> str:
    import httpx
    try:
        return httpx.get(url + "/metrics", timeout=10.0, trust_env=False).text
    except httpx.HTTPError as e:
        return f"# unreadable: {e}"


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEnaINF]+)')


def parse_metrics(text: str) -> dict:
    """{metric name: {labels string: value}} of a Prometheus text page."""
    out: dict = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            try:
                out.setdefault(m.group(1), {})[m.group(2) or ""] = float(m.group(3))
            except ValueError:
                pass
    return out


def _quantile(q: float, buckets: list[tuple[float, float]], count: float) -> Optional[float]:
    """Prometheus' histogram_quantile: linear within the bucket holding the q-th observation."""
    if count <= 0:
        return None
    rank, prev_le, prev_c = q * count, 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 1.0)
        prev_le, prev_c = le, c
    return prev_le


def histogram_delta(before: dict, after: dict, name: str) -> Optional[dict]:
    """count, mean and interpolated p50 / p90 / p99 (seconds) of histogram `name` between two scrapes."""
    def get(page, suffix):
        return page.get(name + suffix, {})
    b_after, b_before = get(after, "_bucket"), get(before, "_bucket")
    if not b_after:
        return None
    buckets = []
    for labels, v in b_after.items():
        m = re.search(r'le="([^"]+)"', labels)
        if m:
            le = float("inf") if m.group(1) in ("+Inf", "Inf") else float(m.group(1))
            buckets.append((le, v - b_before.get(labels, 0.0)))
    buckets.sort()
    count = sum(get(after, "_count").values()) - sum(get(before, "_count").values())
    total = sum(get(after, "_sum").values()) - sum(get(before, "_sum").values())
    return {"count": count, "mean_s": total / count if count else None,
            "p50_s": _quantile(0.5, buckets, count), "p90_s": _quantile(0.9, buckets, count),
            "p99_s": _quantile(0.99, buckets, count)}


HOPS = {  # orchestrator histogram -> what it measures
    "meshserve_disagg_context_seconds": "context hop (prefill + first token: the context TTFT)",
    "meshserve_disagg_generation_first_byte_seconds": "generation hop to its first bytes (KV transfer + first chunk)",
    "meshserve_disagg_time_to_first_token_seconds": "arrival to the first chunk relayed (the client's TTFT)",
    "meshserve_disagg_generation_tpot_seconds": "time per output token of the generation stream",
    "meshserve_disagg_request_seconds": "arrival to the last byte",
}
COUNTERS = ("meshserve_disagg_request_errors_total", "meshserve_disagg_failures_total",
            "meshserve_disagg_retries_total", "meshserve_disagg_failovers_total")


def counter_delta(before: dict, after: dict, name: str) -> float:
    return sum(after.get(name, {}).values()) - sum(before.get(name, {}).values())


def tiny_model(path: str) -> str:
    """A tiny Llama config + byte-level BPE tokenizer (random weights with --load-format dummy)."""
    from meshserve.models.shapes import TokenizerSpec, build_tokenizer
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return path
    os.makedirs(path, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
           "mlp_bias": False, "bos_token_id": 509, "eos_token_id": [510, 511], "hidden_act": "silu",
           "hidden_size": 64, "intermediate_size": 128, "initializer_range": 0.02,
           "max_position_embeddings": 2048, "num_attention_heads": 4, "num_hidden_layers": 2,
           "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": False, "vocab_size": 512}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    spec = TokenizerSpec(("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"), 509, 512, "<|begin_of_text|>",
                         "<|eot_id|>", True,
                         "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    build_tokenizer(spec, 2048).save_pretrained(path)
    return path


def bench_serve(a, url: str, model: str, out_dir: str, name: str, num: int, rate: str, seed: int,
                timeout_s: float) -> dict:
    """`meshserve bench serve` with benchmarks/online_8b.py's flags (random dataset, --input-len /
    --output-len, ignore_eos) plus --client-extra-body, in a process of its own; its result dict."""
    os.makedirs(out_dir, exist_ok=True)
    result_json = os.path.join(out_dir, f"{name}.json")
    cmd = [sys.executable, "-m", "meshserve", "bench", "serve", "--base-url", url, "--tokenizer", model,
           "--dataset", "random", "--input-len", str(a.input_len), "--output-len", str(a.output_len),
           "--num-prompts", str(num), "--request-rate", rate, "--num-warmups", "0", "--seed", str(seed),
           "--result-json", result_json, "--disable-tqdm"]
    if a.client_extra_body:
        cmd += ["--extra-body", a.client_extra_body]
    logp = os.path.join(out_dir, f"{name}.log")
    with open(logp, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=child_env(), cwd=str(ROOT),
                                start_new_session=True)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{name} client did not finish in {timeout_s:.0f} s") from None
        finally:
            kill_group(proc, 5)
    result = read_json(result_json)
    if proc.returncode != 0 or not isinstance(result, dict):
        raise RuntimeError(f"{name} client failed ({proc.returncode}): {log_tail(logp, 2)}")
    if not result.get("completed"):
        errors = [e for e in result.get("errors") or [] if e]
        raise RuntimeError(f"{name}: every request failed: {one_line(errors[0] if errors else log_tail(logp, 2))}")
    return result


def run_client(a, url: str, model: str, out_dir: str, timeout_s: float, between=None) -> dict:
    """Warm-up requests (prompts of their own: seed 1) at once, then `between()` (a metrics scrape),
    then --num-prompts at --rate (seed 0, the same prompts for every server): the measured row."""
    if a.num_warmups:
        log(f"warm-up: {a.num_warmups} requests -> {url}")
        bench_serve(a, url, model, out_dir, "warmup", a.num_warmups, "inf", 1, timeout_s)
    if between is not None:
        between()
    log(f"client: {a.num_prompts} requests at rate {a.rate:g} -> {url}")
    r = bench_serve(a, url, model, out_dir, "measured", a.num_prompts, f"{a.rate:g}", 0, timeout_s)
    errors = [e for e in r.get("errors") or [] if e]
    row = {k: r.get(k) for k in ("completed", "failed", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                                 "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_tpot_ms", "output_throughput",
                                 "duration", "client_cpu_fraction")}
    if errors:
        row["first_error"] = one_line(errors[0])
    return row


def serve_part(a, device: str, work: str, report: dict, save) -> None:
    sv = report["serve"] = {"model": "tiny (smoke)" if a.smoke else a.model, "device": device,
                            "num_prompts": a.num_prompts, "num_warmups": a.num_warmups, "rate": a.rate,
                            "input_len": a.input_len, "output_len": a.output_len,
                            "memory_fraction": a.memory_fraction, "transfer_backend": a.serve_backend,
                            "client_extra_body": a.client_extra_body,
                            "verify_payload_engine_default": engine_verify_default()}
    t0 = time.monotonic()
    if a.smoke:
        model = tiny_model(os.path.join(work, "tiny-llama"))
    else:
        from meshserve.bench.shapes import resolve_model
        model = resolve_model(a.model)
    os.environ.setdefault("MESHSERVE_SECRET", secrets.token_hex(16))  # the servers and orchestrator share it
    flags = ["--load-format", "dummy", "--host", "127.0.0.1"] + a.server_args
    if a.smoke:
        kv_yaml = "kv_cache_config:\n  max_tokens: 4096\n"
        flags += ["--max_batch_size", "8", "--max_seq_len", "512"]
    else:
        kv_yaml = f"kv_cache_config:\n  free_gpu_memory_fraction: {a.memory_fraction}\n"
    disagg_yaml = os.path.join(work, "disagg-server.yml")
    with open(disagg_yaml, "w") as f:
        f.write(f"cache_transceiver_config:\n  backend: {a.serve_backend}\n" + kv_yaml)
    agg_cfg = []
    if a.smoke:  # else the defaults (memory fraction as usual)
        with open(os.path.join(work, "agg-server.yml"), "w") as f:
            f.write(kv_yaml)
        agg_cfg = ["--config", os.path.join(work, "agg-server.yml")]
    meshserve = [sys.executable, "-m", "meshserve"]
    client_timeout = a.num_prompts / a.rate + a.output_len * 0.5 + 180

    def server(name: str, extra: list[str]) -> Child:
        port = free_port()
        return Child(name, meshserve + ["serve", model] + flags + ["--port", str(port)] + extra,
                     os.path.join(work, f"{name}.log"), port)

    # -- disaggregated ---------------------------------------------------------------------------
    dis = sv["disaggregated"] = {"status": "running"}
    children: list[Child] = []
    # the smoke run's aggregated server (CPU, a tiny model) loads beside the disaggregated ones; a GPU
    # run's starts after them, as it sizes its KV cache from the memory they leave free
    agg_early = server("aggregated", agg_cfg) if a.smoke else None
    try:
        ctx = server("context", ["--config", disagg_yaml])
        children.append(ctx)
        # Each sizes its KV cache as a fraction of the GPU memory free when it looks: started together,
        # the two can at worst both see the other's share still free, 2 x fraction of it in all (safe at
        # 0.4); above 0.45 the generation server starts once the context server is up.
        if a.memory_fraction > 0.45 and not a.smoke:
            ctx.wait(a.startup_timeout)
        gen = server("generation", ["--config", disagg_yaml])
        children.append(gen)
        ctx.wait(a.startup_timeout)
        gen.wait(a.startup_timeout)
        dis["context_server"] = {"ready_s": ctx.ready_s, "kv_cache": ctx.kv_cache_line()}
        dis["generation_server"] = {"ready_s": gen.ready_s, "kv_cache": gen.kv_cache_line()}
        log(f"context server ready in {ctx.ready_s:.0f} s ({ctx.kv_cache_line()}); generation server in "
            f"{gen.ready_s:.0f} s ({gen.kv_cache_line()})")
        save()
        oport = free_port()
        cfg = os.path.join(work, "disagg-config.yml")
        with open(cfg, "w") as f:
            f.write(f"hostname: 127.0.0.1\nport: {oport}\nbackend: pytorch\n"
                    f"context_servers:\n  num_instances: 1\n  urls:\n    - \"127.0.0.1:{ctx.port}\"\n"
                    f"generation_servers:\n  num_instances: 1\n  urls:\n    - \"127.0.0.1:{gen.port}\"\n")
        orch = Child("orchestrator", meshserve + ["disaggregated", "-c", cfg], os.path.join(work, "orchestrator.log"),
                     oport)
        children.append(orch)
        orch.wait(60)
        before = {}

        def scrape_before():
            before.update(parse_metrics(metrics_text(orch.url)))

        dis["client"] = run_client(a, orch.url, model, os.path.join(work, "client_disagg"), client_timeout,
                                   scrape_before)
        after = parse_metrics(metrics_text(orch.url))
        dis["orchestrator_hops"] = {name: dict(histogram_delta(before, after, name) or {}, what=what)
                                    for name, what in HOPS.items()}
        dis["orchestrator_counters"] = {name: counter_delta(before, after, name) for name in COUNTERS}
        for role, child in (("context", ctx), ("generation", gen)):
            page = parse_metrics(metrics_text(child.url))
            for key in ("kv_cache_used_blocks", "kv_cache_total_blocks"):
                dis[f"{role}_server"][key] = sum(page.get(f"meshserve_{key}", {}).values())
        dis["status"] = "ok"
        log(f"disaggregated: {_client_line(dis['client'])}")
    except Exception as e:  # noqa: BLE001 - reported, and the aggregated run still goes
        dis["status"] = f"failed: {one_line(f'{type(e).__name__}: {e}', 600)}"
        log(f"disaggregated: {dis['status']}")
    finally:
        if dis["status"] == "running":
            dis["status"] = "interrupted"
        for child in reversed(children):
            child.stop()
        save()

    # -- aggregated --------------------------------------------------------------------------------
    agg = sv["aggregated"] = {"status": "running"}
    child = agg_early
    try:
        child = child or server("aggregated", agg_cfg)
        child.wait(a.startup_timeout)
        # started beside the disaggregated servers (smoke): first seen ready after their run, not a load time
        agg["server"] = {"ready_s": None if agg_early else child.ready_s, "kv_cache": child.kv_cache_line()}
        log(f"aggregated server ready{'' if agg_early else f' in {child.ready_s:.0f} s'} ({child.kv_cache_line()})")
        agg["client"] = run_client(a, child.url, model, os.path.join(work, "client_agg"), client_timeout)
        agg["status"] = "ok"
        log(f"aggregated: {_client_line(agg['client'])}")
    except Exception as e:  # noqa: BLE001
        agg["status"] = f"failed: {one_line(f'{type(e).__name__}: {e}', 600)}"
        log(f"aggregated: {agg['status']}")
    finally:
        if agg["status"] == "running":
            agg["status"] = "interrupted"
        if child is not None:
            child.stop()
        sv["seconds_total"] = time.monotonic() - t0
        save()


def _client_line(c: dict) -> str:
    return (f"{c['completed']} ok / {c['failed']} failed, TTFT {c['mean_ttft_ms']:.1f} ms mean / "
            f"{c['p99_ttft_ms']:.1f} p99, ITL {c['mean_itl_ms']:.2f} / {c['p99_itl_ms']:.2f} ms, "
            f"{c['output_throughput']:.0f} out tok/s")


def print_serve(sv: dict) -> None:
    print(f"\nkv-transfer serve: {sv['model']}, {sv['input_len']} in / {sv['output_len']} out, "
          f"{sv['num_prompts']} requests at rate {sv['rate']:g} (+{sv['num_warmups']} warm-ups), "
          f"transfer {sv['transfer_backend']}")
    print(f"{'':>14} {'ok/fail':>8} {'TTFT mean':>10} {'TTFT p99':>9} {'ITL mean':>9} {'ITL p99':>8} {'out tok/s':>10}")
    for name in ("disaggregated", "aggregated"):
        part = sv.get(name) or {}
        c = part.get("client")
        if not c:
            print(f"{name:>14}  {part.get('status')}")
            continue
        print(f"{name:>14} {c['completed']:>4}/{c['failed']:<3} {c['mean_ttft_ms']:>10.1f} {c['p99_ttft_ms']:>9.1f} "
              f"{c['mean_itl_ms']:>9.2f} {c['p99_itl_ms']:>8.2f} {c['output_throughput']:>10.0f}")
    hops = (sv.get("disaggregated") or {}).get("orchestrator_hops") or {}
    if hops:
        print(f"orchestrator hops (ms): {'count':>6} {'mean':>8} {'p50':>8} {'p90':>8} {'p99':>8}")

        def ms(x):
            return "-" if x is None else f"{x * 1e3:.1f}"
        for name, h in hops.items():
            short = name.removeprefix("meshserve_disagg_").removesuffix("_seconds")
            print(f"{short:>22} {h.get('count', 0):>6.0f} {ms(h.get('mean_s')):>8} {ms(h.get('p50_s')):>8} "
                  f"{ms(h.get('p90_s')):>8} {ms(h.get('p99_s')):>8}")


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["bandwidth", "serve", "all"], default="all")
    p.add_argument("--out", default="out/kv_transfer", help="folder for summary.json, logs (work/) and client results")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and a tiny model: a CPU run in about a minute")
    p.add_argument("--device", default="auto", help="auto (cuda:0 when there is a GPU, else cpu), cpu, cuda:N")
    g = p.add_argument_group("bandwidth")
    g.add_argument("--backends", default=",".join(BACKENDS))
    g.add_argument("--tokens", type=int, default=None, help="request length (default 8192; smoke 512)")
    g.add_argument("--layers", type=int, default=None, help="default 32 (smoke 4)")
    g.add_argument("--kv-heads", type=int, default=None, help="default 8 (smoke 2)")
    g.add_argument("--head-dim", type=int, default=None, help="default 128 (smoke 64)")
    g.add_argument("--block-size", type=int, default=None, help="default: kv_cache_config.tokens_per_block's default")
    g.add_argument("--repeats", type=int, default=None, help="timed pulls after the warm-up (default 5; smoke 2)")
    g.add_argument("--max-tokens-in-buffer", default="none,2048",
                   help="chunk settings, comma-separated; none: the engine's default (a layer at once)")
    g.add_argument("--verify-payload", choices=["both", "on", "off", "default"], default="both",
                   help="cache_transceiver_config.verify_payload (the payload MAC of DEFAULT, UCX and MPI) rows: "
                        "both (default), on, off, or default (the sink's default only); ignored where the sink "
                        "has no such setting, and for NIXL")
    g.add_argument("--cuda-ipc", choices=["both", "auto", "off"], default="both",
                   help="DEFAULT rows: both (default): the rows above over TCP (cuda_ipc false) and one row per "
                        "chunk setting with cuda_ipc auto (GPU to GPU when both caches are CUDA tensors on this "
                        "host, else TCP; its path column says which); auto or off: only those")
    g.add_argument("--backend-timeout", type=float, default=None, help="seconds per backend (default 150; smoke 90)")
    g = p.add_argument_group("serve")
    g.add_argument("--model", default="llama-3.1-8b", help="shape name or model folder (random weights)")
    g.add_argument("--num-prompts", type=int, default=None, help="measured requests (default 100; smoke 4)")
    g.add_argument("--num-warmups", type=int, default=None,
                   help="warm-up requests before each run (default 8; smoke 2)")
    g.add_argument("--rate", type=float, default=2.0)
    g.add_argument("--input-len", type=int, default=None, help="default 467 (smoke 24)")
    g.add_argument("--output-len", type=int, default=None, help="default 256 (smoke 8)")
    g.add_argument("--memory-fraction", type=float, default=0.4,
                   help="kv_cache_config.free_gpu_memory_fraction of the context and generation servers")
    g.add_argument("--serve-backend", default="DEFAULT", help="cache_transceiver_config.backend of the servers")
    g.add_argument("--client-extra-body", default='{"min_tokens": 0}',
                   help="JSON merged into every client request ('' for none). The default takes out the "
                        "min_tokens = output-len that the client sends with ignore_eos (the output length is the "
                        "same): a context server refused it (500: min_tokens must be <= max_tokens (1))")
    g.add_argument("--server-args", default="", help="extra `meshserve serve` flags for every server, one string")
    g.add_argument("--startup-timeout", type=float, default=None, help="seconds per server (default 300; smoke 180)")
    p.add_argument("--_role", choices=["context", "generation", "floor"], help=argparse.SUPPRESS)
    p.add_argument("--_dir", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._role:
        return a
    full = dict(tokens=8192, layers=32, kv_heads=8, head_dim=128, repeats=5, backend_timeout=150.0,
                num_prompts=100, num_warmups=8, input_len=467, output_len=256, startup_timeout=300.0)
    smoke = dict(tokens=512, layers=4, kv_heads=2, head_dim=64, repeats=2, backend_timeout=90.0,
                 num_prompts=4, num_warmups=2, input_len=24, output_len=8, startup_timeout=180.0)
    for k, v in (smoke if a.smoke else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.block_size is None:
        a.block_size = default_block_size()
    a.backends = [b.strip().upper() for b in a.backends.split(",") if b.strip()]
    unknown = [b for b in a.backends if b not in BACKENDS]
    if unknown:
        p.error(f"--backends: {unknown} not in {list(BACKENDS)}")
    a.chunks = [None if c.strip().lower() in ("none", "0", "") else int(c) for c in a.max_tokens_in_buffer.split(",")]
    import shlex
    a.server_args = shlex.split(a.server_args)
    return a


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=str(ROOT),
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None) -> int:
    a = parse_args(argv)
    if a._role:
        {"context": role_context, "generation": role_generation, "floor": role_floor}[a._role](a._dir)
        return 0
    device = a.device
    if device == "auto":
        import torch
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    os.makedirs(a.out, exist_ok=True)
    out_json = os.path.join(a.out, "summary.json")
    report = {"scenario": "kv-transfer", "commit": git_commit(), "smoke": a.smoke, "device": device,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]}

    def save():
        write_json(out_json, report)

    save()

    def stop(signum, frame):  # `timeout` sends SIGTERM: unwind, so the finally blocks stop every child
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    work = os.path.abspath(os.path.join(a.out, "work"))
    os.makedirs(work, exist_ok=True)
    try:
        if a.part in ("bandwidth", "all"):
            bandwidth_part(a, device, os.path.join(work, "bandwidth"), report, save)
            print_bandwidth(report["bandwidth"])
        if a.part in ("serve", "all"):
            os.makedirs(os.path.join(work, "serve"), exist_ok=True)
            serve_part(a, device, os.path.join(work, "serve"), report, save)
            print_serve(report["serve"])
    finally:
        report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        save()
        log(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
