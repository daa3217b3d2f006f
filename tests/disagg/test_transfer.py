"""The KV transfer suite every backend runs. Here DEFAULT; test_kv_backends.py runs this file again in a
process of its own for NIXL, UCX (MESHSERVE_TEST_KV_BACKENDS=NIXL...) and MPI (under mpirun), so that
UCX, NIXL and MPI never start inside the main test process.

Context-side caches are filled from a random "truth" per layer (tokens x model KV heads) by plain
torch indexing into each source rank's blocks; after a pull, every generation rank's blocks must
hold exactly its share of that truth (byte for byte), and nothing else of its cache may change.
"""
import math
import os
import socket
import threading
import time

import msgspec
import pytest
import torch

from meshserve.disagg import mpi as mpi_backend
from meshserve.disagg import tcp, tcp_sink
from meshserve.disagg._side import SideKvSource
from meshserve.disagg.transceiver import KvRequest, RankLayout, TransferState, create_transceiver

# a backend that cannot run here is skipped with the reason (scripts/setup.sh installs the wheels)
BACKENDS = os.environ.get("MESHSERVE_TEST_KV_BACKENDS", "DEFAULT").split(",")
KEY = b"test-key-0123456789abcdef"
HEAD_DIM = 8
LATENT_DIM = 12


@pytest.fixture(params=BACKENDS)
def backend(request):
    try:
        return create_transceiver(request.param)
    except ValueError as e:
        pytest.skip(str(e))


def _layout(layers, kv_heads=(0, 4), num_kv_heads=4, block_size=16, dtype="float32", model_id="tiny-abc",
            kind="full", groups=()):
    return RankLayout("", model_id, dtype, block_size, tuple(layers), num_kv_heads, tuple(kv_heads), HEAD_DIM,
                      kind=kind, latent_dim=LATENT_DIM if kind == "latent" else 0, groups=tuple(groups))


def _caches(layout, num_blocks, gen, zero=False):
    dtype = getattr(torch, layout.dtype)
    if layout.kind == "latent":
        shape = (num_blocks, layout.block_size, LATENT_DIM)
    else:
        shape = (2, num_blocks, layout.block_size, layout.kv_heads[1] - layout.kv_heads[0], HEAD_DIM)
    out = []
    for _ in layout.layers:
        out.append(torch.zeros(shape, dtype=dtype) if zero else torch.randn(shape, generator=gen).to(dtype))
    return out


