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
