"""asyncio client: `await AsyncClient(target).generate(...)`, `async for chunk in client.stream(...)`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from client import convert
from client.errors import KvrelayError
from client.sync_client import CHANNEL_OPTIONS
from client.types import Chunk, Completion, Final, ModelInfo


class AsyncStream:
    """Like `Stream`, for `async for`. `await cancel()` (or leaving an `async with` early) cancels the call."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.final: Final | None = None

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        try:
            async for msg in self._call:
                item = convert.response(msg)
                if isinstance(item, Final):
                    self.final = item
                else:
                    yield item
        except grpc.RpcError as e:
            raise KvrelayError.from_rpc(e) from None

    async def cancel(self) -> None:
        self._call.cancel()

    close = cancel

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.final is None:
            await self.cancel()


class AsyncClient:
    """Keywords as `Client`'s."""

    def __init__(self, target: str = "localhost:50051", *, timeout: float | None = None, api_key: str | None = None,
                 tls: bool = False, ca_cert: str | None = None) -> None:
        self.target, self.timeout = target, timeout
        creds = convert.credentials(tls, ca_cert)
        self._channel = grpc.aio.secure_channel(target, creds, options=CHANNEL_OPTIONS) if creds is not None else \
            grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = convert.Stub(self._channel)
        self._metadata = convert.metadata(api_key)

    def stream(self, prompt: str | list[int], *, request_id: str | None = None, timeout: float | None = None,
               **sampling: Any) -> AsyncStream:
        req = convert.generate_request(prompt, request_id, sampling)
        return AsyncStream(self._stub.Generate(req, timeout=timeout if timeout is not None else self.timeout,
                                               metadata=self._metadata))

    async def generate(self, prompt: str | list[int], *, request_id: str | None = None,
                       timeout: float | None = None, **sampling: Any) -> Completion:
        s = self.stream(prompt, request_id=request_id, timeout=timeout, **sampling)
        chunks = [c async for c in s]
        if s.final is None:
            raise KvrelayError("UNKNOWN", "the stream ended without its final message")
        return Completion.from_stream(chunks, s.final)

    async def model_info(self, timeout: float | None = None) -> ModelInfo:
        try:
            msg = await self._stub.GetModelInfo(convert.model_info_request(), metadata=self._metadata,
                                                timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as e:
            raise KvrelayError.from_rpc(e) from None
        return convert.model_info(msg)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