def _slots(block_ids, block_size, n):
    t = torch.arange(n)
    return torch.tensor(block_ids)[t // block_size], t % block_size


def _truth(layers, n, num_kv_heads, kind, gen):
    shape = (n, LATENT_DIM) if kind == "latent" else (2, n, num_kv_heads, HEAD_DIM)
    return {layer: torch.randn(shape, generator=gen) for layer in layers}


def _write(cache, layout, truth, block_ids, n):
    b, o = _slots(block_ids, layout.block_size, n)
    if layout.kind == "latent":
        cache[b, o] = truth.to(cache.dtype)
    else:
        h0, h1 = layout.kv_heads
        cache[:, b, o] = truth[:, :, h0:h1].to(cache.dtype)


def _read(cache, layout, block_ids, n):
    b, o = _slots(block_ids, layout.block_size, n)
    return cache[b, o] if layout.kind == "latent" else cache[:, b, o]


def _expected(layout, truth):
    return truth if layout.kind == "latent" else truth[:, :, layout.kv_heads[0]:layout.kv_heads[1]]


def _block_ids(num_tokens, block_size, num_blocks, gen, groups=1):
    need = max(1, math.ceil(num_tokens / block_size))
    return [(torch.randperm(num_blocks - 1, generator=gen)[:need] + 1).tolist() for _ in range(groups)]


class Cluster:
    """Source ranks and sink ranks of one test, in this process on 127.0.0.1."""

    def __init__(self, backend, src_layouts, dst_layouts, n, *, num_blocks=64, max_tokens=None, key=KEY,
                 sink_key=None, seed=0, num_groups=1, sink_kwargs=None, **source_kwargs):
        Source, Sink = backend
        gen = torch.Generator().manual_seed(seed)
        self.n = n
        lay0 = src_layouts[0]
        layers = sorted({layer for s in src_layouts for layer in s.layers})
        self.truth = _truth(layers, n, lay0.num_kv_heads, lay0.kind, gen)
        # one request: the same block ids on every context rank (one scheduler), per KV group
        self.src_ids = _block_ids(n, lay0.block_size, num_blocks, gen, num_groups)
        self.req = KvRequest("ctx-1", self.src_ids, n)
        self.sources = []
        for lay in src_layouts:
            caches = _caches(lay, num_blocks, gen)
            for layer, cache in zip(lay.layers, caches):
                _write(cache, lay, self.truth[layer], self.src_ids[lay.group_of(layer)], n)
            self.sources.append(Source(caches, lay, host="127.0.0.1", key=key, **source_kwargs))
        self.src_layouts = [s.layout for s in self.sources]
        self.sinks, self.dst_ids, self.before = [], [], []
        for lay in dst_layouts:
            caches = _caches(lay, num_blocks, gen)
            self.before.append([c.clone() for c in caches])
            self.dst_ids.append(_block_ids(n, lay.block_size, num_blocks, gen, num_groups))
            self.sinks.append(Sink(caches, lay, max_tokens_in_buffer=max_tokens,
                                   key=key if sink_key is None else sink_key, **(sink_kwargs or {})))

    def pull(self, i=0, timeout_s=10.0, sources=None):
        return self.sinks[i].pull(self.src_layouts if sources is None else sources, self.req, self.dst_ids[i],
                                  timeout_s)

    def check(self, i):
        sink = self.sinks[i]
        lay = sink.layout
        for layer, cache, before in zip(lay.layers, sink.kv_caches, self.before[i]):
            ids = self.dst_ids[i][lay.group_of(layer)]
            got = _read(cache, lay, ids, self.n)
            assert torch.equal(got, _expected(lay, self.truth[layer]).to(cache.dtype)), f"sink {i} layer {layer}"
            # nothing else changed: put the request's slots back and compare the whole cache
            restored = cache.clone()
            b, o = _slots(ids, lay.block_size, self.n)
            if lay.kind == "latent":
                restored[b, o] = before[b, o]
            else:
                restored[:, b, o] = before[:, b, o]
            assert torch.equal(restored, before), f"sink {i} layer {layer}: slots outside the request changed"

    def untouched(self, i):
        return all(torch.equal(c, b) for c, b in zip(self.sinks[i].kv_caches, self.before[i]))

    def close(self):
        for s in self.sources + self.sinks:
            s.close()


def _nixl(backend) -> bool:
    return backend[1].__name__ == "NixlKvSink"


@pytest.fixture
def cluster(backend):
    made = []

    def make(*args, **kwargs):
        c = Cluster(backend, *args, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def _pull_all(c, **kw):
    for i in range(len(c.sinks)):
        r = c.pull(i, **kw)
        assert r.state is TransferState.SUCCESS, r.error
        assert r.error is None and r.bytes > 0 and r.seconds >= 0
        c.check(i)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 100])
def test_sizes(cluster, n):
    c = cluster([_layout((0, 1))], [_layout((0, 1))], n)
    r = c.pull()
    assert r.state is TransferState.SUCCESS, r.error
    assert r.bytes == 2 * (2 * n * 4 * HEAD_DIM * 4)  # layers x K,V x tokens x heads x dim x fp32
    c.check(0)


def test_bfloat16(cluster):
    c = cluster([_layout((0, 1), dtype="bfloat16")], [_layout((0, 1), dtype="bfloat16", block_size=8)], 29)
    _pull_all(c)


def test_float8_caches(cluster):
    """FP8 KV caches (kv_cache_config.dtype fp8) move as their bytes, reblocked."""
    c = cluster([_layout((0, 1), dtype="float8_e4m3fn")], [_layout((0, 1), dtype="float8_e4m3fn", block_size=8)], 29)
    _pull_all(c)


