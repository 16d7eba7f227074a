"""`kvrelay bench --backend openai`: the same workloads and records against any OpenAI-compatible server
(kvrelay's HTTP front, vLLM, SGLang, TGI...), through /v1/completions streamed as server-sent events.

A stand-in for the gRPC `AsyncClient`: `stream(prompt, max_tokens=..., **sampling)` and `model_info()`.
Token-id prompts are sent as lists of ids (vLLM and kvrelay take them). An SSE event only carries text, so each
text-carrying event counts as one token arrival; the server's final usage (`stream_options.include_usage`) says
how many tokens came, and `measure_request` gives the last event the remainder (a server that sends several
tokens per event, as kvrelay does when a decode step outruns the client, is counted exactly in total).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

# HTTP statuses as the gRPC status names the kvrelay backend reports, so errors read the same in both.
STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                408: "DEADLINE_EXCEEDED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
                504: "DEADLINE_EXCEEDED"}
# An error event inside a stream (its 200 already sent) says what failed by OpenAI's string `code` (OpenAI,
# kvrelay), by an integer HTTP status in `code` (vLLM), or only by its `type`.
CODE_NAMES = {"rate_limit_exceeded": "RESOURCE_EXHAUSTED", "insufficient_quota": "RESOURCE_EXHAUSTED",
              "invalid_api_key": "UNAUTHENTICATED", "model_not_found": "NOT_FOUND",
              "context_length_exceeded": "INVALID_ARGUMENT"}
TYPE_NAMES = {"invalid_request_error": "INVALID_ARGUMENT", "authentication_error": "UNAUTHENTICATED",
              "permission_error": "PERMISSION_DENIED", "not_found_error": "NOT_FOUND",
              "requests": "RESOURCE_EXHAUSTED", "rate_limit_error": "RESOURCE_EXHAUSTED", "server_error": "INTERNAL",
              "BadRequestError": "INVALID_ARGUMENT", "NotFoundError": "NOT_FOUND", "InternalServerError": "INTERNAL"}


def error_name(error: dict[str, Any]) -> str:
    """The status name of a stream's error event."""
    code = error.get("code")
    if isinstance(code, int) or (isinstance(code, str) and code.isdigit()):
        return STATUS_NAMES.get(int(code), f"HTTP_{code}")
    if isinstance(code, str) and code in CODE_NAMES:
        return CODE_NAMES[code]
    return TYPE_NAMES.get(str(error.get("type")), "SERVER_ERROR")


class OpenAIError(Exception):
    """A failed request: `code` is a status name (as the kvrelay backend's), `details` the server's message."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details

    @classmethod
    def from_body(cls, status: int, body: bytes | str) -> OpenAIError:
        try:
            message = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = body.decode(errors="replace") if isinstance(body, bytes) else body
        return cls(STATUS_NAMES.get(status, f"HTTP_{status}"), str(message)[:500])


@dataclass
class TextChunk:
    text: str
    num_tokens: int = 1


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


@dataclass
class Final:
    request_id: str
    finish_reason: str
    usage: Usage
    timings: None = None  # an OpenAI server reports no server-side timings


@dataclass
class ModelCard:
    model: str
    vocab_size: int
    max_model_len: int
    has_tokenizer: bool = True


class OpenAIStream:
    """One streamed completion; `final` is set once the stream ended with its usage. `timeout` bounds the whole
    request (httpx's own timeout bounds each read, which a trickling stream never trips)."""

    def __init__(self, http: httpx.AsyncClient, body: dict[str, Any], timeout: float | None) -> None:
        self._http, self._body, self._timeout = http, body, timeout
        self._response: httpx.Response | None = None
        self.final: Final | None = None

    async def __aiter__(self) -> AsyncIterator[TextChunk]:
        loop = asyncio.get_running_loop()
        deadline = None if self._timeout is None else loop.time() + self._timeout
        try:
            async with contextlib.aclosing(self._events(deadline)) as events:  # closing it closes the response
                async for chunk in events:
                    yield chunk
        except TimeoutError:
            raise OpenAIError("DEADLINE_EXCEEDED", f"the request took more than {self._timeout} s") from None

    async def _events(self, deadline: float | None) -> AsyncIterator[TextChunk]:
        # The deadline applies only while this awaits the server, never while the caller holds a chunk.
        rid, reason, usage = "", "", None
        async with asyncio.timeout_at(deadline):
            r = await self._http.send(self._http.build_request("POST", "completions", json=self._body,
                                                               timeout=self._timeout), stream=True)
        self._response = r
        try:
            if r.status_code != 200:
                async with asyncio.timeout_at(deadline):
                    body = await r.aread()
                raise OpenAIError.from_body(r.status_code, body)
            lines = r.aiter_lines()
            while True:
                async with asyncio.timeout_at(deadline):
                    line = await anext(lines, None)
                if line is None:
                    break
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise OpenAIError(error_name(event["error"]), str(event["error"].get("message")))
                rid = event.get("id", rid)
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        yield TextChunk(choice["text"])
                    reason = choice.get("finish_reason") or reason
        finally:
            await r.aclose()
        if usage is not None:
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            self.final = Final(rid, reason, Usage(usage["prompt_tokens"], usage["completion_tokens"], cached))

    async def cancel(self) -> None:
        """Close the connection: the server aborts the request."""
        if self._response is not None:
            await self._response.aclose()


class OpenAIClient:
    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 tokenizer: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/") + "/", headers=headers,
                                       limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        self.model, self.tokenizer = model, tokenizer

    def stream(self, prompt: str | list[int], *, timeout: float | None = None, max_tokens: int,
               **sampling: Any) -> OpenAIStream:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, **{k: v for k, v in sampling.items() if v is not None}}
        return OpenAIStream(self._http, body, timeout)

    async def model_info(self, timeout: float | None = None) -> ModelCard:
        """The served model from GET /models (the first, unless a model was named). vLLM and kvrelay give its
        max_model_len; the vocabulary size comes from kvrelay's card or the --tokenizer given."""
        r = await self._http.get("models", timeout=timeout)
        if r.status_code != 200:
            raise OpenAIError.from_body(r.status_code, r.content)
        cards = r.json().get("data") or []
        card = next((c for c in cards if c.get("id") == self.model), None) if self.model else \
            (cards[0] if cards else None)
        if card is None:
            raise OpenAIError("NOT_FOUND", f"the server lists no model {self.model or ''!r}: it has "
                              f"{[c.get('id') for c in cards]}")
        self.model = card["id"]
        vocab = card.get("vocab_size") or (_vocab_size(self.tokenizer) if self.tokenizer else None)
        if not vocab or not card.get("max_model_len"):
            raise OpenAIError("FAILED_PRECONDITION", f"model {self.model!r}: the server's model card lacks "
                              "vocab_size or max_model_len: give --tokenizer PATH (the model's tokenizer.json) and "
                              "use a server that reports max_model_len (vLLM, kvrelay)")
        return ModelCard(self.model, int(vocab), int(card["max_model_len"]))

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> OpenAIClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _vocab_size(path: str) -> int:
    from tokenizers import Tokenizer

    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
