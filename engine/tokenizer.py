"""Tokenizer from a checkpoint's `tokenizer.json`, and incremental detokenization for streaming."""

from __future__ import annotations

import os

from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    def __init__(self, path: str) -> None:
        self._tok = HFTokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_model_dir(cls, model_dir: str) -> Tokenizer | None:
        """The directory's tokenizer, or None when it ships without `tokenizer.json` (token-id prompts only)."""
        path = os.path.join(model_dir, "tokenizer.json")
        return cls(path) if os.path.isfile(path) else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids with the tokenizer's own special tokens (e.g. BOS) as its post-processor adds them, or the
        text's tokens alone with `add_special_tokens=False` (a rendered chat template already has them)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that are always valid, final text.

    Decoding token by token breaks multi-byte characters and word-boundary spaces, so each new token is decoded
    together with a few tokens before it (from `prefix_offset`) and only the text past what those tokens already
    produced is emitted; a delta ending in U+FFFD (an incomplete UTF-8 sequence) is held back until it completes.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids)
        self.read_offset = len(self.ids)
        self.prefix_offset = max(len(self.ids) - 6, 0)
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of generation, emit whatever is held back (an incomplete character decodes to U+FFFD)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        delta = full[len(prefix):] if full.startswith(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
