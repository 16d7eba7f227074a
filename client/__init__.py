"""kvrelay's gRPC client SDK (sync and asyncio). Imports no torch: `pip install kvrelay` users on a laptop only
need grpcio and protobuf. The API is in `client/API.md`."""

from client.async_client import AsyncClient, AsyncStream
from client.errors import KvrelayError
from client.sync_client import Client, Stream
from client.types import Chunk, Completion, Final, ModelInfo, Timings, TokenLogprob, Usage

__all__ = ["AsyncClient", "AsyncStream", "Chunk", "Client", "Completion", "Final", "KvrelayError", "ModelInfo",
           "Stream", "Timings", "TokenLogprob", "Usage"]
