"""DEFAULT's same-host GPU path (cache_transceiver_config.cuda_ipc), everything of it that runs without
CUDA: the protocol (IpcOpen / IpcHandles / IpcPull / IpcGrant / IpcDone over the authenticated
connection), authorization, re-blocking and head re-slicing, the choice of path and the fallback to
TCP, the handle message encoding, the host identity and the config. On the CPU the CUDA calls are
replaced by fakes (`ipc_export` hands out the source's tensors by a token, `ipc_open` returns them);
tests/gpu/test_kv_cuda_ipc.py runs the real thing between two processes on a GPU."""
import logging
import secrets
import types

import msgspec
import pytest
import torch

from meshserve.config import build_llm_args
from meshserve.disagg import cuda_ipc, kv_io, tcp, tcp_sink
from meshserve.disagg.transceiver import KvRequest, TransferState, create_transceiver
from test_transfer import KEY, Cluster, _caches, _layout

DEFAULT = create_transceiver("DEFAULT")


class FakeIpc:
    def __init__(self):
        self.tensors: dict[bytes, torch.Tensor] = {}
        self.exports = 0
        self.opens = 0
        self.fail_export = None
        self.fail_open = None

    def export(self, cache, shared):
        if self.fail_export:
            raise RuntimeError(self.fail_export)
        self.exports += 1
        token = secrets.token_bytes(8)
        self.tensors[token] = cache
        return tcp.IpcCache(0, token, cache.numel() * cache.element_size(), 0, b"/torch_ref", 0, None, False,
                            list(cache.shape), list(cache.stride()), cache.storage_offset(),
                            kv_io.dtype_name(cache.dtype))

    def open(self, caches, device):
        if self.fail_open:
            raise RuntimeError(self.fail_open)
        self.opens += 1
        return [self.tensors[c.handle] for c in caches]


@pytest.fixture
def ipc(monkeypatch):
    fake = FakeIpc()
    for side in (tcp, tcp_sink):  # the source's module and the sink's
        monkeypatch.setattr(side, "_ipc_local_why", lambda caches: None)  # as if the caches were CUDA tensors
    monkeypatch.setattr(cuda_ipc, "ipc_export", fake.export)  # where the IPC mixins look them up
    monkeypatch.setattr(cuda_ipc, "ipc_open", fake.open)
    return fake


