"""Request bodies read and parsed without stalling the event loop, which streams every other request's tokens.

A body is capped at MAX_BODY_BYTES while it is read (a chunked body has no Content-Length to check first): one
byte over and it is refused with 413. A large body is parsed on a worker thread, and not with the C JSON scanner
or pydantic's JSON mode: both hold the GIL for the whole document (tens of milliseconds per MiB of token ids), so
a thread would not let the loop run. The pure-Python scanner, made to pause every thousand values, hands the GIL
back to the loop as it goes; it is ~6x slower, which only the large request pays. Both paths accept and refuse the
same bodies (pydantic validates the parsed object in strict mode either way)."""

from __future__ import annotations

import asyncio
import json
import json.decoder
import json.scanner
import time
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from router.errors import INVALID_ARGUMENT, RequestError
from router.http.errors import PayloadTooLarge

M = TypeVar("M", bound=BaseModel)
MAX_BODY_BYTES = 8 << 20  # 8 MiB: a long context of token ids as JSON fits well within it
OFF_LOOP_BYTES = 256 << 10  # smaller bodies parse in ~5 ms on the loop: a thread hand-off would cost more
PAUSE_EVERY, PAUSE_S = 1024, 0.0002  # the off-loop parser sleeps this long every this many values (~0.6 ms)


def too_large(size: int | None) -> PayloadTooLarge:
    """`size`: the Content-Length, or None for a body found too large while it was read."""
    got = f"is {size} bytes" if size is not None else f"is over {MAX_BODY_BYTES} bytes"
    return PayloadTooLarge(f"the request body {got}; at most {MAX_BODY_BYTES} bytes ({MAX_BODY_BYTES >> 20} MiB) "
                           "are accepted: send a shorter prompt, or fewer prompts per request")


async def read_body(request: Request) -> bytes:
    """The whole body, counted as it arrives; PayloadTooLarge once it passes MAX_BODY_BYTES."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise too_large(int(size))  # refused before a byte of it is read
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_BODY_BYTES:
            raise too_large(None)
        chunks.append(chunk)
    return b"".join(chunks)


def _pausing_decoder() -> json.JSONDecoder:
    """A pure-Python JSON decoder that sleeps briefly every PAUSE_EVERY values. A thread that only waits for the
    switch interval to hand the GIL over makes the loop wait up to 5 ms each time it comes back from I/O, which it
    does many times per streamed token; sleeping hands the GIL over at once, so the loop waits ~0.5 ms at most."""
    countdown = [PAUSE_EVERY]

    def pausing(scan_once: Any) -> Any:
        def scan(s: str, i: int) -> Any:
            countdown[0] -= 1
            if not countdown[0]:
                countdown[0] = PAUSE_EVERY
                time.sleep(PAUSE_S)
            return scan_once(s, i)

        return scan

    decoder = json.JSONDecoder()
    decoder.parse_string = json.decoder.py_scanstring  # type: ignore[attr-defined]
    decoder.parse_array = lambda s_and_end, scan_once: json.decoder.JSONArray(  # type: ignore[attr-defined]
        s_and_end, pausing(scan_once))
    decoder.parse_object = lambda s_and_end, strict, scan_once, *hooks: json.decoder.JSONObject(  # type: ignore
        s_and_end, strict, pausing(scan_once), *hooks)
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
    return decoder


def _decode_in_python(body: bytes) -> Any:
    """JSON with the pausing pure-Python scanner (a fresh decoder each time: its state is not thread-safe)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(INVALID_ARGUMENT, f"the request body is not valid JSON: it is not UTF-8 ({e})") from None
    try:
        return _pausing_decoder().decode(text)
    except json.JSONDecodeError as e:
        raise RequestError(INVALID_ARGUMENT, f"the request body is not valid JSON: {e}") from None


async def parse_body(body: bytes, model: type[M]) -> M:
    """`body` as `model`; pydantic's ValidationError for a body of the wrong shape, RequestError for one that is
    not JSON."""
    if len(body) <= OFF_LOOP_BYTES:
        return model.model_validate_json(body)

    def parse() -> M:
        return model.model_validate(_decode_in_python(body))

    return await asyncio.to_thread(parse)
