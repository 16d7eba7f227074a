"""POST /v1/completions: one or several prompts (text or token ids), n choices each."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from router.http.formats import CompletionFormat
from router.http.frontend import Frontend
from router.http.params import bad, check_model, check_supported
from router.http.respond import answer
from router.http.schemas import CompletionRequest

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def prompts_of(req: CompletionRequest) -> list[str | list[int]]:
    p = req.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):
        return [p]  # type: ignore[list-item]
    if not p:
        raise bad("the prompt is empty", "prompt")
    return list(p)  # type: ignore[arg-type]


async def create_completion(front: Frontend, request: Request) -> Response:
    req = await front.parse(request, CompletionRequest)
    check_model(req, front.model_name)
    check_supported(req)
    prompts = prompts_of(req)
    max_tokens = req.max_tokens if req.max_tokens is not None else DEFAULT_MAX_TOKENS
    return await answer(front, request, req, prompts, max_tokens,
                        lambda context: CompletionFormat(front.texts, req.logprobs is not None, context))
