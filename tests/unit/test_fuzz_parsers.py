"""Hypothesis property tests (no server) of the parsers of what crosses a socket or comes from users:
each input, however malformed, ends in the parser's own error type with a one-line message, never
in another exception, a hang or an unbounded allocation (docs/fuzzing.md).

- disagg/wire.py: `_Conn.recv` over a socket pair fed random, truncated and bit-flipped frames
  (ConnectionError / _AuthError / timeout only; a header longer than MAX_HEADER is refused before
  it is allocated); `parse_endpoint` (ValueError only, a valid port when it returns).
- disagg/params.py: `verify` of random strings and of random bodies signed with the key (ValueError
  only); `key_proof` of random challenges (None or a hex digest).
- engine/disagg.py: `generation_request` of random payloads signed with the key (ValueError only).
- disagg/orchestrator_config.py: `parse_config` of random YAML-like dicts (ConfigError, one line).
- serve/protocol.py: the request models and their SamplingParams (ValidationError / ValueError /
  APIError, every message one line), the body decoder, `one_line`.

Every example count is bounded (derandomized, so CI sees the same inputs); the file runs in ~10 s.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import socket
import struct

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from meshserve.disagg import params, wire
from meshserve.disagg.orchestrator_config import ConfigError, parse_config
from meshserve.disagg.transceiver import RankLayout
from meshserve.engine import disagg
from meshserve.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, decode_json_body,
                                      error_body, from_validation_error, from_value_error, one_line)

KEY = b"k" * 32
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def assert_one_line(message: str) -> None:
    assert message and len(message.splitlines()) == 1, repr(message)
    assert "Traceback" not in message, message


# ---- JSON-like values ---------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                    st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
# what msgpack carries (its ints are int64 / uint64)
msgpack_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                            st.text(max_size=12), st.binary(max_size=8))
msgpack_values = st.recursive(msgpack_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


# ---- disagg/wire.py: frames ---------------------------------------------------------------------
def _frame(body: bytes, key, seq: int = 0, direction: bytes = b"S") -> bytes:
    mac = hmac.new(key, direction + struct.pack("!Q", seq) + body, hashlib.sha256).digest() if key else bytes(32)
    return struct.pack("!I", len(body)) + mac + body


def _recv_all(data: bytes, key) -> list:
    """What a sink's _Conn makes of `data` arriving on its socket, then the peer closing: the
    messages decoded, then the exception that ended it (one of the clean ones, asserted)."""
    a, b = socket.socketpair()
    try:
        a.sendall(data)  # small enough for the socket buffer: data is at most a few KB
        a.shutdown(socket.SHUT_WR)
        b.settimeout(2.0)
        conn = wire._Conn(b, key, b"K")
        got = []
        for _ in range(64):
            try:
                got.append(conn.recv())
            except (ConnectionError, wire._AuthError, socket.timeout) as e:
                assert_one_line(str(e))
                return got
        return got
    finally:
        a.close()
        b.close()


VALID_BODIES = [wire._encoder.encode(m) for m in (
    wire.Ok(), wire.Release("cmpl-1"), wire.Error("no"), wire.Data(16, [2, 8]),
    wire.Read("cmpl-1", [1, 2], 32, 0, (0, 4), (0, 16), "llama-abc", "float32", True, 2),
    wire.Hello(b"n" * 16, RankLayout("127.0.0.1:5000", "llama-abc", "float32", 16, (0, 1), 4, (0, 4), 8)))]


@FUZZ
@given(st.binary(max_size=2048), st.sampled_from([None, KEY]))
def test_wire_random_bytes_end_in_a_clean_error(data, key):
    _recv_all(data, key)


@FUZZ
@given(st.sampled_from(VALID_BODIES), st.sampled_from([None, KEY]), st.data())
def test_wire_truncated_and_bit_flipped_frames(body, key, data):
    frame = bytearray(_frame(body, key))
    assert _recv_all(bytes(frame), key)  # intact, it decodes
    mode = data.draw(st.sampled_from(["truncate", "flip", "both"]))
    if mode in ("truncate", "both"):
        frame = frame[:data.draw(st.integers(0, len(frame) - 1))]
    if mode in ("flip", "both") and frame:
        for i in data.draw(st.lists(st.integers(0, len(frame) - 1), min_size=1, max_size=4)):
            frame[i] ^= 1 << data.draw(st.integers(0, 7))
    msgs = _recv_all(bytes(frame), key)
    if key is not None:  # with a key an altered frame is never taken
        assert all(wire._encoder.encode(m) == body for m in msgs)


@FUZZ
@given(st.integers(wire.MAX_HEADER + 1, 2**32 - 1))
def test_wire_oversized_header_refused_before_allocating(size):
    a, b = socket.socketpair()
    try:
        a.sendall(struct.pack("!I", size) + bytes(32))
        b.settimeout(2.0)
        with pytest.raises(ConnectionError, match="limit"):
            wire._Conn(b, KEY, b"K").recv()
    finally:
        a.close()
        b.close()


@FUZZ
@given(st.one_of(st.text(max_size=30), st.from_regex(r"\A\[?[a-z0-9.:]{0,12}\]?:[0-9٠-٩²]{0,8}\Z")))
def test_parse_endpoint_is_a_value_error_or_a_usable_address(endpoint):
    try:
        host, port = wire.parse_endpoint(endpoint)
    except ValueError as e:
        assert_one_line(str(e))
        return
    assert host and 0 <= port <= 65535


@pytest.mark.parametrize("endpoint", ["host:²", "host:٣", "host:99999", "host:65536"])
def test_parse_endpoint_refuses_what_connect_cannot_take(endpoint):
    """Found by the fuzzing: str.isdigit() passed "²" (then int() raised its own message) and ports
    past 65535 (socket.connect then raised OverflowError, not the ValueError callers catch)."""
    with pytest.raises(ValueError, match="is not host:port"):
        wire.parse_endpoint(endpoint)


# ---- disagg/params.py ---------------------------------------------------------------------------
def _signed(body: bytes, key: bytes = KEY) -> str:
    return base64.urlsafe_b64encode(body + hmac.new(key, body, hashlib.sha256).digest()).decode()


@FUZZ
@given(st.one_of(st.text(max_size=200), st.binary(max_size=150).map(lambda b: base64.urlsafe_b64encode(b).decode()),
                 st.none(), st.integers(), st.binary(max_size=20)))
def test_verify_random_blobs_are_value_errors(blob):
    with pytest.raises(ValueError) as e:
        params.verify(blob, KEY)
    assert_one_line(str(e.value))


@FUZZ
@given(st.one_of(st.binary(max_size=200), msgpack_values.map(lambda v: msgspec.msgpack.encode(v))))
def test_verify_signed_random_bodies_give_a_dict_or_a_value_error(body):
    """Only a key holder can get this far; still, what it signed decodes into a dict or is refused."""
    try:
        out = params.verify(_signed(body), KEY)
    except ValueError as e:
        assert_one_line(str(e))
        return
    assert isinstance(out, dict)


def test_verify_deeply_nested_signed_body_is_a_value_error():
    """Found by the fuzzing: msgpack nested 100000 deep raised RecursionError out of verify."""
    body = b"\x81\xa1a" + b"\x91" * 100000 + b"\x01"
    with pytest.raises(ValueError, match="nested too deeply"):
        params.verify(_signed(body), KEY)


@FUZZ
@given(st.text(max_size=140))
def test_key_proof_answers_hex_or_none(challenge):
    proof = params.key_proof(KEY, challenge)
    assert proof is None or (len(proof) == 64 and int(proof, 16) >= 0)


# ---- engine/disagg.py: a generation server reading the signed state ----------------------------
LAYOUT = RankLayout("127.0.0.1:5000", "llama-abc", "float32", 16, (0, 1), 4, (0, 4), 8)
GOOD_STATE = {"v": 1, "ctx_request_id": "cmpl-1", "prompt_token_ids": [1, 2, 3], "first_token": 7,
              "layouts": [msgspec.to_builtins(LAYOUT)], "block_ids": [[0]], "num_tokens": 3,
              "logprobs": [1, [[7], [-0.5]]], "prompt_logprobs": [1, [None, [[2], [-1.0]], [[3], [-1.0]]]]}
odd_values = st.one_of(msgpack_values, st.sampled_from([float("inf"), float("-inf"), float("nan"), 2**64 - 1, -1,
                                                          "7"]))


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(GOOD_STATE)), odd_values, max_size=4),
       st.sampled_from([None, 1, 2]), st.sampled_from([None, 1]))
def test_generation_request_of_odd_signed_states_is_a_value_error(changes, logprobs, prompt_logprobs):
    state = {**GOOD_STATE, **changes}
    blob = params.sign(state, KEY)
    try:
        req = disagg.generation_request(blob, [1, 2, 3], [LAYOUT], key=KEY, logprobs=logprobs,
                                        prompt_logprobs=prompt_logprobs)
    except ValueError as e:
        assert_one_line(str(e))
        return
    assert req.kind == "generation_only"


@pytest.mark.parametrize("change,logprobs", [({"first_token": float("inf")}, None), ({"logprobs": []}, 1),
                                             ({"logprobs": [1]}, 1)])
def test_generation_request_odd_state_is_a_value_error(change, logprobs):
    """Found by the fuzzing: int(inf) raised OverflowError, and a short logprobs entry IndexError, out
    of generation_request (a generation server's 500)."""
    blob = params.sign({**GOOD_STATE, **change}, KEY)
    with pytest.raises(ValueError, match="malformed"):
        disagg.generation_request(blob, [1, 2, 3], [LAYOUT], key=KEY, logprobs=logprobs)


# ---- disagg/orchestrator_config.py --------------------------------------------------------------
urls = st.one_of(st.sampled_from(["localhost:8001", "http://a:1", "HTTP://a:1", "a:1", "[::1]:80", "h:0", "h:65536",
                                  "h: 1", "ftp://h:1", "h:1/x", ""]), st.text(max_size=12))


router = st.one_of(st.none(), json_values,
                   st.fixed_dictionaries({}, optional={"type": st.one_of(st.sampled_from(
                       ["round_robin", "load_balancing", "kv_cache_aware", "nope"]), scalars),
                       "block_size": json_values, "max_blocks": st.integers(-3, 5), "bogus": scalars}))
group = st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "urls": st.one_of(st.lists(urls, max_size=3), json_values),
    "num_instances": st.one_of(st.integers(-1, 4), scalars), "router": router}))
