"""The signed `disaggregated_params.opaque_state` a context server hands back, and the shared key.

`sign(payload, key)` is base64url(msgpack(payload) + HMAC-SHA256(key, msgpack(payload))); `verify`
checks the MAC before decoding anything (msgpack, never pickle) and returns the payload dict. The
orchestrator passes the blob through untouched; only a server holding the key can make or read one
as valid.

The key: `MESHSERVE_SECRET` (the same on every context and generation server, and on their ranks;
a hex string is decoded, anything else is used as its UTF-8 bytes). Without it, `secret_key()` is a
random key made once per process: enough when both sides live in one process (tests), and
deliberately quiet about it; servers in separate processes then refuse each other's params and
transfers ("signature does not match"), so set MESHSERVE_SECRET whenever there are two processes.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import threading
from typing import Mapping, Optional

import msgspec

_MAC = hashlib.sha256().digest_size
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(dict)
_process_key: Optional[bytes] = None
_lock = threading.Lock()

WHERE = "disaggregated_params.opaque_state"


def key_from_secret(secret: str) -> bytes:
    """A MESHSERVE_SECRET string as key bytes: hex decoded when it is hex, else its UTF-8 bytes."""
    s = secret.strip()
    if s and len(s) % 2 == 0:
        try:
            return bytes.fromhex(s)
        except ValueError:
            pass
    return secret.encode()


def secret_key(env: Mapping[str, str] = os.environ) -> bytes:
    """The HMAC key of disaggregated params and KV transfers: MESHSERVE_SECRET, else a random key
    fixed for this process (see the module docstring)."""
    global _process_key
    secret = env.get("MESHSERVE_SECRET")
    if secret:
        return key_from_secret(secret)
    with _lock:
        if _process_key is None:
            _process_key = secrets.token_bytes(32)
        return _process_key


def sign(payload: dict, key: bytes) -> str:
    body = _encoder.encode(payload)
    return base64.urlsafe_b64encode(body + hmac.new(key, body, hashlib.sha256).digest()).decode("ascii")


def verify(blob: str, key: bytes) -> dict:
    """The payload of a blob `sign` made with the same key; a ValueError naming what is wrong."""
    if not isinstance(blob, str) or not blob:
        raise ValueError(f"{WHERE}: malformed (expected a non-empty base64 string)")
    try:
        raw = base64.urlsafe_b64decode(blob.encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ValueError(f"{WHERE}: malformed (not base64)") from None
    if len(raw) <= _MAC:
        raise ValueError(f"{WHERE}: malformed (too short)")
    body, mac = raw[:-_MAC], raw[-_MAC:]
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        raise ValueError(f"{WHERE}: signature does not match (the context and generation servers "
                         f"need the same MESHSERVE_SECRET)")
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as e:
        raise ValueError(f"{WHERE}: malformed ({e})") from None
