"""DEFAULT's same-host GPU path (cache_transceiver_config.cuda_ipc) for real: a context process (spawned)
holds random bf16 KV in CUDA caches on cuda:0 behind `TcpKvSource`s; this process pulls it with a
`TcpKvSink` over its own CUDA caches on cuda:0. The IPC path must be the one taken (PullResult.path,
sink.paths) and the sink's blocks must equal the truth byte for byte: same blocks, re-blocking 16 -> 32,
a TP-2 context (two sources, two heads each) into a TP-1 sink, and a TP-1 context into a TP-2 sink's
half; then an 8,192-token Llama-8B-shaped KV (1.07 GB) over IPC and over TCP, equal, with the times
printed. ~20-40 s on an H200.

Then NIXL and UCX over the same CUDA caches: the blocks equal the truth, and the bytes took GPU memory
end to end: NIXL reads the source's VRAM regions (path "nixl_gpu"), UCX sends from and receives into
GPU staging buffers ("ucx_gpu"; DEFAULT's IPC path off in its sink); with the payload MAC on, UCX
stages through pinned host memory ("ucx"). Skipped where the wheels are missing (docs/gpu.md: the
.kv archive carries them)."""
import multiprocessing as mp
import statistics
import time

import msgspec
import pytest
import torch

from meshserve.disagg import tcp
from meshserve.disagg.transceiver import KvRequest, RankLayout, TransferState, create_transceiver

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(120)]

KEY = b"kv-cuda-ipc-test"
LAYERS, HEADS, DIM, N, BLOCKS = (0, 1, 2, 3), 4, 64, 300, 48
BIG = dict(layers=32, heads=8, dim=128, tokens=8192, block=16)


def _layout(heads, bs, layers=LAYERS, num_heads=HEADS, dim=DIM):
    return RankLayout("", "ipc-model", "bfloat16", bs, tuple(layers), num_heads, tuple(heads), dim)


def _truth():
    g = torch.Generator().manual_seed(1234)
    return {layer: torch.randn((2, N, HEADS, DIM), generator=g).to(torch.bfloat16) for layer in LAYERS}


