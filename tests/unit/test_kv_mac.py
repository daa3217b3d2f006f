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
    want = mac.payload_mac(KEY, PREFIX, data)
    assert want == reference(bytes(data), mac.SEGMENT)
    data[3 * mac.SEGMENT + 5] ^= 1
    assert mac.payload_mac(KEY, PREFIX, data) != want
    data[3 * mac.SEGMENT + 5] ^= 1
    assert mac.payload_mac(KEY, PREFIX[:-1] + b"\x08", data) != want  # another frame's
    assert mac.payload_mac(KEY, PREFIX, data + b"\0") != want  # one byte more (the length is bound)
    assert mac.payload_mac(b"j" * 32, PREFIX, data) != want


def test_thread_setting(monkeypatch):
    monkeypatch.setenv(mac.THREADS_ENV, "3")
    assert mac.mac_threads() == 3
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv(mac.THREADS_ENV, bad)
        with pytest.raises(ValueError, match=mac.THREADS_ENV):
            mac.mac_threads()
    monkeypatch.delenv(mac.THREADS_ENV)
    assert 1 <= mac.mac_threads() <= 8
