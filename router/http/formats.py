"""How one choice's chunks look in each OpenAI response shape: completions (`text_completion`) and chat
(`chat.completion` / `chat.completion.chunk`), streamed or whole. Per-choice state, for logprobs: the last token
seen (token texts are decoded after it; a choice starts after its prompt's last token) and, for completions, the
running text offset."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from router.client_stream import Chunk, Final
from router.http.logprobs import TokenTexts, chat_logprobs, completion_logprobs


class CompletionFormat:
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, texts: TokenTexts, logprobs: bool, context: list[int]) -> None:
        """`context[i]`: choice i's last prompt token."""
        self.texts, self.logprobs, self.context = texts, logprobs, context
        self._offsets: defaultdict[int, int] = defaultdict(int)
        self._prev: dict[int, int | None] = dict(enumerate(context))

    def start(self, index: int) -> dict[str, Any] | None:
        return None  # completions have no opening chunk

    def delta(self, index: int, chunk: Chunk) -> dict[str, Any] | None:
        """The streamed choice for a chunk; None when it carries nothing a client sees (no text, no logprobs)."""
        if not chunk.text and not (self.logprobs and chunk.logprobs):
            return None
        lp = None
        if self.logprobs:
            lp, self._offsets[index], self._prev[index] = completion_logprobs(
                chunk.logprobs, self.texts, self._offsets[index], self._prev[index])
        return {"index": index, "text": chunk.text, "logprobs": lp, "finish_reason": None}

    def end(self, index: int, final: Final) -> dict[str, Any]:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": final.finish_reason}

    def whole(self, index: int, chunks: list[Chunk], final: Final) -> dict[str, Any]:
        lps = [lp for c in chunks for lp in c.logprobs]
        return {"index": index, "text": "".join(c.text for c in chunks),
                "logprobs": completion_logprobs(lps, self.texts, 0, self.context[index])[0] if self.logprobs
                else None,
                "finish_reason": final.finish_reason}


class ChatFormat:
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, texts: TokenTexts, logprobs: bool, context: list[int]) -> None:
        """`context[i]`: choice i's last prompt token."""
        self.texts, self.logprobs, self.context = texts, logprobs, context
        self._prev: dict[int, int | None] = dict(enumerate(context))

    def start(self, index: int) -> dict[str, Any] | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def delta(self, index: int, chunk: Chunk) -> dict[str, Any] | None:
        if not chunk.text and not (self.logprobs and chunk.logprobs):
            return None
        lp = None
        if self.logprobs:
            lp, self._prev[index] = chat_logprobs(chunk.logprobs, self.texts, self._prev[index])
        return {"index": index, "delta": {"content": chunk.text}, "logprobs": lp, "finish_reason": None}

    def end(self, index: int, final: Final) -> dict[str, Any]:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": final.finish_reason}

    def whole(self, index: int, chunks: list[Chunk], final: Final) -> dict[str, Any]:
        lps = [lp for c in chunks for lp in c.logprobs]
        return {"index": index, "message": {"role": "assistant", "content": "".join(c.text for c in chunks)},
                "logprobs": chat_logprobs(lps, self.texts, self.context[index])[0] if self.logprobs else None,
                "finish_reason": final.finish_reason}


Format = CompletionFormat | ChatFormat


class UsageTally:
    """The usage of one HTTP request: each prompt counted once (its first choice's counts, as OpenAI counts a
    prompt once whatever n is), completion tokens summed over every choice."""

    def __init__(self, choices_per_prompt: int) -> None:
        self.n = choices_per_prompt
        self.prompt = self.cached = self.completion = 0

    def add(self, index: int, final: Final) -> None:
        if index % self.n == 0:
            self.prompt += final.prompt_tokens
            self.cached += final.cached_prompt_tokens
        self.completion += final.completion_tokens

    def json(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion,
                "prompt_tokens_details": {"cached_tokens": self.cached}}
