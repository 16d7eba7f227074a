"""From an OpenAI request body to what the intake takes: sampling keyword arguments per choice, the checks of
fields kvrelay knows but does not implement, and the OpenAI name of a field the intake refused."""

from __future__ import annotations

from typing import Any

from router.errors import INVALID_ARGUMENT, NOT_FOUND, RequestError
from router.http.schemas import MAX_N, ChatCompletionRequest, CompletionRequest

Request = CompletionRequest | ChatCompletionRequest


def bad(message: str, param: str | None) -> RequestError:
    return RequestError(INVALID_ARGUMENT, message, param)


def check_model(req: Request, served: str) -> None:
    if req.model is not None and req.model != served:
        raise RequestError(NOT_FOUND, f"the model '{req.model}' does not exist here: this server serves "
                           f"'{served}' (see GET /v1/models)", "model")


def check_supported(req: Request) -> None:
    """Known fields with a non-neutral value kvrelay cannot honour: refused, never silently ignored."""
    if not 1 <= req.n <= MAX_N:
        raise bad(f"n must be between 1 and {MAX_N}, got {req.n}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise bad(f"{name} is not supported by kvrelay: leave it unset or 0", name)
    if req.logit_bias:
        raise bad("logit_bias is not supported by kvrelay: leave it unset", "logit_bias")
    if req.stream_options is not None and not req.stream:
        raise bad("stream_options is only allowed with stream: true", "stream_options")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise bad("echo is not supported by kvrelay: leave it false", "echo")
        if req.suffix:
            raise bad("suffix is not supported by kvrelay: leave it unset", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad("best_of is not supported by kvrelay: leave it unset (or equal to n)", "best_of")
    else:
        if req.tools:
            raise bad("tools are not supported by kvrelay: leave them unset", "tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise bad("response_format other than {'type': 'text'} is not supported by kvrelay", "response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")


def sampling(req: Request, max_tokens: int, choice: int) -> dict[str, Any]:
    """SamplingParams keyword arguments of choice `choice`: with a seed, choice i samples with seed + i, so the
    choices differ yet each is reproducible."""
    kw: dict[str, Any] = {"max_tokens": max_tokens, "ignore_eos": req.ignore_eos,
                          "skip_special_tokens": req.skip_special_tokens}
    for name in ("temperature", "top_p", "top_k"):
        if (v := getattr(req, name)) is not None:
            kw[name] = v
    if req.seed is not None:
        kw["seed"] = req.seed + choice if req.seed >= 0 else req.seed  # a negative seed is refused by name
    if req.stop is not None:
        kw["stop"] = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    if req.stop_token_ids:
        kw["stop_token_ids"] = tuple(req.stop_token_ids)
    if isinstance(req, CompletionRequest):
        kw["logprobs"] = req.logprobs
    elif req.logprobs:
        kw["logprobs"] = req.top_logprobs or 0
    return kw


def openai_param(field: str | None, chat: bool) -> str | None:
    """The OpenAI request field for a field the intake refused (router.requests.FieldError.param): chat has
    `messages` for the prompt and `top_logprobs` for the number of alternatives."""
    if chat and field == "prompt":
        return "messages"
    if chat and field == "logprobs":
        return "top_logprobs"
    return field
