"""The orchestrator's routes that are not a request's two hops: /v1/models (the union of its healthy
servers' lists, generation servers first), /v1/models/{name} (OpenAI's models.retrieve: one card of
that union), vLLM's /tokenize and /detokenize (one healthy server's answer: every server holds the
same tokenizer) and /reset_prefix_cache (every healthy server's, SGLang's router /flush_cache)."""
from __future__ import annotations

import asyncio

import httpx
import msgspec
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from meshserve.disagg.relay import _passthrough, describe
from meshserve.disagg.router import Server
from meshserve.serve.protocol import APIError


def _client_auth(raw: Request) -> dict:
    """The client's key, which the servers check (serve --api_key)."""
    return {"Authorization": raw.headers["authorization"]} if "authorization" in raw.headers else {}


async def ask_all(orch, servers: list[Server], method: str, path: str, headers: dict,
                  timeout: float) -> list:
    """Each server's answer to `method path` at once: an httpx.Response, or the transport error."""
    async def ask(s: Server):
        try:
            return await orch.client.request(method, s.url + path, headers=headers, timeout=timeout)
        except httpx.HTTPError as e:
            return e

    return list(await asyncio.gather(*(ask(s) for s in servers)))


async def list_models(orch, raw: Request) -> Response:
    """The union of the healthy servers' /v1/models (generation servers first)."""
    headers = _client_auth(raw)
    servers = [s for s in orch.generation + orch.context if s.healthy]
    if not servers:
        raise APIError(503, "no server is available to list the models", "server_error", None,
                       "no_healthy_server")

    answers = await ask_all(orch, servers, "GET", "/v1/models", headers, 10.0)
    data, seen, errors = [], set(), []
    for s, a in zip(servers, answers):
        if isinstance(a, httpx.Response) and a.status_code == 200:
            try:
                listed = [m for m in a.json().get("data", []) if isinstance(m, dict)]
            except (ValueError, AttributeError):
                errors.append(f"{s.address}: /v1/models answered something else than a list of models")
                continue
            for m in listed:
                if m.get("id") not in seen:
                    seen.add(m.get("id"))
                    data.append(m)
        elif isinstance(a, httpx.Response) and a.status_code < 500 and not data:
            return _passthrough(a)  # e.g. 401 without the servers' key
        else:
            errors.append(f"{s.address}: {describe(a) if isinstance(a, Exception) else a.status_code}")
    if not data:
        raise APIError(503, "no server listed its models (" + "; ".join(errors) + ")", "server_error", None,
                       "no_healthy_server")
    return JSONResponse({"object": "list", "data": data})


async def model_card_of(orch, raw: Request, model: str):
    listed = await list_models(orch, raw)
    if listed.status_code != 200:
        return listed  # the servers' own answer (a 401 without their key)
    cards = msgspec.json.decode(listed.body)["data"]
    card = next((m for m in cards if m.get("id") == model), None)
    if card is None:
        names = ", ".join(f"`{m.get('id')}`" for m in cards)
        raise APIError(404, f"The model `{model}` does not exist; the servers serve {names}.", "invalid_request_error",
                       "model", "model_not_found")
    return card


async def forward_to_one(orch, raw: Request, path: str) -> Response:
    """The body to one healthy server (generation servers first; the next one on a transport error or a
    5xx), its answer as it came: vLLM's /tokenize and /detokenize, whose answer is the tokenizer's."""
    body = await orch._read_body(raw)
    headers = {**_client_auth(raw), "Content-Type": "application/json"}
    servers = [s for s in orch.generation + orch.context if s.healthy]
    errors = []
    for s in servers:
        try:
            r = await orch.client.post(s.url + path, content=body, headers=headers, timeout=30.0)
        except httpx.HTTPError as e:
            errors.append(f"{s.address}: {describe(e)}")
            continue
        if r.status_code < 500:
            return _passthrough(r)
        errors.append(f"{s.address}: answered {r.status_code}")
    raise APIError(503, f"no server answered {path}" + (f" ({'; '.join(errors)})" if errors else
                                                        ": none is healthy"), "server_error", None,
                   "no_healthy_server")


async def reset_prefix_cache(orch, raw: Request) -> Response:
    """vLLM's POST /reset_prefix_cache on every healthy server at once: 200 {"success": true, "reset":
    [addresses], "skipped_unhealthy": [addresses]} when each reset its cache; a 409 naming the servers
    whose requests still hold KV blocks (the others did reset theirs: later prompts there are computed
    from scratch), a 503 naming those that failed or could not be reached."""
    headers = _client_auth(raw)
    servers = [s for s in orch.context + orch.generation if s.healthy]
    skipped = [s.address for s in orch.context + orch.generation if not s.healthy]
    if not servers:
        raise APIError(503, "no server is healthy: no prefix cache was reset", "server_error", None,
                       "no_healthy_server")

    answers = await ask_all(orch, servers, "POST", "/reset_prefix_cache", headers, 30.0)
    reset, busy, failed = [], [], []
    for s, a in zip(servers, answers):
        if isinstance(a, httpx.Response) and a.status_code == 200:
            reset.append(s.address)
        elif isinstance(a, httpx.Response) and a.status_code in (401, 403) and not reset:
            return _passthrough(a)  # without the servers' key
        elif isinstance(a, httpx.Response) and a.status_code == 409:
            busy.append(s.address)
        else:
            failed.append(f"{s.address}: {describe(a) if isinstance(a, Exception) else f'answered {a.status_code}'}")
    done = f"; reset on {', '.join(reset)}" if reset else ""
    if failed:
        raise APIError(503, f"the prefix cache reset failed on {'; '.join(failed)}"
                       + (f"; not reset on {', '.join(busy)} (requests hold KV blocks)" if busy else "") + done,
                       "server_error", None, "reset_failed")
    if busy:
        raise APIError(409, f"the prefix cache was not reset on {', '.join(busy)}: requests hold KV blocks there "
                       f"(running, pinned for a KV transfer or pulling one); retry when they have finished" + done,
                       "conflict_error")
    return JSONResponse({"success": True, "reset": reset, "skipped_unhealthy": skipped})
