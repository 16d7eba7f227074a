"""Blocking client: `Client(target).generate(...)` for a whole completion, `.stream(...)` for chunks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from client import convert
from client.errors import KvrelayError
from client.types import Chunk, Completion, Final, ModelInfo

# Streams of long completions can outgrow gRPC's 4 MiB default only with huge logprob lists; allow more.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class Stream:
    """The chunks of one completion as they are decoded. `final` is set once the iterator is exhausted;
    `cancel()` (or leaving a `with` block early) cancels the call and the server frees the request."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.final: Final | None = None

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for msg in self._call:
                item = convert.response(msg)
                if isinstance(item, Final):
                    self.final = item
                else:
                    yield item
        except grpc.RpcError as e:
            raise KvrelayError.from_rpc(e) from None

    def cancel(self) -> None:
        self._call.cancel()

    close = cancel

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.final is None:
            self.cancel()


class Client:
    """`api_key`: sent as `authorization: Bearer KEY` metadata. `tls=True` (or a `ca_cert` PEM file to trust)
    connects over TLS."""

    def __init__(self, target: str = "localhost:50051", *, timeout: float | None = None, api_key: str | None = None,
                 tls: bool = False, ca_cert: str | None = None) -> None:
        self.target, self.timeout = target, timeout
        creds = convert.credentials(tls, ca_cert)
        self._channel = grpc.secure_channel(target, creds, options=CHANNEL_OPTIONS) if creds is not None else \
            grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = convert.Stub(self._channel)
        self._metadata = convert.metadata(api_key)

    def stream(self, prompt: str | list[int], *, request_id: str | None = None, timeout: float | None = None,
               **sampling: Any) -> Stream:
        req = convert.generate_request(prompt, request_id, sampling)
        return Stream(self._stub.Generate(req, timeout=timeout if timeout is not None else self.timeout,
                                          metadata=self._metadata))

    def generate(self, prompt: str | list[int], *, request_id: str | None = None, timeout: float | None = None,
                 **sampling: Any) -> Completion:
        s = self.stream(prompt, request_id=request_id, timeout=timeout, **sampling)
        chunks = list(s)
        if s.final is None:
            raise KvrelayError("UNKNOWN", "the stream ended without its final message")
        return Completion.from_stream(chunks, s.final)

    def model_info(self, timeout: float | None = None) -> ModelInfo:
        try:
            msg = self._stub.GetModelInfo(convert.model_info_request(), metadata=self._metadata,
                                          timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as e:
            raise KvrelayError.from_rpc(e) from None
        return convert.model_info(msg)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