def test_concurrent_pulls_from_one_source(cluster):
    c = cluster([_layout((0, 1, 2, 3))], [_layout((0, 1, 2, 3), (0, 2)), _layout((0, 1, 2, 3), (2, 4))] * 2, 64,
                max_tokens=16)
    results = [None] * len(c.sinks)

    def pull(i):
        results[i] = c.pull(i)

    threads = [threading.Thread(target=pull, args=(i,)) for i in range(len(c.sinks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, r in enumerate(results):
        assert r.state is TransferState.SUCCESS, r.error
        c.check(i)


def test_layouts_built_with_lists(cluster, backend):
    lay = RankLayout("", "tiny-abc", "float32", 16, [0, 1], 4, [0, 4], HEAD_DIM)  # lists, not tuples
    c = cluster([lay], [lay], 9)
    _pull_all(c)


@pytest.mark.parametrize("src_bs,dst_bs", [(16, 32), (32, 16), (4, 12)])
def test_reblocking(cluster, src_bs, dst_bs):
    c = cluster([_layout((0, 1), block_size=src_bs)], [_layout((0, 1), block_size=dst_bs)], 77)
    _pull_all(c)


def test_tp2_sources_to_tp1_sink(cluster):
    c = cluster([_layout((0, 1), (0, 2)), _layout((0, 1), (2, 4))], [_layout((0, 1), (0, 4))], 33)
    _pull_all(c)


def test_tp1_source_to_tp2_sinks(cluster):
    c = cluster([_layout((0, 1), (0, 4))], [_layout((0, 1), (0, 2)), _layout((0, 1), (2, 4))], 33)
    _pull_all(c)


def test_tp4_sources_to_tp2_sinks_with_reblocking(cluster):
    srcs = [_layout((0, 1, 2), (h, h + 1), block_size=8) for h in range(4)]
    c = cluster(srcs, [_layout((0, 1, 2), (0, 2), block_size=16), _layout((0, 1, 2), (2, 4), block_size=16)], 50)
    _pull_all(c)


def test_replicated_kv_heads(cluster):
    # kv_heads=1 at TP 2: both context ranks hold head 0; each generation rank (TP 2) needs all of it
    srcs = [_layout((0, 1), (0, 1), num_kv_heads=1), _layout((0, 1), (0, 1), num_kv_heads=1)]
    c = cluster(srcs, [_layout((0, 1), (0, 1), num_kv_heads=1)] * 2, 21)
    _pull_all(c)


def test_pp_sources(cluster):
    srcs = [_layout((0, 1)), _layout((2, 3))]  # two pipeline stages
    c = cluster(srcs, [_layout((0, 1, 2, 3))], 40)
    _pull_all(c)


def test_pp_and_tp_on_both_sides(cluster):
    srcs = [_layout(layers, heads) for layers in ((0, 1), (2, 3)) for heads in ((0, 2), (2, 4))]
    dsts = [_layout(layers, (0, 4), block_size=32) for layers in ((0,), (1, 2, 3))]
    c = cluster(srcs, dsts, 45)
    _pull_all(c)


def test_latent(cluster):
    # latent caches are the same on every TP rank: any one holding the layer serves it
    srcs = [_layout((0, 1, 2), kind="latent"), _layout((0, 1, 2), kind="latent")]
    c = cluster(srcs, [_layout((0, 1, 2), kind="latent", block_size=32)], 70)
    _pull_all(c)


def test_kv_cache_groups(cluster):
    # layers of two groups (say full and sliding window) with their own block tables
    lay = _layout((0, 1, 2, 3), groups=(0, 0, 1, 1))
    c = cluster([lay], [_layout((0, 1, 2, 3), groups=(0, 0, 1, 1), block_size=8)], 30, num_groups=2)
    _pull_all(c)


def test_chunking(cluster, backend):
    c = cluster([_layout((0, 1))], [_layout((0, 1), block_size=4)], 17, max_tokens=5)
    reads = []
    source, sink = c.sources[0], c.sinks[0]
    if hasattr(sink, "direct_reads"):  # NIXL: the sink reads by descriptor, one transfer per layer and chunk
        _pull_all(c)
        assert sink.direct_reads + sink.staged_reads == 8
        return
    orig = source._gather_read  # DEFAULT, UCX, MPI: the source gathers each chunk it is asked for
    source._gather_read = lambda conn, msg, staging: (reads.append(msg.tokens), orig(conn, msg, staging))[1]
    _pull_all(c)
    assert sorted(set(reads)) == [(0, 5), (5, 10), (10, 15), (15, 17)] and len(reads) == 8


def test_the_pull_names_the_path_its_bytes_took(cluster, backend):
    """CPU caches: DEFAULT over TCP, NIXL's reads, UCX tags and MPI messages through host memory."""
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 20)
    r = c.pull()
    assert r.state is TransferState.SUCCESS, r.error
    want = {"TcpKvSink": "tcp", "NixlKvSink": "nixl", "UcxKvSink": "ucx", "MpiKvSink": "mpi"}[backend[1].__name__]
    assert r.path == want and c.sinks[0].paths == {want: 1}


def _tcp_reads(c, backend):
    sink = type(c.sinks[0])
    if sink._pull_items is not tcp.TcpKvSink._pull_items or sink._pull_from is not tcp.TcpKvSink._pull_from:
        pytest.skip(f"{backend[1].__name__} does not pull over DEFAULT's Read / Data exchange")


def test_reads_run_one_ahead_of_the_answers(cluster, backend, monkeypatch):
    """DEFAULT: the sink asks for chunk k + 1 before it receives chunk k (the source gathers the next
    chunk while this side takes one), never more than one ahead, and the answers come in order."""
    c = cluster([_layout((0, 1))], [_layout((0, 1), block_size=4)], 17, max_tokens=5)
    _tcp_reads(c, backend)
    events = []
    orig_send, orig_reply = tcp._Conn.send, tcp.TcpKvSink._reply

    def send(conn, msg):
        if isinstance(msg, tcp.Read):
            events.append(("read", msg.layer, tuple(msg.tokens)))
        return orig_send(conn, msg)

    def reply(conn, ep):
        got = orig_reply(conn, ep)
        events.append(("data", tuple(got.shape)))
        return got

    monkeypatch.setattr(tcp._Conn, "send", send)
    monkeypatch.setattr(tcp.TcpKvSink, "_reply", staticmethod(reply))
    _pull_all(c)
    chunks = [(layer, (t0, min(17, t0 + 5))) for layer in (0, 1) for t0 in range(0, 17, 5)]
    assert [e[1:] for e in events if e[0] == "read"] == [(layer, t) for layer, t in chunks]
    # reads sent before each answer: 2, 3, ..., 8, 8 (one ahead, the last answer with nothing left to ask)
    ahead, reads = [], 0
    for e in events:
        if e[0] == "read":
            reads += 1
        else:
            ahead.append(reads)
    assert ahead == [min(i + 2, 8) for i in range(8)], events


def test_a_read_refused_mid_pull_fails_it_and_writes_nothing_after(cluster, backend):
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 17, max_tokens=5)
    _tcp_reads(c, backend)
    source = c.sources[0]
    orig, seen = source._gather_read, []

    def gather(conn, msg, staging):
        seen.append(msg.tokens)
        if len(seen) == 3:  # layer 0, tokens [10, 15)
            conn.send(tcp.Error("chunk refused by the test"))
            return None
        return orig(conn, msg, staging)

    source._gather_read = gather
    r = c.pull()
    assert r.state is TransferState.FAILED and "chunk refused by the test" in r.error and "\n" not in r.error
    sink, lay = c.sinks[0], c.sinks[0].layout
    cache, before = sink.kv_caches[0], c.before[0][0]
    b, o = _slots(c.dst_ids[0][0], lay.block_size, 17)
    assert torch.equal(cache[:, b[:10], o[:10]], c.truth[0][:, :10].to(cache.dtype))  # the two chunks before
    assert torch.equal(cache[:, b[10:], o[10:]], before[:, b[10:], o[10:]])  # the refused one and after: not
    assert torch.equal(sink.kv_caches[1], c.before[0][1])
    r = c.pull()  # the source still serves (the refusal ended one connection, not the source)
    assert r.state is TransferState.SUCCESS, r.error


def test_nixl_reads_directly_or_through_staging(cluster, backend):
    if not _nixl(backend):
        pytest.skip("NIXL only")
    # same heads on both sides: straight into the sink's blocks, whatever the block sizes
    c = cluster([_layout((0, 1))], [_layout((0, 1), block_size=32)], 40)
    _pull_all(c)
    assert (c.sinks[0].direct_reads, c.sinks[0].staged_reads) == (2, 0)
    # the sink's heads come from two context ranks: each read lands in a staging buffer
    c = cluster([_layout((0, 1), (0, 2)), _layout((0, 1), (2, 4))], [_layout((0, 1))], 40)
    _pull_all(c)
    assert (c.sinks[0].direct_reads, c.sinks[0].staged_reads) == (0, 4)
    # the sink needs half of a context rank's heads: its whole rows are staged
    c = cluster([_layout((0, 1))], [_layout((0, 1), (0, 2))], 40)
    _pull_all(c)
    assert (c.sinks[0].direct_reads, c.sinks[0].staged_reads) == (0, 2)


def test_dtype_mismatch_fails(cluster):
    c = cluster([_layout((0, 1))], [_layout((0, 1), dtype="bfloat16")], 10)
    r = c.pull()
    assert r.state is TransferState.FAILED
    assert "dtype" in r.error and "'float32'" in r.error and "'bfloat16'" in r.error and "\n" not in r.error
    assert c.untouched(0)


def test_model_id_mismatch_fails(cluster):
    c = cluster([_layout((0, 1), model_id="llama-aaa")], [_layout((0, 1), model_id="llama-bbb")], 10)
    r = c.pull()
    assert r.state is TransferState.FAILED
    assert "model_id" in r.error and "llama-aaa" in r.error and "llama-bbb" in r.error
    assert c.untouched(0)


def test_missing_layer_or_heads_fails(cluster):
    c = cluster([_layout((0, 1))], [_layout((0, 1, 2))], 10)
    r = c.pull()
    assert r.state is TransferState.FAILED and "layer 2" in r.error
    c2 = cluster([_layout((0, 1), (0, 2))], [_layout((0, 1), (0, 4))], 10)
    r = c2.pull()
    assert r.state is TransferState.FAILED and "KV head 2" in r.error


def test_silent_source_times_out(cluster):
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 10)
    silent = socket.create_server(("127.0.0.1", 0))
    held = []
    stop = threading.Event()

    def accept():
        silent.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])  # accepts, never answers
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        lay = c.src_layouts[0]
        fake = RankLayout(f"127.0.0.1:{silent.getsockname()[1]}", lay.model_id, lay.dtype, lay.block_size,
                          lay.layers, lay.num_kv_heads, lay.kv_heads, lay.head_dim)
        start = time.monotonic()
        r = c.pull(timeout_s=0.5, sources=[fake])
        took = time.monotonic() - start
        assert r.state is TransferState.FAILED and "timed out" in r.error and fake.endpoint in r.error
        assert 0.4 < took < 2.0
        assert c.untouched(0)
    finally:
        stop.set()
        t.join()
        silent.close()
        for s in held:
            s.close()


