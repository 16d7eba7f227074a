"""POST /v1/chat/completions: messages rendered with the chat template, then tokenized (off the event loop),
n choices."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from router.http.chat_template import chat_prompt_ids
from router.http.formats import ChatFormat
from router.http.frontend import Frontend
from router.http.params import bad, check_model, check_supported
from router.http.respond import answer
from router.http.schemas import ChatCompletionRequest
from router.requests import FieldError


def messages_of(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The messages as the template sees them: text content parts joined into one string with newlines, as
    vLLM joins them."""
    if not req.messages:
        raise bad("messages must not be empty", "messages")
    out = []
    for i, m in enumerate(req.messages):
        msg = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            if any(p.type != "text" or p.text is None for p in m.content):
                raise bad(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are "
                          "supported", "messages")
            msg["content"] = "\n".join(p.text or "" for p in m.content)
        out.append(msg)
    return out


async def create_chat_completion(front: Frontend, request: Request) -> Response:
    req = await front.parse(request, ChatCompletionRequest)
    check_model(req, front.model_name)
    check_supported(req)
    template, tokenizer = front.chat_template, front.intake.tokenizer
    if tokenizer is None:
        raise bad(f"the model '{front.model_name}' has no tokenizer, so it cannot take chat messages: use "
                  "/v1/completions with token ids", "messages")
    if template is None:
        raise bad(f"the model '{front.model_name}' has no chat template: start kvrelay serve with "
                  "--chat-template FILE, or use /v1/completions", "messages")
    messages = messages_of(req)
    try:  # the rendered prompt holds every message's text: refuse what could not fit before rendering it
        front.intake.limits.check_text_size(sum(len(m.get("content") or "") for m in messages), "the messages' text",
                                            "messages")
    except FieldError as e:
        raise bad(str(e), "messages") from None

    def render() -> list[int]:
        text = template.render(messages, req.add_generation_prompt, req.chat_template_kwargs)
        return chat_prompt_ids(text, tokenizer)

    try:
        ids = await asyncio.to_thread(render)  # long conversations must not stall the other streams
    except ValueError as e:  # render turns whatever the template raised into ValueError
        raise bad(str(e), "messages") from None
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    # No limit given: whatever room the context leaves (OpenAI's chat default).
    max_tokens = limit if limit is not None else max(1, front.intake.limits.max_model_len - len(ids))
    return await answer(front, request, req, [ids], max_tokens,
                        lambda context: ChatFormat(front.texts, req.logprobs, context))
