"""A stub OpenAI-compatible server with known timing, for the `bench serve` tests.

Streams the first token FIRST_TOKEN_S after a request arrives, then one token every GAP_S, as
many tokens as max_tokens asks. A prompt containing FAIL gets HTTP 500. GET /stub/received lists
the request bodies. With --omit-usage it never sends usage, even when asked (a non-conforming
server). Run: python stub_openai_server.py [--omit-usage]  (prints the port it listens on).
"""
import asyncio
import json
import socket
import sys

FIRST_TOKEN_S = 0.5  # long next to the few ms a loaded CI machine adds to each HTTP round trip
GAP_S = 0.05


def make_app(omit_usage: bool = False):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()
    received: list = []

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}

    @app.get("/stub/received")
    async def stub_received():
        return received

    @app.delete("/stub/received")
    async def stub_clear():
        received.clear()
        return {}

    async def stream(body: dict, chat: bool, arrival: float):
        loop = asyncio.get_running_loop()
        n = body["max_tokens"]
        for i in range(n):
            # Absolute deadlines, so a late wake-up does not push every later token back.
            await asyncio.sleep(max(0.0, arrival + FIRST_TOKEN_S + i * GAP_S - loop.time()))
            piece = f" tok{i}"
            choice = ({"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat
                      else {"index": 0, "text": piece, "finish_reason": None})
            yield f"data: {json.dumps({'id': 'x', 'choices': [choice]})}\n\n"
        if (body.get("stream_options") or {}).get("include_usage") and not omit_usage:
            usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}
            yield f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    async def handle(request: Request, chat: bool):
        arrival = asyncio.get_running_loop().time()
        body = await request.json()
        received.append(body)
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if "FAIL" in prompt:
            return JSONResponse({"error": {"message": "asked to fail"}}, status_code=500)
        return StreamingResponse(stream(body, chat, arrival), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


def main() -> None:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    config = uvicorn.Config(make_app(omit_usage="--omit-usage" in sys.argv[1:]), log_level="warning",
                            access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