def test_unreachable_source_fails(cluster):
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 10)
    lay = c.src_layouts[0]
    c.sources[0].close()
    r = c.pull(timeout_s=2.0)
    assert r.state is TransferState.FAILED and lay.endpoint in r.error and "\n" not in r.error


def test_wrong_key_refused(cluster):
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 10, sink_key=b"another key")
    r = c.pull()
    assert r.state is TransferState.FAILED and "MESHSERVE_SECRET" in r.error
    assert c.untouched(0)


def test_unsigned_sink_refused_by_keyed_source(cluster):
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 10)
    c.sinks[0].key = None  # sends no HMAC
    r = c.pull()
    assert r.state is TransferState.FAILED and "authentication" in r.error
    assert c.untouched(0)


def _tamper(monkeypatch, source, which=None):
    """Flip a byte in the middle of the payloads the source sends (the `which`-th one only, counting
    from 1, when given), after its MAC was taken: what an attacker on the wire would do. Returns
    the list of tampered sends."""
    done, count = [], [0]

    def bad(view):
        count[0] += 1
        if which is not None and count[0] != which:
            return view
        copy = bytearray(view)
        copy[len(copy) // 2] ^= 0x40
        done.append(count[0])
        return memoryview(copy)

    if isinstance(source, SideKvSource):  # UCX, MPI: the MAC went in the Data header, the bytes go now
        orig_send = type(source)._send
        monkeypatch.setattr(type(source), "_send",
                            lambda self, peer, tag, view, alive: orig_send(self, peer, tag, bad(view), alive))
    else:  # DEFAULT: the MAC is taken of the bytes as they are sent
        orig_bytes = tcp._Conn.send_bytes

        def send_bytes(self, data, hasher=None):
            if self.side != b"S" or len(data) == tcp._MAC_LEN:  # not a payload (a sink's, or the trailer)
                return orig_bytes(self, data, hasher)
            if hasher is not None:
                hasher.update(data)
            return orig_bytes(self, bad(data))

        monkeypatch.setattr(tcp._Conn, "send_bytes", send_bytes)
    return done


def test_tampered_payload_is_refused_before_it_is_written(cluster, backend, monkeypatch):
    if _nixl(backend):
        pytest.skip("NIXL reads are one-sided: no payload MAC (docs/kv_backends.md)")
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 40, sink_kwargs={"verify_payload": True})
    assert _tamper(monkeypatch, c.sources[0]) is not None
    r = c.pull()
    assert r.state is TransferState.FAILED and "\n" not in r.error
    assert "payload integrity check" in r.error and "tokens [0, 40)" in r.error and "none of it was written" in r.error
    assert c.untouched(0)


