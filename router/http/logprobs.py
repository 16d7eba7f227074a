"""Token log-probabilities in OpenAI's two formats: completions (`tokens`, `token_logprobs`, `top_logprobs` as
{token: logprob} maps, `text_offset`) and chat (`content`: one {token, logprob, bytes, top_logprobs} per token).

A token's text is decoded after the token before it (the prompt's last for the first): decoding a token alone
loses what it means in context, e.g. the leading space of a SentencePiece (Metaspace) word piece, so that the
tokens' texts concatenate to the completion's text and `text_offset` and `bytes` are right (vLLM decodes
logprob tokens incrementally the same way)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from engine.outputs import Logprob
from engine.tokenizer import Tokenizer


class TokenTexts:
    """Each token's text after a given previous token (special tokens included; a partial UTF-8 character
    decodes to U+FFFD, as in vLLM). Without a tokenizer, tokens are named `token_id:N` (vLLM's convention)."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._alone = lru_cache(maxsize=65536)(self._decode_alone)
        self._after = lru_cache(maxsize=262144)(self._decode_after)

    def text(self, token_id: int, prev: int | None = None) -> str:
        """`token_id`'s text where it follows `prev` (None: at the start of a text)."""
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self._alone(token_id) if prev is None else self._after(prev, token_id)

    def _decode_alone(self, token_id: int) -> str:
        assert self.tokenizer is not None
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _decode_after(self, prev: int, token_id: int) -> str:
        assert self.tokenizer is not None
        before = self._alone(prev)
        both = self.tokenizer.decode([prev, token_id], skip_special_tokens=False)
        # A pair that decodes differently from its first token (bytes completing a character) has no clean cut.
        return both[len(before):] if both.startswith(before) else self._alone(token_id)


def completion_logprobs(lps: list[Logprob], texts: TokenTexts, offset: int,
                        prev: int | None) -> tuple[dict[str, Any], int, int | None]:
    """The completions `logprobs` object of these tokens, whose text starts at character `offset` of the
    completion after token `prev`; returns it, the offset after them and their last token (for the next chunk of
    a stream)."""
    tokens, offsets, top = [], [], []
    for lp in lps:
        t = texts.text(lp.token_id, prev)
        tokens.append(t)
        offsets.append(offset)
        top.append({texts.text(tid, prev): p for tid, p in lp.top})
        offset += len(t)
        prev = lp.token_id
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps], "top_logprobs": top,
            "text_offset": offsets}, offset, prev


def _entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(lps: list[Logprob], texts: TokenTexts, prev: int | None) -> tuple[dict[str, Any], int | None]:
    """The chat `logprobs` object of these tokens, which follow token `prev`; and their last token."""
    content = []
    for lp in lps:
        content.append({**_entry(texts.text(lp.token_id, prev), lp.logprob),
                        "top_logprobs": [_entry(texts.text(tid, prev), p) for tid, p in lp.top]})
        prev = lp.token_id
    return {"content": content}, prev
