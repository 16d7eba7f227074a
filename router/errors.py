"""Request failures the router reports to clients, as a status name and a message that says what to fix.
The server maps the names to gRPC status codes; nothing below the server needs gRPC for this."""

from __future__ import annotations

INVALID_ARGUMENT = "INVALID_ARGUMENT"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
UNAVAILABLE = "UNAVAILABLE"
INTERNAL = "INTERNAL"


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message
