"""The OpenAI request bodies kvrelay accepts, as pydantic models. Unknown fields are ignored, as OpenAI does;
fields of the wrong type are rejected (strict: "5" is not an integer, 1 is a valid temperature); `null` is the
default of any optional field, as in OpenAI's API. A few vLLM
extensions that clients send through `extra_body` are honoured: top_k, ignore_eos, stop_token_ids,
skip_special_tokens, add_generation_prompt, chat_template_kwargs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_N = 8  # choices per request: each is a request of its own on the workers


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """OpenAI accepts `null` for every optional field and its SDKs and wrappers send it (`"n": null`): a null
        means "the default". A required field sent as null reads as missing."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(_Body):
    include_usage: bool = False  # one last chunk with the whole request's usage and no choices


class _Sampling(_Body):
    model: str | None = None  # must be the served model's name when given
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None  # choice i of n samples with seed + i
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    # Known OpenAI fields kvrelay does not implement: only their neutral values are accepted.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    # Left to right, token ids before strings: pydantic's default (smart) union also tries list[str] and
    # list[list[int]] on a list of ids, one error per id, which made a large prompt's parse ~15x slower.
    prompt: str | list[int] | list[str] | list[list[int]] = Field(union_mode="left_to_right")
    logprobs: int | None = None  # top alternatives per token (0 = the sampled token's alone)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # Extra keys (name, tool_calls, ...) are kept: a chat template may use them.
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # wins over max_tokens (OpenAI's newer name)
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


# What a field must be, for the messages of type errors inside unions (pydantic's would name each branch).
_SHAPES = {"prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
           "stop": "a string or a list of strings", "messages": "a list of {role, content} objects",
           "content": "a string or a list of {type, text} parts"}


def describe_error(e: ValidationError) -> tuple[str, str | None]:
    """(a message saying what to fix, the offending field) for the first problem pydantic found."""
    err = e.errors()[0]
    if err["type"] == "json_invalid":
        return f"the request body is not valid JSON: {err['msg']}", None
    loc = list(err["loc"])
    if not loc:
        return "the request body must be a JSON object", None
    # pydantic names the union branch it tried ('str', 'list[int]', ...): cut the path there.
    tag = next((i for i, x in enumerate(loc) if isinstance(x, str) and (x in _TAGS or "[" in x)), None)
    path = loc[:tag] if tag is not None else loc
    where = ".".join(str(x) for x in path)
    if err["type"] == "missing":
        return f"'{where}' is required", str(loc[0])
    leaf = next((x for x in reversed(path) if isinstance(x, str)), "")
    if tag is not None and leaf in _SHAPES:
        return f"'{where}' must be {_SHAPES[leaf]}", str(loc[0])
    return f"'{where}': {err['msg']}", str(loc[0])


_TAGS = {"str", "int", "float", "bool", "dict", "list"}
