"""disagg/params.py: signed opaque_state blobs and the shared key."""
import base64

import msgspec
import pytest

from meshserve.disagg import params
from meshserve.disagg.transceiver import RankLayout

KEY = b"k" * 32


def _layout():
    return RankLayout("127.0.0.1:5000", "llama-abc", "bfloat16", 16, (0, 1, 2), 8, (0, 4), 128, groups=(0, 0, 0))


def test_round_trip_with_structs_inside():
    payload = {"prompt_token_ids": [1, 2, 3], "layouts": [_layout()], "block_ids": [[4, 5]], "num_tokens": 3}
    out = params.verify(params.sign(payload, KEY), KEY)
    assert out["prompt_token_ids"] == [1, 2, 3] and out["num_tokens"] == 3
    assert msgspec.convert(out["layouts"][0], RankLayout) == _layout()


def test_wrong_key_refused():
    blob = params.sign({"a": 1}, KEY)
    with pytest.raises(ValueError, match="disaggregated_params.opaque_state: signature does not match"):
        params.verify(blob, b"x" * 32)


def test_tampered_payload_refused():
    raw = bytearray(base64.urlsafe_b64decode(params.sign({"num_tokens": 10}, KEY)))
    raw[-40] ^= 1  # a byte of the msgpack body
    with pytest.raises(ValueError, match="signature does not match"):
        params.verify(base64.urlsafe_b64encode(bytes(raw)).decode(), KEY)


@pytest.mark.parametrize("blob", ["", "!!!not base64!!!", base64.urlsafe_b64encode(b"short").decode(), 17])
def test_malformed_refused(blob):
    with pytest.raises(ValueError, match="disaggregated_params.opaque_state: malformed"):
        params.verify(blob, KEY)


def test_signed_garbage_is_malformed_not_unpickled():
    import hashlib
    import hmac
    body = b"\xc1\xc1\xc1"  # not msgpack
    blob = base64.urlsafe_b64encode(body + hmac.new(KEY, body, hashlib.sha256).digest()).decode()
    with pytest.raises(ValueError, match="malformed"):
        params.verify(blob, KEY)


def test_secret_key_from_env_and_process_fallback():
    assert params.secret_key({"MESHSERVE_SECRET": "00ff" * 8}) == bytes.fromhex("00ff" * 8)
    assert params.secret_key({"MESHSERVE_SECRET": "not hex!"}) == b"not hex!"
    a, b = params.secret_key({}), params.secret_key({})
    assert a == b and len(a) == 32  # one random key per process
