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
from router.http.chat_template import ChatTemplate
from router.http.logprobs import TokenTexts
from router.http.schemas import describe_error
from router.intake import Intake

M = TypeVar("M", bound=BaseModel)
MAX_BODY_BYTES = 64 << 20  # a request body larger than this is refused before it is parsed


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
        """The body as `model`, or INVALID_ARGUMENT naming the field and what it must be."""
        self.authorize(request)
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise RequestError(INVALID_ARGUMENT, f"the request body is {int(size)} bytes; at most {MAX_BODY_BYTES} "
                               "are accepted")
        body = await request.body()
        try:
            return model.model_validate_json(body)
        except ValidationError as e:
            message, param = describe_error(e)
            raise RequestError(INVALID_ARGUMENT, message, param) from None