def test_a_tampered_chunk_is_not_written_the_ones_before_it_are(cluster, backend, monkeypatch):
    if _nixl(backend):
        pytest.skip("NIXL reads are one-sided: no payload MAC")
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 17, max_tokens=5, sink_kwargs={"verify_payload": True})
    assert _tamper(monkeypatch, c.sources[0], which=2) is not None  # layer 0, tokens [5, 10)
    r = c.pull()
    assert r.state is TransferState.FAILED and "layer 0 tokens [5, 10)" in r.error, r.error
    sink, lay = c.sinks[0], c.sinks[0].layout
    cache, before = sink.kv_caches[0], c.before[0][0]
    ids = c.dst_ids[0][0]
    b, o = _slots(ids, lay.block_size, 10)
    assert torch.equal(cache[:, b[:5], o[:5]], c.truth[0][:, :5].to(cache.dtype))  # the first chunk landed
    assert torch.equal(cache[:, b[5:], o[5:]], before[:, b[5:], o[5:]])  # the tampered one did not
    assert torch.equal(sink.kv_caches[1], c.before[0][1])  # nor anything after it


def test_verify_payload_false_takes_the_bytes_unchecked(cluster, backend, monkeypatch):
    if _nixl(backend):
        pytest.skip("NIXL: verify_payload has no effect")
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 40, sink_kwargs={"verify_payload": False})
    tampered = _tamper(monkeypatch, c.sources[0])
    r = c.pull()
    assert r.state is TransferState.SUCCESS, r.error
    assert tampered  # the flipped bytes went in: nothing checked them
    got = _read(c.sinks[0].kv_caches[0], c.sinks[0].layout, c.dst_ids[0][0], 40)
    assert not torch.equal(got, c.truth[0].to(got.dtype))


