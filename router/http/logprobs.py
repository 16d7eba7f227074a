"""Token log-probabilities in OpenAI's two formats: completions (`tokens`, `token_logprobs`, `top_logprobs` as
{token: logprob} maps, `text_offset`) and chat (`content`: one {token, logprob, bytes, top_logprobs} per token)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from engine.outputs import Logprob
from engine.tokenizer import Tokenizer


class TokenTexts:
    """Each token's own text (special tokens included; a partial UTF-8 character decodes to U+FFFD, as in
    vLLM). Without a tokenizer, tokens are named `token_id:N` (vLLM's convention)."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.text = lru_cache(maxsize=65536)(self._text)

    def _text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(lps: list[Logprob], texts: TokenTexts, offset: int) -> tuple[dict[str, Any], int]:
    """The completions `logprobs` object of these tokens, whose text starts at character `offset` of the
    completion; returns it and the offset after them (for the next chunk of a stream)."""
    tokens, offsets = [], []
    for lp in lps:
        t = texts.text(lp.token_id)
        tokens.append(t)
        offsets.append(offset)
        offset += len(t)
    top = [{texts.text(tid): p for tid, p in lp.top} for lp in lps]
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps], "top_logprobs": top,
            "text_offset": offsets}, offset


def _entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(lps: list[Logprob], texts: TokenTexts) -> dict[str, Any]:
    """The chat `logprobs` object of these tokens."""
    return {"content": [{**_entry(texts.text(lp.token_id), lp.logprob),
                         "top_logprobs": [_entry(texts.text(tid), p) for tid, p in lp.top]} for lp in lps]}