@pytest.fixture
def cluster():
    made = []

    def make(*args, **kwargs):
        c = Cluster(DEFAULT, *args, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def _ok(c, i=0, path="cuda_ipc"):
    r = c.pull(i)
    assert r.state is TransferState.SUCCESS, r.error
    assert r.path == path and r.bytes > 0
    c.check(i)
    return r


LAYOUTS = {
    "same": ([_layout((0, 1))], [_layout((0, 1))]),
    "bf16-reblock-16-8": ([_layout((0, 1), dtype="bfloat16")], [_layout((0, 1), dtype="bfloat16", block_size=8)]),
    "reblock-16-32": ([_layout((0, 1), block_size=16)], [_layout((0, 1), block_size=32)]),
    "reblock-4-12": ([_layout((0, 1), block_size=4)], [_layout((0, 1), block_size=12)]),
    "tp2-to-tp1": ([_layout((0, 1), (0, 2)), _layout((0, 1), (2, 4))], [_layout((0, 1), (0, 4))]),
    "tp1-to-tp2": ([_layout((0, 1), (0, 4))], [_layout((0, 1), (0, 2)), _layout((0, 1), (2, 4))]),
    "tp4-to-tp2-reblock": ([_layout((0, 1, 2), (h, h + 1), block_size=8) for h in range(4)],
                           [_layout((0, 1, 2), (0, 2)), _layout((0, 1, 2), (2, 4))]),
    "replicated-heads": ([_layout((0, 1), (0, 1), num_kv_heads=1)] * 2, [_layout((0, 1), (0, 1), num_kv_heads=1)]),
    "pp-and-tp": ([_layout(la, h) for la in ((0, 1), (2, 3)) for h in ((0, 2), (2, 4))],
                  [_layout((0,), (0, 4), block_size=32), _layout((1, 2, 3), (0, 4), block_size=32)]),
    "latent": ([_layout((0, 1, 2), kind="latent")] * 2, [_layout((0, 1, 2), kind="latent", block_size=32)]),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("n", [1, 45])
def test_layouts_move_over_ipc(ipc, cluster, name, n):
    srcs, dsts = LAYOUTS[name]
    c = cluster(srcs, dsts, n, require_registered=True)
    for s in c.sources:
        s.register(c.req)
    for i in range(len(c.sinks)):
        _ok(c, i)
        assert c.sinks[i].paths.get("cuda_ipc") and not c.sinks[i].paths.get("tcp")
    for s in c.sources:
        assert not s._inflight  # every grant was done


def test_groups_and_chunks(ipc, cluster):
    lay = _layout((0, 1, 2, 3), groups=(0, 0, 1, 1))
    c = cluster([lay], [_layout((0, 1, 2, 3), groups=(0, 0, 1, 1), block_size=8)], 30, num_groups=2, max_tokens=7)
    _ok(c)


def test_opened_once_per_source_instance(ipc, cluster):
    c = cluster([_layout((0, 1)), _layout((2, 3))], [_layout((0, 1, 2, 3))], 20)
    for _ in range(3):
        _ok(c)
    assert ipc.opens == 2 and ipc.exports == 2 * 2  # per source: one open of its two layers
    assert c.sinks[0].paths == {"cuda_ipc": 6}
    # a restarted source (another instance id at the same endpoint) is opened again
    c.sources[0]._ipc_instance = b"another instance"
    _ok(c)
    assert ipc.opens == 3


def test_grants_only_registered_requests_with_their_block_ids(ipc, cluster):
    released = []
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 20, require_registered=True, on_release=released.append)
    r = c.pull()
    assert r.state is TransferState.FAILED and "not held" in r.error and c.untouched(0)  # no TCP retry
    c.sources[0].register(KvRequest("ctx-1", [[b + 1 for b in c.src_ids[0]]], 20))
    r = c.pull()
    assert r.state is TransferState.FAILED and "block ids" in r.error and c.untouched(0)
    c.sources[0].register(c.req)
    _ok(c)
    assert c.sinks[0].release(c.src_layouts[0], "ctx-1") is None and released == ["ctx-1"]
    r = c.pull()
    assert r.state is TransferState.FAILED and "not held" in r.error


def test_the_request_is_being_read_until_the_sink_is_done(ipc, cluster, monkeypatch):
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 20, require_registered=True)
    c.sources[0].register(c.req)
    seen = []
    orig = kv_io.copy_slots

    def copy(*a):
        seen.append(dict(c.sources[0]._inflight))
        return orig(*a)
    monkeypatch.setattr(kv_io, "copy_slots", copy)
    _ok(c)
    assert seen and all(s == {"ctx-1": 1} for s in seen)  # unregister would wait
    assert c.sources[0]._inflight == {}


def test_a_sink_that_goes_away_is_done_reading(ipc, cluster, monkeypatch):
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 20, require_registered=True)
    c.sources[0].register(c.req)
    monkeypatch.setattr(kv_io, "copy_slots", lambda *a: (_ for _ in ()).throw(ValueError("boom")))
    r = c.pull()
    assert r.state is TransferState.FAILED and "boom" in r.error
    assert c.sources[0].unregister("ctx-1")  # returns: the closed connection released the grant


def test_another_host_goes_over_tcp_logged_once(ipc, cluster, caplog):
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 20)
    c.sinks[0].host_id = "elsewhere/boot"
    with caplog.at_level(logging.INFO, logger="meshserve.disagg.tcp"):
        _ok(c, path="tcp")
        _ok(c, path="tcp")
    notes = [r for r in caplog.records if "not CUDA IPC" in r.getMessage()]
    assert len(notes) == 1 and "another host" in notes[0].getMessage()
    assert ipc.exports == 0 and c.sinks[0].paths == {"tcp": 2}


