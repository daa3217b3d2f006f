"""The API server's OpenAPI document with its request bodies.

The routes read the raw body and validate it with protocol.py's models themselves (so errors keep
OpenAI's shape), which hides the bodies from FastAPI. `ROUTE_BODIES` is each route's `openapi_extra`
(a requestBody referring to its model), `with_request_bodies(app)` adds the models' schemas (and
the ones they use, their `$defs` moved there) to the app's components. The server does not serve
the document (openapi_url is None); tests/serve/test_fuzz.py fuzzes the server from
openai_server.openapi_document() (docs/fuzzing.md).
"""
from __future__ import annotations

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from meshserve.serve.protocol import ChatCompletionRequest, CompletionRequest
from meshserve.serve.responses_api import ResponsesRequest
from meshserve.serve.tokens_api import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest

_MODELS = {"/v1/completions": (CompletionRequest,), "/v1/chat/completions": (ChatCompletionRequest,),
           "/tokenize": (TokenizeCompletionRequest, TokenizeChatRequest), "/detokenize": (DetokenizeRequest,),
           "/v1/responses": (ResponsesRequest,)}
_refs, _doc = models_json_schema([(m, "validation") for ms in _MODELS.values() for m in ms],
                                 ref_template="#/components/schemas/{model}")


def _schema(models: tuple) -> dict:
    refs = [_refs[(m, "validation")] for m in models]
    return refs[0] if len(refs) == 1 else {"anyOf": refs}  # /tokenize: a prompt, or chat messages


ROUTE_BODIES = {path: {"requestBody": {"required": True, "content": {"application/json": {
    "schema": _schema(ms)}}}} for path, ms in _MODELS.items()}
_BODY_SCHEMAS = _doc.get("$defs", {})


def with_request_bodies(app: FastAPI) -> FastAPI:
    """`app`, its OpenAPI document holding the schemas ROUTE_BODIES refer to."""
    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            default_openapi().setdefault("components", {}).setdefault("schemas", {}).update(_BODY_SCHEMAS)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app

