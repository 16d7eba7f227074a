"""One HTTP request's life, shared by /v1/completions and /v1/chat/completions: admit every choice through the
intake, run them (choices.Fanout), and answer whole or as server-sent events. Until a stream's first byte is
sent, a client that disconnects is noticed by watching its connection; once streaming, Starlette cancels the
stream when the client goes. Either way every choice is cancelled and its blocks freed."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from router.client_stream import Chunk, Final
from router.errors import RequestError
from router.http import sse
from router.http.choices import Fanout
from router.http.errors import error_event, error_response
from router.http.formats import Format, UsageTally
from router.http.frontend import Frontend
from router.http.params import openai_param, sampling
from router.http.schemas import ChatCompletionRequest, CompletionRequest
from router.intake import Intake
from router.requests import RequestSpec

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection"; nobody reads it


class ClientGone(Exception):
    pass


class ClosingStreamingResponse(StreamingResponse):
    """A stream that runs `on_close` however it ends. Starlette may cancel a stream before its body iterator
    ever starts (the client's disconnect is seen first), and then the iterator's own `finally` never runs: the
    choices would run to completion with nobody reading them."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone (with `work` cancelled) if the client disconnects first. The body has
    been read, so the next ASGI message can only be the disconnect."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    job, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        job.cancel()
        raise
    finally:
        watch.cancel()
    if job in done:
        return job.result()
    job.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await job
    raise ClientGone


async def admit_choices(intake: Intake, prompts: list[str | list[int]], n: int, sampling_of: Any,
                        chat: bool) -> list[RequestSpec]:
    """Admit n choices per prompt (`sampling_of(prompt_index, choice_index)` gives each its sampling). Text is
    tokenized once per prompt. On any refusal the choices already admitted are released."""
    specs: list[RequestSpec] = []
    base = uuid.uuid4().hex[:16]
    try:
        for p, prompt in enumerate(prompts):
            for j in range(n):
                given = prompt if j == 0 else specs[-1].prompt_ids  # the tokens of this prompt's first choice
                specs.append(await intake.admit(given, sampling_of(p, j), f"http-{base}-{len(specs)}"))
    except RequestError as e:
        for s in specs:
            intake.release(s)
        e.param = openai_param(e.param, chat)
        raise
    return specs


async def answer(front: Frontend, request: Request, req: CompletionRequest | ChatCompletionRequest,
                 prompts: list[str | list[int]], max_tokens: int,
                 make_format: Callable[[list[int]], Format]) -> Response:
    """The end both routes share: admit n choices of each prompt, then respond. `make_format(context)` gets each
    choice's last prompt token (logprob texts are decoded after it)."""
    chat = isinstance(req, ChatCompletionRequest)
    specs = await admit_choices(front.intake, prompts, req.n, lambda p, j: sampling(req, max_tokens, j), chat=chat)
    fmt = make_format([s.prompt_ids[-1] for s in specs])
    return await respond(request, front.intake, specs, fmt, front.model_name, req.n, req.stream,
                         bool(req.stream_options and req.stream_options.include_usage))


async def respond(request: Request, intake: Intake, specs: list[RequestSpec], fmt: Format, model: str, n: int,
                  stream: bool, include_usage: bool) -> Response:
    fan = Fanout(intake, specs)
    head = {"id": f"{fmt.id_prefix}{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
    try:
        await until_disconnect(request, fan.prime())
        if stream:
            return ClosingStreamingResponse(_events(fan, fmt, head, n, len(specs), include_usage), fan.aclose)
        return JSONResponse(await until_disconnect(request, _whole(fan, fmt, head, n)))
    except RequestError as e:
        await fan.aclose()
        return error_response(e)
    except ClientGone:  # the orchestrator counted each cancelled choice
        await fan.aclose()
        return Response(status_code=CLIENT_CLOSED)
    except BaseException:
        await fan.aclose()
        raise


async def _whole(fan: Fanout, fmt: Format, head: dict[str, Any], n: int) -> dict[str, Any]:
    try:
        chunks: dict[int, list[Chunk]] = {}
        finals: dict[int, Final] = {}
        async for index, item in fan.items():
            if isinstance(item, Final):
                finals[index] = item
            else:
                chunks.setdefault(index, []).append(item)
    finally:
        await fan.aclose()
    usage = UsageTally(n)
    for index in sorted(finals):
        usage.add(index, finals[index])
    return {**head, "object": fmt.object,
            "choices": [fmt.whole(i, chunks.get(i, []), finals[i]) for i in sorted(finals)],
            "usage": usage.json()}


async def _events(fan: Fanout, fmt: Format, head: dict[str, Any], n: int, num_choices: int,
                  include_usage: bool) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}

    def chunk(choice: dict[str, Any]) -> str:
        return sse.event({**head, "object": fmt.chunk_object, "choices": [choice], **extra})

    usage = UsageTally(n)
    try:
        for i in range(num_choices):
            if (opening := fmt.start(i)) is not None:
                yield chunk(opening)
        async for index, item in fan.items():
            if isinstance(item, Final):
                usage.add(index, item)
                yield chunk(fmt.end(index, item))
            elif (choice := fmt.delta(index, item)) is not None:
                yield chunk(choice)
        if include_usage:
            yield sse.event({**head, "object": fmt.chunk_object, "choices": [], "usage": usage.json()})
    except RequestError as e:  # after the 200 went out: the error travels in the stream
        yield error_event(e)
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await fan.aclose()
    yield sse.DONE
