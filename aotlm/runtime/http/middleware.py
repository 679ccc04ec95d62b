"""Pure ASGI guards in front of the API (not BaseHTTPMiddleware, so streaming and disconnect
detection pass through untouched): the API key, and the request body size limit."""

from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aotlm.runtime.http.api_errors import APIError

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})  # never behind the API key
# Request bodies past this answer 413 before they are parsed: JSON parsing and tokenizing run
# on the event loop, so a huge body would stall every other request.
MAX_REQUEST_BYTES = 16 * 1024 * 1024


class ApiKeyMiddleware:
    """`Authorization: Bearer KEY` on every path but OPEN_PATHS. Pure ASGI (not
    BaseHTTPMiddleware) so streaming and disconnect detection pass through untouched; it runs
    before body validation, so an unauthenticated client never learns about its body."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                error = APIError(401, "missing or wrong API key", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a request body over `limit` bytes: by its Content-Length before anything is
    read, or as a chunked body streams in past the limit."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is larger than {self.limit} bytes"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and (len(length) > 18 or int(length) > self.limit):
            await APIError(413, message, code="request_too_large").response()(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            received = await receive()
            if received["type"] == "http.request":
                seen += len(received.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, message)  # FastAPI passes it on while reading
            return received

        await self.app(scope, limited, send)
