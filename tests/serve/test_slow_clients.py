"""Slow clients (slowloris) and large headers: 200 connections that send part of a request's headers, or all headers and
part of the body, and then nothing. The server keeps answering other requests at once, none of them
reaches the engine (running and waiting stay 0, no KV block is held), and it is still healthy after
they hang up. Headers past --max_request_header_kb are a 431."""
from __future__ import annotations

import os
import socket
import time

import httpx

from serve_util import start_server


def test_slow_clients_hold_no_engine_resources(tiny_model):
    server = start_server(tiny_model, api_key=None)
    socks = []
    try:
        host, port = "127.0.0.1", server.port
        body = b'{"model": "tiny-chat", "prompt": "Hello", "max_tokens": 4}'
        for i in range(200):
            s = socket.create_connection((host, port), timeout=5)
            if i % 2:  # headers cut short
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            else:  # headers whole, body cut short
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
            socks.append(s)
        time.sleep(1.0)
        t0 = time.monotonic()
        r = httpx.post(server.base_url + "/v1/completions", timeout=30,
                       json={"model": os.path.basename(tiny_model), "prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200 and time.monotonic() - t0 < 10
        m = server.metrics()
        assert m["meshserve_num_requests_running"] == 0 and m["meshserve_num_requests_waiting"] == 0
        assert m["meshserve_kv_cache_used_blocks"] == 0
    finally:
        for s in socks:
            s.close()
    try:
        time.sleep(0.5)
        assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200
        # headers past --max_request_header_kb (64 KiB by default): a 431 in OpenAI's error shape
        big = httpx.post(server.base_url + "/v1/completions", timeout=30, headers={"X-Big": "a" * 100_000},
                         json={"model": os.path.basename(tiny_model), "prompt": "Hi", "max_tokens": 2})
        assert big.status_code == 431, big.text
        err = big.json()["error"]
        assert err["code"] == "request_header_fields_too_large" and "max_request_header_kb" in err["message"]
        ok = httpx.post(server.base_url + "/v1/completions", timeout=30, headers={"X-Fine": "a" * 8_000},
                        json={"model": os.path.basename(tiny_model), "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200
        r = httpx.post(server.base_url + "/v1/completions", timeout=30,
                       json={"model": os.path.basename(tiny_model), "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        server.stop()


_unread: dict[int, bytes] = {}  # bytes a recv brought past one response (pipelined answers), by socket


def _response(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 response (status line, headers, a body of its content-length) off sock; what
    arrived after it stays for the next call on the same socket."""
    data = _unread.pop(id(sock), b"")
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    if body[length:]:
        _unread[id(sock)] = body[length:]
    return head + b"\r\n\r\n" + body[:length]


def test_request_headers_not_sent_in_time_are_a_408(tiny_model):
    """serve --request_header_timeout: a connection whose request headers are not whole that many
    seconds after it opened (or after its last response, keep-alive) gets a 408 and is closed; one
    that finishes its headers in time is served, and so is the next request on the same connection."""
    server = start_server(tiny_model, "--request_header_timeout", "1.5", api_key=None)
    try:
        host, port = "127.0.0.1", server.port
        stalled = socket.create_connection((host, port), timeout=10)
        stalled.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: headers never end
        slow = socket.create_connection((host, port), timeout=10)
        slow.sendall(b"GET /health HTTP/1.1\r\n")
        time.sleep(0.7)
        slow.sendall(b"Host: x\r\n\r\n")  # whole within the limit
        t0 = time.monotonic()
        answer = _response(stalled)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert 0.5 < time.monotonic() - t0 < 5
        assert stalled.recv(4096) == b""  # closed
        reply = _response(slow)
        assert reply.startswith(b"HTTP/1.1 200"), reply
        stalled.close()
        slow.close()
        kept = socket.create_connection((host, port), timeout=10)
        for _ in range(2):  # the deadline restarts after each response of a keep-alive connection
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            time.sleep(0.9)
            kept.sendall(b"\r\n")
            assert _response(kept).startswith(b"HTTP/1.1 200")
        kept.close()
        piped = socket.create_connection((host, port), timeout=10)  # two pipelined requests, then nothing
        piped.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response(piped).startswith(b"HTTP/1.1 200") and _response(piped).startswith(b"HTTP/1.1 200")
        assert _response(piped).startswith(b"HTTP/1.1 408")  # idle past the limit after both answers
        piped.close()
        assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200
    finally:
        server.stop()


def test_a_body_that_stops_arriving_is_a_408(tiny_model):
    """serve --request_body_timeout: headers whole, then part of the body and nothing more for that
    long: a 408 in OpenAI's error shape, nothing reaches the engine; a body sent in pieces with
    shorter pauses is served."""
    server = start_server(tiny_model, "--request_body_timeout", "1", api_key=None)
    try:
        host, port = "127.0.0.1", server.port
        body = b'{"model": "%s", "prompt": "Hello", "max_tokens": 2}' % os.path.basename(tiny_model).encode()
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))
        stuck = socket.create_connection((host, port), timeout=10)
        stuck.sendall(head + body[:10])
        t0 = time.monotonic()
        answer = _response(stuck)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert 0.5 < time.monotonic() - t0 < 5
        assert b'"code":"request_timeout"' in answer and b"--request_body_timeout" in answer
        stuck.close()
        paced = socket.create_connection((host, port), timeout=30)
        paced.sendall(head)
        for i in range(0, len(body), 16):  # pauses shorter than the timeout: the limit is between reads
            time.sleep(0.4)
            paced.sendall(body[i:i + 16])
        assert _response(paced).startswith(b"HTTP/1.1 200")
        paced.close()
        m = server.metrics()
        assert m["meshserve_num_requests_running"] == 0 and m["meshserve_kv_cache_used_blocks"] == 0
    finally:
        server.stop()
