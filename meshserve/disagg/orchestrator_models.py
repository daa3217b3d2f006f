"""The orchestrator's /v1/models (the union of its healthy servers' lists, generation servers first)
and /v1/models/{name} (OpenAI's models.retrieve: one card of that union)."""
from __future__ import annotations

import asyncio

import httpx
import msgspec
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from meshserve.disagg.relay import _passthrough, describe
from meshserve.disagg.router import Server
from meshserve.serve.protocol import APIError


async def list_models(orch, raw: Request) -> Response:
    """The union of the healthy servers' /v1/models (generation servers first)."""
    headers = {"Authorization": raw.headers["authorization"]} if "authorization" in raw.headers else {}
    servers = [s for s in orch.generation + orch.context if s.healthy]
    if not servers:
        raise APIError(503, "no server is available to list the models", "server_error", None,
                       "no_healthy_server")

    async def ask(s: Server):
        try:
            return await orch.client.get(s.url + "/v1/models", headers=headers, timeout=10.0)
        except httpx.HTTPError as e:
            return e

    answers = await asyncio.gather(*(ask(s) for s in servers))
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
