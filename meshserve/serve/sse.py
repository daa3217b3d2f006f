"""Server-sent events: the response class of every streamed route."""
from __future__ import annotations

from fastapi.responses import StreamingResponse


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator, so a request whose client went away
    is aborted at once rather than when the generator is garbage-collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
