"""One exception for every failed call, carrying the gRPC status name and the server's message."""

from __future__ import annotations

import grpc


class KvrelayError(Exception):
    """A call failed. `code` is the gRPC status name (e.g. "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED",
    "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"); `details` is the server's message saying what to fix."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> KvrelayError:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = e.details() if hasattr(e, "details") else str(e)
        return cls(code.name if code is not None else "UNKNOWN", details or "")