def test_export_or_open_failures_fall_back_to_tcp_once(ipc, cluster, caplog):
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 20)
    ipc.fail_export = "cudaIpcGetMemHandle failed"
    with caplog.at_level(logging.WARNING):
        _ok(c, path="tcp")
        _ok(c, path="tcp")
    sink_notes = [r for r in caplog.records if r.getMessage().startswith("KV pulls from")]
    assert len(sink_notes) == 1 and "cudaIpcGetMemHandle" in sink_notes[0].getMessage()
    assert c.sources[0]._ipc_instance == b""  # the source stopped offering it
    c2 = cluster([_layout((0, 1))], [_layout((0, 1))], 20)
    ipc.fail_export, ipc.fail_open = None, "cudaIpcOpenMemHandle: invalid argument"
    _ok(c2, path="tcp")
    _ok(c2, path="tcp")
    assert ipc.exports == 2  # one IpcOpen (two layers): the sink remembers the failure for this source instance
    assert sum("cudaIpcOpenMemHandle" in r.getMessage() for r in caplog.records) == 1


def test_mixed_paths(ipc, cluster):
    c = cluster([_layout((0, 1), (0, 2)), _layout((0, 1), (2, 4))], [_layout((0, 1), (0, 4))], 33)
    c.sources[1]._ipc_instance = b""  # as a source with cuda_ipc false (or CPU caches) offers it
    _ok(c, path="cuda_ipc+tcp")


def test_cuda_ipc_false_on_either_side(ipc, cluster):
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 20, cuda_ipc=False)
    assert c.sources[0]._ipc_instance == b""
    _ok(c, path="tcp")
    c2 = cluster([_layout((0, 1))], [_layout((0, 1))], 20, sink_kwargs={"cuda_ipc": "false"})
    _ok(c2, path="tcp")
    assert ipc.exports == 0


def test_cuda_ipc_true_refuses_where_it_cannot_be_used(ipc, cluster):
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 20, sink_kwargs={"cuda_ipc": True})
    _ok(c)
    c.sinks[0].host_id = "elsewhere/boot"
    r = c.pull()
    assert r.state is TransferState.FAILED and "\n" not in r.error
    assert "cache_transceiver_config.cuda_ipc=true" in r.error and "another host" in r.error


def test_without_cuda_auto_is_tcp_and_true_is_refused(cluster):
    c = cluster([_layout((0, 1))], [_layout((0, 1))], 20)  # CPU caches, no fakes
    assert c.sources[0]._ipc_instance == b""
    _ok(c, path="tcp")
    lay = _layout((0, 1))
    caches = _caches(lay, 4, torch.Generator().manual_seed(0))
    Source, Sink = DEFAULT
    for make in (lambda: Sink(caches, lay, key=KEY, cuda_ipc=True),
                 lambda: Source(caches, lay, key=KEY, cuda_ipc="true")):
        with pytest.raises(ValueError, match=r"^cache_transceiver_config.cuda_ipc=true cannot be used here: the KV "
                                             r"caches are not CUDA tensors; set cuda_ipc: auto"):
            make()
    with pytest.raises(ValueError, match=r"^cache_transceiver_config.cuda_ipc='yes' is not one of auto, true, false$"):
        Sink(caches, lay, key=KEY, cuda_ipc="yes")
    # the backends with their own data path never take it
    from meshserve.disagg._side import SideKvSink
    assert "own data path" in SideKvSink(caches, lay, key=KEY)._ipc_why


def test_old_torch_is_a_reason(monkeypatch):
    monkeypatch.setattr(torch.UntypedStorage, "_new_shared_cuda", None, raising=False)
    assert "_new_shared_cuda" in tcp.cuda_ipc_unsupported()