config = st.fixed_dictionaries({}, optional={
    "context_servers": group, "generation_servers": group, "hostname": scalars, "port": scalars,
    "backend": st.one_of(st.just("pytorch"), scalars), "max_retries": scalars, "health_check_interval": scalars,
    "health_check_timeout": scalars, "max_failovers": scalars, "stall_timeout": scalars,
    st.text(max_size=12).filter(lambda k: k not in ("context_servers", "generation_servers")): scalars})


@settings(FUZZ, max_examples=300)
@given(st.one_of(config, json_values))
def test_parse_config_of_random_dicts_is_a_config_error(raw):
    try:
        parse_config(raw)
    except ConfigError as e:
        assert_one_line(str(e))


GOOD_GROUP = {"urls": ["localhost:8001"]}


def test_config_router_type_of_another_type_is_a_config_error():
    with pytest.raises(ConfigError):
        parse_config({"context_servers": {**GOOD_GROUP, "router": {"type": []}}, "generation_servers": GOOD_GROUP})


def test_config_non_ascii_port_digits_are_refused_naming_the_url():
    with pytest.raises(ConfigError, match=r"urls\[0\]"):
        parse_config({"context_servers": {"urls": ["host:²"]}, "generation_servers": GOOD_GROUP})


def test_config_unknown_key_with_a_newline_is_one_line():
    with pytest.raises(ConfigError) as e:
        parse_config({"context_servers": GOOD_GROUP, "generation_servers": GOOD_GROUP, "a\nb": 1})
    assert_one_line(str(e.value))


