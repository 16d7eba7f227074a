"""What the HTTP routes share: the intake, the served model's name and limits, its chat template, token texts
for logprobs, the API key and the router's health."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from router.auth import check_key
from router.errors import INVALID_ARGUMENT, UNAUTHENTICATED, RequestError
from router.http.body import parse_body, read_body
from router.http.chat_template import ChatTemplate
from router.http.logprobs import TokenTexts
from router.http.schemas import describe_error
from router.intake import Intake

M = TypeVar("M", bound=BaseModel)


@dataclass
class Frontend:
    intake: Intake
    model_name: str
    chat_template: ChatTemplate | None
    texts: TokenTexts
    api_key: str | None
    healthy: Callable[[], tuple[bool, str]]  # (serving?, why not)

    def authorize(self, request: Request) -> None:
        """Nothing is done for a request without the right key: this runs before its body is read."""
        if self.api_key is None:
            return
        problem = check_key(request.headers.get("authorization"), self.api_key)
        if problem is not None:
            raise RequestError(UNAUTHENTICATED, problem)

    async def parse(self, request: Request, model: type[M]) -> M:
        """The body as `model`, or INVALID_ARGUMENT naming the field and what it must be (413 when it is over
        router.http.body.MAX_BODY_BYTES). Large bodies are parsed off the event loop."""
        self.authorize(request)
        body = await read_body(request)
        try:
            return await parse_body(body, model)
        except ValidationError as e:
            message, param = describe_error(e)
            raise RequestError(INVALID_ARGUMENT, message, param) from None