def _ids(bs, seed, n=N, blocks=BLOCKS):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randperm(blocks - 1, generator=g)[:-(-n // bs)] + 1).tolist()]


def _slots(block_ids, bs, n=N):
    t = torch.arange(n)
    return torch.tensor(block_ids)[t // bs], t % bs


def _context(conn, backend="DEFAULT"):
    """The context process: sources over CUDA caches; their layouts to the parent; serve until told.
    DEFAULT: also the big Llama-8B-shaped KV."""
    torch.cuda.set_device(0)
    Source = tcp.TcpKvSource if backend == "DEFAULT" else create_transceiver(backend)[0]
    truth = _truth()
    src_ids = _ids(16, 1)
    b, o = _slots(src_ids[0], 16)
    sources, info = [], {"src_ids": src_ids}
    for name, heads_list in (("tp1", [(0, 4)]), ("tp2", [(0, 2), (2, 4)])):
        for heads in heads_list:
            caches = []
            for layer in LAYERS:
                c = torch.randn((2, BLOCKS, 16, heads[1] - heads[0], DIM), device="cuda").to(torch.bfloat16)
                c[:, b.cuda(), o.cuda()] = truth[layer][:, :, heads[0]:heads[1]].cuda()
                caches.append(c)
            s = Source(caches, _layout(heads, 16), key=KEY, require_registered=True)
            s.register(KvRequest("ctx-1", src_ids, N))
            sources.append(s)
            info.setdefault(name, []).append(msgspec.to_builtins(s.layout))
    if backend != "DEFAULT":
        torch.cuda.synchronize()
        conn.send(msgspec.msgpack.encode(info))
        conn.recv()
        for s in sources:
            s.close()
        return
    # the big one: Llama-3.1-8B's KV shape, 8192 tokens, blocks of 16
    n, bs = BIG["tokens"], BIG["block"]
    big_blocks = n // bs + 1
    big_ids = _ids(bs, 7, n, big_blocks)
    caches = [torch.randn((2, big_blocks, bs, BIG["heads"], BIG["dim"]), device="cuda").to(torch.bfloat16)
              for _ in range(BIG["layers"])]
    lay = _layout((0, BIG["heads"]), bs, range(BIG["layers"]), BIG["heads"], BIG["dim"])
    s = tcp.TcpKvSource(caches, lay, key=KEY, require_registered=True)
    s.register(KvRequest("ctx-big", big_ids, n))
    sources.append(s)
    info["big"] = [msgspec.to_builtins(s.layout)]
    info["big_ids"] = big_ids
    torch.cuda.synchronize()
    conn.send(msgspec.msgpack.encode(info))
    conn.recv()  # the parent is done (it dropped its mappings first)
    for s in sources:
        s.close()


def _start_context(backend="DEFAULT"):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_context, args=(child, backend), daemon=True)
    proc.start()
    try:
        assert parent.poll(90), "the context process did not come up"
        info = msgspec.msgpack.decode(parent.recv())
        yield {k: ([msgspec.convert(x, RankLayout) for x in v] if k in ("tp1", "tp2", "big") else v)
               for k, v in info.items()}
    finally:
        torch.cuda.synchronize()
        try:
            parent.send("done")
        except OSError:
            pass
        proc.join(30)
        if proc.is_alive():
            proc.kill()


@pytest.fixture(scope="module")
def context():
    yield from _start_context()


@pytest.fixture(scope="module", params=["UCX", "NIXL"])
def backend_context(request):
    try:
        create_transceiver(request.param)
    except ValueError as e:
        pytest.skip(str(e))
    for info in _start_context(request.param):
        yield request.param, info


def _pull(sources, src_ids, heads, bs, cuda_ipc, rid="ctx-1", n=N, layers=LAYERS, num_heads=HEADS, dim=DIM,
          blocks=BLOCKS, seed=3):
    caches = [torch.zeros((2, blocks, bs, heads[1] - heads[0], dim), dtype=torch.bfloat16, device="cuda")
              for _ in layers]
    sink = tcp.TcpKvSink(caches, _layout(heads, bs, layers, num_heads, dim), key=KEY, cuda_ipc=cuda_ipc)
    dst = _ids(bs, seed, n, blocks)
    r = sink.pull(sources, KvRequest(rid, src_ids, n), dst, 60.0)
    return sink, caches, dst, r


@pytest.mark.parametrize("case", ["tp1-16-to-16", "tp1-16-to-32", "tp2-to-tp1", "tp1-to-tp2-half"])
def test_ipc_pull_equals_the_truth(context, case):
    src, heads, bs = {"tp1-16-to-16": ("tp1", (0, 4), 16), "tp1-16-to-32": ("tp1", (0, 4), 32),
                      "tp2-to-tp1": ("tp2", (0, 4), 16), "tp1-to-tp2-half": ("tp1", (2, 4), 8)}[case]
    sink, caches, dst, r = _pull(context[src], context["src_ids"], heads, bs, "auto")
    try:
        assert r.state is TransferState.SUCCESS, r.error
        assert r.path == "cuda_ipc" and sink.paths == {"cuda_ipc": len(context[src])}, (r, sink.paths)
        truth = _truth()
        b, o = _slots(dst[0], bs)
        for layer, c in zip(LAYERS, caches):
            got = c[:, b.cuda(), o.cuda()].cpu()
            assert torch.equal(got.view(torch.int16), truth[layer][:, :, heads[0]:heads[1]].view(torch.int16)), layer
            # nothing outside the request's slots was written
            mask = torch.ones(c.shape[1] * c.shape[2], dtype=torch.bool)
            mask[(b * bs + o)] = False
            assert not c.view(2, -1, c.shape[3], c.shape[4])[:, mask.cuda()].any()
    finally:
        sink.close()


def test_ipc_is_refused_for_an_unregistered_request(context):
    sink, caches, _, r = _pull(context["tp1"], context["src_ids"], (0, 4), 16, True, rid="ctx-unknown")
    sink.close()
    assert r.state is TransferState.FAILED and "not held" in r.error
    assert not any(c.any() for c in caches)


def test_big_kv_over_ipc_and_tcp_equal(context):
    n, bs, blocks = BIG["tokens"], BIG["block"], BIG["tokens"] // BIG["block"] + 1
    results = {}
    for mode in (True, False):
        caches = [torch.zeros((2, blocks, bs, BIG["heads"], BIG["dim"]), dtype=torch.bfloat16, device="cuda")
                  for _ in range(BIG["layers"])]
        lay = _layout((0, BIG["heads"]), bs, range(BIG["layers"]), BIG["heads"], BIG["dim"])
        sink = tcp.TcpKvSink(caches, lay, key=KEY, cuda_ipc=mode)
        dst = _ids(bs, 5, n, blocks)
        times = []
        try:
            for _ in range(3 if mode else 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                r = sink.pull(context["big"], KvRequest("ctx-big", context["big_ids"], n), dst, 60.0)
                times.append(time.perf_counter() - t0)
                assert r.state is TransferState.SUCCESS, r.error
                assert r.path == ("cuda_ipc" if mode else "tcp")
        finally:
            sink.close()
        b, o = _slots(dst[0], bs, n)
        results[mode] = [c[:, b.cuda(), o.cuda()] for c in caches]
        gb = r.bytes / 1e9
        print(f"\n{'cuda_ipc' if mode else 'tcp'}: {gb:.3f} GB, first {times[0] * 1e3:.1f} ms, median "
              f"{statistics.median(times) * 1e3:.1f} ms = {gb / statistics.median(times):.1f} GB/s")
        del caches
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(results[True], results[False]))
    assert any(a.any() for a in results[True])


@pytest.mark.parametrize("case", ["tp1-16-to-16", "tp1-16-to-32", "tp2-to-tp1", "mac-on"])
def test_nixl_and_ucx_pull_over_gpu_memory(backend_context, case):
    backend, info = backend_context
    if case == "mac-on" and backend == "NIXL":
        pytest.skip("NIXL reads are one-sided: no payload MAC")
    src, bs = {"tp1-16-to-16": ("tp1", 16), "tp1-16-to-32": ("tp1", 32), "tp2-to-tp1": ("tp2", 16),
               "mac-on": ("tp1", 16)}[case]
    _, Sink = create_transceiver(backend)
    caches = [torch.zeros((2, BLOCKS, bs, HEADS, DIM), dtype=torch.bfloat16, device="cuda") for _ in LAYERS]
    kw = {"verify_payload": case == "mac-on"}
    if backend == "UCX":
        kw["cuda_ipc"] = False  # else DEFAULT's same-host IPC path would move the bytes, not UCX
    sink = Sink(caches, _layout((0, 4), bs), key=KEY, **kw)
    dst = _ids(bs, 3)
    try:
        r = sink.pull(info[src], KvRequest("ctx-1", info["src_ids"], N), dst, 60.0)
        assert r.state is TransferState.SUCCESS, r.error
        want = {"UCX": "ucx_gpu", "NIXL": "nixl_gpu"}[backend] if case != "mac-on" else "ucx"
        assert r.path == want and sink.paths == {want: len(info[src])}, (r, sink.paths)
        truth = _truth()
        b, o = _slots(dst[0], bs)
        for layer, c in zip(LAYERS, caches):
            assert torch.equal(c[:, b.cuda(), o.cuda()].cpu().view(torch.int16), truth[layer].view(torch.int16)), layer
    finally:
        sink.close()