def _tampered_pull(cluster, monkeypatch, **sink_kwargs):
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 40, sink_kwargs=sink_kwargs)
    tampered = _tamper(monkeypatch, c.sources[0])
    return c, c.pull(), tampered


def test_verify_payload_auto_is_off_for_this_host_over_loopback(cluster, backend, monkeypatch):
    if _nixl(backend):
        pytest.skip("NIXL: verify_payload has no effect")
    c, r, tampered = _tampered_pull(cluster, monkeypatch)  # the default: auto; 127.0.0.1, this host
    assert c.sinks[0].verify_payload == "auto"
    assert r.state is TransferState.SUCCESS and tampered  # no MAC asked for: the flipped bytes went in


def test_verify_payload_auto_is_on_for_a_peer_that_is_not_loopback(cluster, backend, monkeypatch):
    if _nixl(backend):
        pytest.skip("NIXL: verify_payload has no effect")
    monkeypatch.setattr(tcp_sink, "_peer_address", lambda sock: "10.1.2.3")  # the sink sees the source over the network
    c, r, _ = _tampered_pull(cluster, monkeypatch, verify_payload="auto")
    assert r.state is TransferState.FAILED and "payload integrity check" in r.error, r
    assert c.untouched(0)


def test_verify_payload_auto_is_on_for_loopback_to_another_host(cluster, backend, monkeypatch):
    # loopback, but the source says it is another host (an SSH tunnel, a port forward): MACed
    if _nixl(backend):
        pytest.skip("NIXL: verify_payload has no effect")
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 40)
    c.sinks[0].host_id = "another-host/boot"
    _tamper(monkeypatch, c.sources[0])
    r = c.pull()
    assert r.state is TransferState.FAILED and "payload integrity check" in r.error, r
    # true forces it on this host's loopback; a source sending no host identity (older) counts as another
    # (the tampering above applies to every source of the backend's class)
    c2 = cluster([_layout((0, 1))], [_layout((0, 1))], 40, sink_kwargs={"verify_payload": True})
    r2 = c2.pull()
    assert r2.state is TransferState.FAILED and "payload integrity check" in r2.error
    c3 = cluster([_layout((0, 1))], [_layout((0, 1))], 40)
    c3.sources[0].host_id = ""
    r3 = c3.pull()
    assert r3.state is TransferState.FAILED and "payload integrity check" in r3.error


def test_verify_payload_values():
    lay = _layout((0, 1))
    Sink = create_transceiver("DEFAULT")[1]
    caches = _caches(lay, 4, torch.Generator().manual_seed(0))
    for given, want in (("auto", "auto"), ("AUTO", "auto"), (True, True), ("false", False), (False, False)):
        assert Sink(caches, lay, key=KEY, verify_payload=given).verify_payload == want
    with pytest.raises(ValueError, match=r"^cache_transceiver_config.verify_payload='sometimes' is not one of "
                                         r"auto, true, false$"):
        Sink(caches, lay, key=KEY, verify_payload="sometimes")


def test_loopback_addresses():
    assert tcp.is_loopback("127.0.0.1") and tcp.is_loopback("127.8.9.1") and tcp.is_loopback("::1")
    assert tcp.is_loopback("::ffff:127.0.0.1")
    assert not tcp.is_loopback("10.0.0.1") and not tcp.is_loopback("::ffff:10.0.0.1")
    assert not tcp.is_loopback("fe80::1%eth0") and not tcp.is_loopback("") and not tcp.is_loopback("host")
    ident = tcp.host_identity()
    assert ident.startswith(socket.gethostname() + "/") and ident == tcp.host_identity()


