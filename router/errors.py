"""Request failures the router reports to clients, as a status name and a message that says what to fix.
The gRPC server maps the names to status codes and the HTTP front to HTTP statuses; nothing below the two fronts
needs gRPC or HTTP for this."""

from __future__ import annotations

from protos.codec import one_line

# Long enough for any message the router writes (a few worker errors joined); a traceback never gets this far.
MESSAGE_LIMIT = 2000

INVALID_ARGUMENT = "INVALID_ARGUMENT"
ALREADY_EXISTS = "ALREADY_EXISTS"
NOT_FOUND = "NOT_FOUND"
UNAUTHENTICATED = "UNAUTHENTICATED"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
UNAVAILABLE = "UNAVAILABLE"
FAILED_PRECONDITION = "FAILED_PRECONDITION"  # a worker's, never a client's: the pair is not wired (yet)
CANCELLED = "CANCELLED"  # the client went away (or its deadline passed) before the request finished
INTERNAL = "INTERNAL"


class RequestError(Exception):
    """`param` names the offending request field when there is one (the HTTP front reports it). The message is
    what the client reads, so it is one line: of a traceback that reached it only the exception's line is kept
    (the traceback itself belongs in the log)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        message = one_line(message, MESSAGE_LIMIT)
        super().__init__(message)
        self.code, self.message, self.param = code, message, param
        self.counted = False  # in the metrics already (whoever counts a failure sets this)
