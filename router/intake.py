"""The one path every public request takes into the orchestrator, whichever front (gRPC or HTTP) it came by:
validate and tokenize (off the event loop), refuse a request id already live, run it, and turn whatever goes
wrong into a `RequestError` whose status and message the front reports. Both fronts call `admit` then `run`."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from engine.tokenizer import Tokenizer
from router.client_stream import Chunk, Final
from router.errors import ALREADY_EXISTS, CANCELLED, INTERNAL, INVALID_ARGUMENT, RequestError
from router.metrics import RouterMetrics
from router.orchestrator import Orchestrator
from router.requests import FieldError, ModelLimits, RequestSpec, validate

log = logging.getLogger("kvrelay.router")
# Token-id prompts longer than this are validated on a thread, and text prompts of this many characters or more
# tokenized on one; shorter ones take well under a millisecond, less than the hand-off to a thread.
OFF_LOOP_PROMPT_IDS = 4096
OFF_LOOP_TEXT_CHARS = 4096


class Intake:
    """Mutates: the sets of live and halted request ids (and, through the orchestrator, everything a request
    touches)."""

    def __init__(self, orchestrator: Orchestrator, limits: ModelLimits) -> None:
        self.orch, self.limits = orchestrator, limits
        self.live: set[str] = set()
        self.halted: set[str] = set()  # live requests the server is cancelling (not the client)

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.orch.tokenizer

    @property
    def metrics(self) -> RouterMetrics:
        return self.orch.metrics

    async def admit(self, prompt: str | list[int] | None, sampling: dict[str, Any],
                    request_id: str = "") -> RequestSpec:
        """A validated request, its id now live; RequestError(INVALID_ARGUMENT | ALREADY_EXISTS) otherwise.
        Text over the size limit is refused at once, before any tokenizing. Long text is tokenized, and many
        token ids checked, on a thread: a long prompt must not stall every other stream on this loop (the
        tokenizer runs with the GIL released; the checks are C calls or Python loops that yield it as they go)."""
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        limit = self.limits.max_prompt_chars
        try:
            if isinstance(prompt, str):
                off_loop = OFF_LOOP_TEXT_CHARS <= len(prompt) and (limit is None or len(prompt) <= limit)
            else:
                off_loop = prompt is not None and len(prompt) > OFF_LOOP_PROMPT_IDS
            if off_loop:
                spec = await asyncio.to_thread(validate, prompt, sampling, rid, self.limits, self.tokenizer)
            else:
                spec = validate(prompt, sampling, rid, self.limits, self.tokenizer)
        except FieldError as e:
            raise self.refused(RequestError(INVALID_ARGUMENT, str(e), e.param)) from None
        except (ValueError, TypeError) as e:
            raise self.refused(RequestError(INVALID_ARGUMENT, str(e))) from None
        if spec.request_id in self.live:
            raise self.refused(RequestError(ALREADY_EXISTS, f"request id {spec.request_id!r} is already in use by "
                                            "a live request: pick another or leave it empty"))
        self.live.add(spec.request_id)
        return spec

    def release(self, spec: RequestSpec) -> None:
        """Forget an admitted request that will not be run (its sibling failed to admit), or has ended."""
        self.live.discard(spec.request_id)
        self.halted.discard(spec.request_id)

    def halt(self, spec: RequestSpec) -> None:
        """The server is about to cancel this request (a sibling choice of one HTTP request failed, which that
        sibling's error counts): its cancellation is not counted as the client's."""
        self.halted.add(spec.request_id)

    def refused(self, e: RequestError) -> RequestError:
        """Count a request refused before it reached the orchestrator (bad input, bad key, unknown model) once;
        returns `e`."""
        if not e.counted:
            self.orch.metrics.failed(e.code)
            e.counted = True
        return e

    async def run(self, spec: RequestSpec) -> AsyncIterator[Chunk | Final]:
        """The admitted request's chunks, then its Final. Raises RequestError; a bug in the router becomes
        INTERNAL (logged, counted) and the server keeps serving. Closing this early cancels the request, counted as
        CANCELLED (the client went away or its deadline passed) unless the server halted it."""
        try:
            async for item in self.orch.generate(spec):
                yield item
        except RequestError as e:
            e.counted = True  # the orchestrator counted it
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if spec.request_id not in self.halted:
                self.metrics.failed(CANCELLED)
            raise
        except Exception as e:
            log.exception("request %s failed", spec.request_id)
            raise self.refused(RequestError(INTERNAL, f"internal error in the router: {type(e).__name__}: {e}")) \
                from None
        finally:
            self.live.discard(spec.request_id)
            self.halted.discard(spec.request_id)
