"""The client a run sends through, by `--backend`: the gRPC SDK's `AsyncClient`, or the OpenAI-compatible stand-in.
Opened by the command and by each worker process of a `--processes` run alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from bench.load.config import BenchConfig

MODEL_INFO_TIMEOUT_S = 30.0  # a deployment that cannot describe itself in this long is not ready to measure


@asynccontextmanager
async def open_client(cfg: BenchConfig) -> AsyncIterator[Any]:
    """A connected client with `stream` and `model_info`, closed on exit."""
    if cfg.backend == "openai":
        from bench.load.openai_backend import OpenAIClient

        assert cfg.base_url is not None
        async with OpenAIClient(cfg.base_url, cfg.model, cfg.api_key, cfg.workload.tokenizer) as oai:
            yield oai
    else:
        from client import AsyncClient  # the SDK pulls in grpc: imported only when a run really starts

        async with AsyncClient(cfg.target, api_key=cfg.api_key) as client:
            yield client
