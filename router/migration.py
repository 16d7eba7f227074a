"""Request migration (pure Python): what a request becomes when the worker running it is lost after tokens reached
its client, and how many re-placements one request may take.

A request that streamed k tokens continues elsewhere as prompt + those k tokens with max_tokens - k left, and its
sampling noise at output index k (`SamplingParams.output_offset`): greedy tokens equal an unfailed run's, and so
do a seeded request's, because the noise of output i is a hash of (seed, i) wherever it is drawn. The client's
stream state (text, stop strings, usage) stays in the router's `ClientStream`, so it simply goes on.
"""

from __future__ import annotations

import dataclasses

from router.errors import UNAVAILABLE, RequestError
from router.requests import RequestSpec


class Attempts:
    """One request's budget of re-placements (prefill retries and decode migrations together): at most
    `limit` after the first placement. Mutates: its count."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def take(self, error: RequestError) -> None:
        """Spend one re-placement on `error`, or re-raise it: it is not a lost worker's, or the budget is gone."""
        if error.code != UNAVAILABLE:
            raise error
        if self.used >= self.limit:
            raise RequestError(UNAVAILABLE, f"{error.message} (gave up after {self.used + 1} placements: "
                               f"--migration-limit {self.limit})") from None
        self.used += 1


def continuation(spec: RequestSpec, streamed: list[int], eos_token_ids: tuple[int, ...]) -> tuple[RequestSpec,
                                                                                                  str | None]:
    """The request to place again after `streamed` tokens reached the router: (spec, None); or (spec, finish
    reason) when those tokens already end it (the worker was lost between its last token and its finish)."""
    p = spec.params
    if streamed:
        last = streamed[-1]
        if last in p.stop_token_ids or (not p.ignore_eos and last in eos_token_ids):
            return spec, "stop"
        if len(streamed) >= p.max_tokens:
            return spec, "length"
    params = dataclasses.replace(p, max_tokens=p.max_tokens - len(streamed),
                                 output_offset=p.output_offset + len(streamed))
    return RequestSpec(spec.request_id, spec.prompt_ids + streamed, params, spec.arrival), None