# ---- serve/protocol.py --------------------------------------------------------------------------
SAMPLING_FIELDS = {
    "max_tokens": st.one_of(st.integers(-2, 2**64), scalars), "n": st.one_of(st.integers(-1, 2**64), scalars),
    "temperature": scalars, "top_p": scalars, "top_k": scalars, "min_p": scalars, "seed": scalars,
    "stop": st.one_of(scalars, st.lists(st.text(max_size=4), max_size=3)),
    "stop_token_ids": st.one_of(scalars, st.lists(st.integers(-2**70, 2**70), max_size=3)),
    "presence_penalty": scalars, "frequency_penalty": scalars, "repetition_penalty": scalars,
    "logit_bias": st.one_of(scalars, st.dictionaries(st.text(max_size=6), scalars, max_size=3),
                            st.dictionaries(st.integers(-5, 2**64).map(str), st.floats(-200, 200), max_size=3)),
    "min_tokens": scalars, "stream": scalars, "stream_options": json_values, "ignore_eos": scalars,
    "disaggregated_params": json_values, "metadata": json_values,
    st.text(max_size=8): json_values,  # fields the server does not know
}


def _check_request(model, body: dict, logprobs_field: str) -> None:
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        err = from_validation_error(e)
        assert err.status == 400 and err.param
        assert_one_line(error_body(err.message, param=err.param)["error"]["message"])
        return
    try:
        lp = getattr(req, logprobs_field)
        req.sampling_params(req.requested_max_tokens or 16, None if lp is None or lp is False else int(lp))
    except ValueError as e:
        err = from_value_error(e)
        assert_one_line(error_body(err.message, param=err.param)["error"]["message"])
    if isinstance(req, ChatCompletionRequest):
        try:
            req.template_messages()
        except APIError as e:
            assert e.status == 400 and e.param
            assert_one_line(error_body(e.message)["error"]["message"])


