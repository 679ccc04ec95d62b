"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

What the engine and the protocol raise maps to an HTTP status here (`as_api_error`), and
pydantic's validation errors become one readable 400 message (`validation_message`), so OpenAI
clients raise their usual exceptions and never see FastAPI's 422.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from aotlm.errors import RequestError
from aotlm.runtime.generation.scheduler import QueueFullError
from aotlm.runtime.worker import EngineUnavailableError, RequestFailedError

log = logging.getLogger(__name__)

_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


class ParamError(RequestError):
    """A bad request parameter; `param` goes into the OpenAI error's `param` field."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


class APIError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers

    @property
    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        kind = "service_unavailable" if self.status == 503 else kind
        return {
            "error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}
        }

    def response(self) -> JSONResponse:
        return _AsciiJSONResponse(self.body, status_code=self.status, headers=self.headers)


class _AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message that quotes client input (a model name)
    may hold a lone surrogate from a `\\ud800` escape, which UTF-8 cannot encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def as_api_error(e: BaseException) -> APIError:
    """Map what the engine and the protocol raise to HTTP statuses."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError | EngineUnavailableError):
        return APIError(503, str(e), code="unavailable", headers={"Retry-After": "1"})
    if isinstance(e, RequestError):
        return APIError(400, str(e), param=getattr(e, "param", None))
    if isinstance(e, RequestFailedError):
        return APIError(500, str(e))
    # A bug: the details go to the log, not to the client.
    log.error("unexpected error while answering a request", exc_info=e)
    return APIError(500, f"internal error ({type(e).__name__}); the server log has the details")


def validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    """pydantic's errors as one line per field; a union's alternatives collapse into one."""
    by_field: dict[str, list[str]] = {}
    for err in e.errors():
        if err.get("type") == "json_invalid":  # its loc is a character offset, not a field
            why = (err.get("ctx") or {}).get("error", "cannot parse it")
            return f"the body is not valid JSON: {why}", None
        path = []
        for part in (
            err.get("loc", ())[1:] if err.get("loc", ())[:1] == ("body",) else err.get("loc", ())
        ):
            if isinstance(part, str) and ("[" in part or part in _TYPE_TAGS):
                break  # a union member's tag, not a field
            path.append(str(part))
        msgs = by_field.setdefault(".".join(path) or "body", [])
        if err.get("msg") not in msgs:
            msgs.append(str(err.get("msg")))
    message = "; ".join(f"{f}: {' or '.join(m)}" for f, m in by_field.items())
    return message or "invalid request", next(iter(by_field), None)