def test_payload_macs_are_bound_to_the_connection_and_the_chunk():
    a, b = socket.socketpair()
    try:
        conn = tcp._Conn(a, KEY, b"S")
        conn.nonce = b"n" * 16
        data = memoryview(bytes(range(256)) * 64)
        mac = conn.payload_mac(3, data)
        assert len(mac) == 32 and conn.payload_mac(3, data) == mac
        assert conn.payload_mac(4, data) != mac  # another chunk's place
        other = tcp._Conn(b, KEY, b"K")
        other.nonce = b"m" * 16
        assert other.payload_mac(3, data) != mac  # another connection
        other.nonce = conn.nonce
        assert other.payload_mac(3, data) == mac  # the sink computes what the source did
        assert tcp._Conn(b, b"another key", b"K").payload_mac(3, data) != mac
        assert tcp._Conn(b, None, b"K").payload_mac(3, data) == b""  # no key: nothing to check
        # never the frame MAC of the same bytes (a derived key)
        assert conn._mac(b"S", 3, bytes(data)) != mac
    finally:
        a.close()
        b.close()


def test_release_callback(cluster):
    released = []
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 10, on_release=released.append)
    assert c.sinks[0].release(c.src_layouts[0], "ctx-1") is None
    assert released == ["ctx-1"]
    c.sources[0].on_release = None  # the engine may set it later
    assert c.sinks[0].release(c.src_layouts[0], "ctx-2") is None


def test_release_of_unreachable_source_is_an_error_string(cluster):
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 10)
    lay = c.src_layouts[0]
    c.sources[0].close()
    err = c.sinks[0].release(lay, "ctx-1", timeout_s=1.0)
    assert isinstance(err, str) and lay.endpoint in err


def test_registered_requests_only(cluster):
    released = []
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 20, require_registered=True, on_release=released.append)
    r = c.pull()
    assert r.state is TransferState.FAILED and "not held" in r.error
    c.sources[0].register(c.req)
    _pull_all(c)
    assert c.sinks[0].release(c.src_layouts[0], "ctx-1") is None and released == ["ctx-1"]
    assert not c.sources[0].unregister("ctx-1")  # the release unregistered it
    r = c.pull()
    assert r.state is TransferState.FAILED and "not held" in r.error


def test_registered_block_ids_must_match(cluster):
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 20, require_registered=True)
    c.sources[0].register(KvRequest("ctx-1", [[b + 1 for b in c.src_ids[0]]], 20))
    r = c.pull()
    assert r.state is TransferState.FAILED and "block ids" in r.error


def test_unknown_backends():
    with pytest.raises(ValueError, match="carrier-pigeon.*DEFAULT, NIXL, UCX, MPI"):
        create_transceiver("carrier-pigeon")
    assert create_transceiver("default") == create_transceiver("DEFAULT")


@pytest.mark.skipif(mpi_backend.in_mpi_world(), reason="outside mpirun only")
def test_mpi_outside_mpirun_is_refused_naming_the_alternatives():
    with pytest.raises(ValueError) as e:
        create_transceiver("mpi")
    msg = str(e.value)
    assert "mpirun" in msg and "DEFAULT" in msg and "NIXL" in msg and "UCX" in msg and "\n" not in msg


