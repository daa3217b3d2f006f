"""The segmented payload MAC (disagg/mac.py) against its definition computed here with hashlib /
hmac directly: any split of the payload into updates gives the same MAC, one flipped byte, another
frame number or another length changes it, and the thread pool's setting is checked."""
from __future__ import annotations

import hashlib
import hmac
import os
import struct

import pytest

from meshserve.disagg import mac

KEY, PREFIX = b"k" * 32, b"nonce" + struct.pack("!Q", 7)


def payload_mac(key: bytes, prefix: bytes, data) -> bytes:
    """A whole payload's MAC through SegmentedMac (as wire._Conn.payload_mac takes it)."""
    h = mac.SegmentedMac(key, prefix)
    h.update(data)
    return h.digest()


def reference(data: bytes, segment: int) -> bytes:
    pieces = [data[i:i + segment] for i in range(0, len(data), segment)] or [b""]
    digests = b"".join(hashlib.sha256(p).digest() for p in pieces)
    return hmac.new(KEY, PREFIX + struct.pack(">Q", len(data)) + digests, hashlib.sha256).digest()


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 1000, 4096 + 17])
@pytest.mark.parametrize("splits", [1, 3, 64])
def test_any_split_gives_the_defined_mac(size, splits):
    data = os.urandom(size)
    h = mac.SegmentedMac(KEY, PREFIX, segment=64)
    step = max(1, size // splits)
    for i in range(0, size, step):
        h.update(memoryview(data)[i:i + step])
    assert h.digest() == reference(data, 64)


def test_whole_payload_default_segment_and_what_changes_it():
    data = bytearray(os.urandom(5 * mac.SEGMENT + 123))  # several pieces on the pool, a short last one
    want = payload_mac(KEY, PREFIX, data)
    assert want == reference(bytes(data), mac.SEGMENT)
    data[3 * mac.SEGMENT + 5] ^= 1
    assert payload_mac(KEY, PREFIX, data) != want
    data[3 * mac.SEGMENT + 5] ^= 1
    assert payload_mac(KEY, PREFIX[:-1] + b"\x08", data) != want  # another frame's
    assert payload_mac(KEY, PREFIX, data + b"\0") != want  # one byte more (the length is bound)
    assert payload_mac(b"j" * 32, PREFIX, data) != want


def test_thread_setting(monkeypatch):
    monkeypatch.setenv(mac.THREADS_ENV, "3")
    assert mac.mac_threads() == 3
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv(mac.THREADS_ENV, bad)
        with pytest.raises(ValueError, match=mac.THREADS_ENV):
            mac.mac_threads()
    monkeypatch.delenv(mac.THREADS_ENV)
    assert 1 <= mac.mac_threads() <= 8


def test_a_forked_child_hashes_without_the_parents_pool(monkeypatch):
    """The parent's pool has no threads in a forked child: a task there waited forever. The child
    starts its own pool (os.register_at_fork)."""
    monkeypatch.setenv(mac.THREADS_ENV, "2")
    data = os.urandom(3 * mac.SEGMENT)
    want = payload_mac(KEY, PREFIX, data)  # the parent's pool exists now
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer within 20 s or be killed
        try:
            import signal
            signal.alarm(20)
            os.write(w, payload_mac(KEY, PREFIX, data))
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 64)
    os.waitpid(pid, 0)
    assert got == want


def test_a_bad_thread_setting_is_refused_before_loading(monkeypatch, tmp_path):
    from helpers import build_checkpoint
    from meshserve.config import build_llm_args
    from meshserve.engine.setup import check_parallel_layout
    from meshserve.models.config import ModelConfig

    build_checkpoint(str(tmp_path), "llama", tokenizer=False)
    args = build_llm_args("LLM()", model=str(tmp_path), device="cpu", cache_transceiver_config={"backend": "DEFAULT"})
    monkeypatch.setenv(mac.THREADS_ENV, "many")
    with pytest.raises(ValueError, match=f"^{mac.THREADS_ENV}='many' is not an integer"):
        check_parallel_layout(args, ModelConfig.from_pretrained(str(tmp_path)))