messages = st.one_of(json_values, st.lists(st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]), scalars)},
    optional={"content": st.one_of(st.text(max_size=8), st.none(), json_values,
                                   st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"])},
                                                                  optional={"text": scalars}), max_size=2)),
              "name": scalars}), max_size=3))


@FUZZ
@given(st.fixed_dictionaries({}, optional={"prompt": st.one_of(json_values, st.lists(st.integers(-1, 2**64))),
                                           "echo": scalars, "logprobs": scalars, "best_of": scalars,
                                           **SAMPLING_FIELDS}))
def test_completion_request_errors_are_one_line(body):
    _check_request(CompletionRequest, body, "logprobs")


@FUZZ
@given(st.fixed_dictionaries({}, optional={"messages": messages, "logprobs": scalars, "top_logprobs": scalars,
                                           **SAMPLING_FIELDS}))
def test_chat_request_errors_are_one_line(body):
    _check_request(ChatCompletionRequest, body, "top_logprobs")


@pytest.mark.parametrize("key", [" 5 ", "5_0", "٥", "+5", "0x5"])
def test_logit_bias_keys_are_decimal_token_ids(key):
    """Found by the fuzzing: int() took " 5 " and "5_0" (as token 50) and Arabic-Indic digits."""
    req = CompletionRequest.model_validate({"prompt": "x", "logit_bias": {key: 1.0}})
    with pytest.raises(ValueError, match="logit_bias keys must be token ids"):
        req.sampling_params(4, None)


@FUZZ
@given(st.binary(max_size=300))
def test_decode_json_body_is_a_value_or_a_400(body):
    try:
        decode_json_body(body)
    except APIError as e:
        assert e.status == 400
        assert_one_line(e.message)


@pytest.mark.parametrize("body", [b"[" * 100000 + b"]" * 100000, b'{"a":' * 100000 + b"1" + b"}" * 100000])
def test_decode_json_body_deep_nesting_is_a_400(body):
    """Found by the fuzzing: 5000 nested arrays raised RecursionError out of the decoder: a 500."""
    with pytest.raises(APIError, match="nested too deeply") as e:
        decode_json_body(body)
    assert e.value.status == 400


@FUZZ
@given(st.text(max_size=40))
def test_one_line_escapes_every_line_break(text):
    out = one_line(text)
    assert len(out.splitlines()) <= 1
    if len(text.splitlines()) <= 1 and not text.endswith(tuple("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")):
        assert out == text