def test_segmented_payload_mac_over_the_wire_and_an_older_source(cluster, backend, monkeypatch):
    """The payload MAC hashed in segments on a thread pool (disagg/mac.py; pieces of 64 bytes here,
    so each chunk is many): the bytes land and a flipped one is caught; a source of an older build
    (its Hello offers only scheme 1, one HMAC) still serves a verifying sink, which falls back."""
    if _nixl(backend):
        pytest.skip("NIXL reads are one-sided: no payload MAC")
    from meshserve.disagg import mac, wire

    monkeypatch.setattr(mac, "SEGMENT", 64)
    schemes = []  # (side, scheme) of every payload MAC taken
    orig = wire._Conn.payload_hasher

    def record_schemes():
        schemes.clear()
        monkeypatch.setattr(wire._Conn, "payload_hasher",
                            lambda self, seq, scheme=wire.MAC_SCHEME: (schemes.append((self.side, scheme)),
                                                                       orig(self, seq, scheme))[1])

    def verifying_pull():
        c = cluster([_layout((0, 1))], [_layout((0, 1))], 40, sink_kwargs={"verify_payload": True})
        return c, c.pull()

    record_schemes()
    first, r = verifying_pull()
    assert r.state is TransferState.SUCCESS, r.error
    assert first.sinks[0].kv_caches and {s for _, s in schemes} == {2}
    got = _read(first.sinks[0].kv_caches[0], first.sinks[0].layout, first.dst_ids[0][0], 40)
    assert torch.equal(got, first.truth[0].to(got.dtype))

    c = cluster([_layout((0, 1))], [_layout((0, 1))], 40, sink_kwargs={"verify_payload": True})
    assert _tamper(monkeypatch, c.sources[0]) is not None
    r = c.pull()
    assert r.state is TransferState.FAILED and "payload integrity check" in r.error
    assert c.untouched(0)
    # the tampered source may still be sending the chunks its failed sink no longer reads: close both
    # clusters, so none of their hashing lands in the records of the parts below
    first.close()
    c.close()
    # close() shuts the sources' sockets but does not join their connection threads: a thread of the
    # tampered source in the middle of a chunk hashes it (scheme 2) after that; let them end first
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(t.name == "kv-source-conn" and t.is_alive()
                                              for t in threading.enumerate()):
        time.sleep(0.01)

    monkeypatch.undo()
    orig_send = wire._Conn.send
    monkeypatch.setattr(wire._Conn, "send", lambda self, msg: orig_send(
        self, msgspec.structs.replace(msg, mac_v=1) if isinstance(msg, wire.Hello) else msg))
    record_schemes()
    _, r = verifying_pull()
    assert r.state is TransferState.SUCCESS, r.error
    assert schemes and {s for _, s in schemes} == {1}

    # and a sink of an older build (its Reads carry no mac_v: 1) served by this source
    monkeypatch.undo()
    orig_connect = tcp.TcpKvSink._connect

    def old_sink_connect(self, *args, **kwargs):
        conn = orig_connect(self, *args, **kwargs)
        conn.mac_v = 1  # what it speaks, whatever the source's Hello offers
        return conn

    monkeypatch.setattr(tcp.TcpKvSink, "_connect", old_sink_connect)
    record_schemes()
    _, r = verifying_pull()
    assert r.state is TransferState.SUCCESS, r.error
    assert {s for _, s in schemes} == {1} and {side for side, _ in schemes} == {b"S", b"K"}


@pytest.mark.parametrize("kind", ["full", "latent"])
@pytest.mark.parametrize("cp,block,n", [(2, 16, 45), (3, 12, 37), (4, 8, 5)])
def test_context_parallel_sinks_keep_their_sub_blocks(backend, kind, cp, block, n):
    """Generation ranks of a server with context parallelism RING: cp rank r holds tokens t with
    t % block // (block / cp) == r, at block_ids[t // block] * (block / cp) + t % (block / cp) of its
    cache. Each pulls from TP 2 context ranks (blocks of 16) and must hold exactly its tokens."""
    if _nixl(backend):
        pytest.skip("NIXL reads land in whole blocks: cp is refused with it (engine/setup.py)")
    heads = [(0, 2), (2, 4)] if kind == "full" else [(0, 1), (0, 1)]
    src = [_layout([0, 1], kv_heads=h, kind=kind, num_kv_heads=4 if kind == "full" else 1) for h in heads]
    c = Cluster(backend, src, [], n, max_tokens=7)
    try:
        gen = torch.Generator().manual_seed(cp)
        sub, num_blocks = block // cp, 32
        ids = _block_ids(n, block, num_blocks, gen)
        for rank in range(cp):
            lay = msgspec.structs.replace(_layout([0, 1], kv_heads=(0, 4) if kind == "full" else (0, 1),
                                                  num_kv_heads=4 if kind == "full" else 1, block_size=block,
                                                  kind=kind), cp=(rank, cp))
            shape = (num_blocks, sub, LATENT_DIM) if kind == "latent" else (2, num_blocks, sub, 4, HEAD_DIM)
            caches = [torch.zeros(shape) for _ in lay.layers]
            Source, Sink = backend
            sink = Sink(caches, lay, max_tokens_in_buffer=7, key=KEY)
            try:
                r = sink.pull(c.src_layouts, c.req, ids, 10.0)
                assert r.state is TransferState.SUCCESS, r.error
            finally:
                sink.close()
            for layer, cache in zip(lay.layers, caches):
                want = torch.zeros(shape)
                for t in range(n):
                    if t % block // sub == rank:
                        b, o = ids[0][t // block], t % sub
                        if kind == "latent":
                            want[b, o] = c.truth[layer][t]
                        else:
                            want[:, b, o] = c.truth[layer][:, t]
                assert torch.equal(cache, want), (rank, layer)
    finally:
        c.close()


def test_a_context_parallel_source_refuses_reads(cluster):
    """A server with cp holds parts of each block: a sink pulling from it fails with the reason."""
    c = cluster([_layout([0])], [_layout([0])], 20)
    split = msgspec.structs.replace(c.src_layouts[0], cp=(0, 2))
    r = c.pull(0, sources=[split])
    assert r.state is TransferState.FAILED and "runs context parallelism (cp size 2)" in r.error, r.error
    assert c.untouched(0)