def test_handle_messages_are_msgpack_not_pickle():
    # what UntypedStorage._share_cuda_() returns: (device, handle, size, offset, ref counter file,
    # ref counter offset, event handle, event sync required)
    share = (0, b"\x01" * 64, 1 << 30, 512, b"/torch_123_456_0", 3, b"\x02" * 64, True)

    class Storage:
        def data_ptr(self):
            return 1234

        def _share_cuda_(self):
            return share
    cache = types.SimpleNamespace(untyped_storage=Storage, shape=torch.Size([2, 4, 16, 2, 8]),
                                  stride=lambda: (1024, 256, 16, 8, 1), storage_offset=lambda: 0,
                                  dtype=torch.bfloat16, device=torch.device("cpu"))
    shared: dict = {}
    a, b = tcp.ipc_export(cache, shared), tcp.ipc_export(cache, shared)
    assert len(shared) == 1  # one share per storage per export
    wire = tcp._encoder.encode(tcp.IpcHandles([a, b]))
    assert b"pickle" not in wire and b"\x80\x04" not in wire[:2]
    back = tcp._decoder.decode(wire)
    assert isinstance(back, tcp.IpcHandles) and back.caches == [a, b]
    c = back.caches[0]
    assert (c.device, c.handle, c.storage_size, c.storage_offset, c.ref_counter, c.ref_counter_offset, c.event,
            c.event_sync) == share
    assert c.shape == [2, 4, 16, 2, 8] and c.stride == [1024, 256, 16, 8, 1] and c.dtype == "bfloat16"
    # a malformed one is refused by the decoder (types are checked), not evaluated
    bad = msgspec.msgpack.encode({"type": "IpcHandles", "caches": [{"device": "0"}]})
    with pytest.raises(msgspec.ValidationError):
        tcp._decoder.decode(bad)
    # an older peer's Hello (no host, no ipc) decodes with the defaults: never the same host
    hello = tcp._decoder.decode(msgspec.msgpack.encode({"type": "Hello", "nonce": b"n", "layout": msgspec.to_builtins(
        _layout((0,)))}))
    assert hello.host == "" and hello.ipc == b""


def test_config_values_and_one_line_errors():
    ctc = build_llm_args(cache_transceiver_config={}).cache_transceiver_config
    assert ctc.verify_payload == "auto" and ctc.cuda_ipc == "auto"
    for given, want in (("auto", "auto"), (True, True), ("false", False), ("True", True), (False, False)):
        ctc = build_llm_args(cache_transceiver_config={"cuda_ipc": given, "verify_payload": given}
                             ).cache_transceiver_config
        assert ctc.cuda_ipc == want and ctc.verify_payload == want
    for field in ("cuda_ipc", "verify_payload"):
        with pytest.raises(ValueError) as e:
            build_llm_args(cache_transceiver_config={field: "sometimes"})
        msg = str(e.value)
        assert f"cache_transceiver_config.{field}='sometimes'" in msg and "auto, true, false" in msg
        assert "\n" not in msg


def test_cuda_ipc_true_needs_the_default_backend():
    from meshserve.engine.setup import check_parallel_layout
    args = build_llm_args(cache_transceiver_config={"backend": "UCX", "cuda_ipc": True})
    cfg = types.SimpleNamespace(is_moe=False, architecture="LlamaForCausalLM")
    try:
        check_parallel_layout(args, cfg)
    except ValueError as e:
        msg = str(e)
        if "cuda_ipc" not in msg:
            pytest.skip(f"UCX is not usable here: {msg}")
        assert msg.startswith("cache_transceiver_config.cuda_ipc=true") and "\n" not in msg
    else:
        pytest.fail("accepted cuda_ipc=true with backend UCX")


def test_rank_transfer_passes_the_settings():
    from meshserve.worker.kv_transfer import RankTransfer
    lay = _layout((0, 1))
    caches = _caches(lay, 4, torch.Generator().manual_seed(0))
    rt = RankTransfer(caches, lay, "DEFAULT", key=KEY, verify_payload=True, cuda_ipc=False)
    try:
        assert rt.sink.verify_payload is True and rt.sink.cuda_ipc is False and rt.source.cuda_ipc is False
    finally:
        rt.close()
    rt = RankTransfer(caches, lay, "DEFAULT", key=KEY)
    try:
        assert rt.sink.verify_payload == "auto" and rt.sink.cuda_ipc == "auto"
    finally:
        rt.close()
