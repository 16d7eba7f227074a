"""Failures as OpenAI reports them: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP
status, from the router's status names (router.errors)."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse

from router.errors import INVALID_ARGUMENT, RequestError

# status name -> (HTTP status, OpenAI error type, OpenAI error code)
STATUSES: dict[str, tuple[int, str, str | None]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error", None),
    "UNAUTHENTICATED": (401, "invalid_request_error", "invalid_api_key"),
    "NOT_FOUND": (404, "invalid_request_error", None),  # an unknown route, as OpenAI answers one
    "ALREADY_EXISTS": (409, "invalid_request_error", None),
    "RESOURCE_EXHAUSTED": (429, "requests", "rate_limit_exceeded"),
    "CANCELLED": (499, "invalid_request_error", None),
    "INTERNAL": (500, "server_error", None),
    "UNAVAILABLE": (503, "server_error", None),
}


class PayloadTooLarge(RequestError):
    """A request body over the size limit: HTTP 413 (no gRPC status is this; counted as INVALID_ARGUMENT)."""

    def __init__(self, message: str) -> None:
        super().__init__(INVALID_ARGUMENT, message)


def error_body(e: RequestError) -> dict:
    _, kind, code = STATUSES.get(e.code, STATUSES["INTERNAL"])
    if e.code == "NOT_FOUND" and e.param == "model":  # the code names the cause: here an unknown model
        code = "model_not_found"
    return {"error": {"message": e.message, "type": kind, "param": e.param, "code": code}}


def error_response(e: RequestError) -> JSONResponse:
    status = 413 if isinstance(e, PayloadTooLarge) else STATUSES.get(e.code, STATUSES["INTERNAL"])[0]
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(e), status_code=status, headers=headers)


def error_event(e: RequestError) -> str:
    """A failure after a stream began (its 200 is sent): one SSE event carrying the error, as vLLM sends."""
    return f"data: {json.dumps(error_body(e))}\n\n"
