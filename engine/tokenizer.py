"""Tokenizer from a checkpoint's `tokenizer.json`, and incremental detokenization for streaming."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

# Prompt tokens decoded with the first generated ones: enough context for word-boundary spaces and characters
# that span tokens (the window vLLM uses too).
PREFIX_TOKENS = 6
# Texts at least this long are encoded without character offsets (which serving never reads): about half the
# time, and the Rust side runs with the GIL released, so the thread that tokenizes leaves the event loop free.
FAST_ENCODE_CHARS = 16 << 10


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
        if len(text) >= FAST_ENCODE_CHARS:
            return self._tok.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def max_token_chars(self) -> int:
        """Characters of the longest vocabulary entry as the vocabulary spells it (byte-level BPE: one character
        per byte; SentencePiece byte tokens "<0x..>": six for one byte), so no token covers more characters of a
        text than this. Bounds the text that can still fit a token limit, for tokenizers that keep every character
        (byte-level and byte-fallback ones: the Llama family's)."""
        return max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)

    def stream(self, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> StreamDetokenizer:
        """An incremental detokenizer for text generated after `prompt_ids`."""
        return StreamDetokenizer(self, prompt_ids, skip_special_tokens)


class Detokenizer(Protocol):
    """Generated tokens in, text deltas out: `add` per token, `flush` once at the end."""

    def add(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


def detokenizer(tokenizer: object, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> Detokenizer:
    """`StreamDetokenizer` for a `Tokenizer`; the reference `IncrementalDetokenizer` for anything else with a
    `decode(ids, skip_special_tokens)` (e.g. a test's toy tokenizer)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.stream(prompt_ids, skip_special_tokens)
    return IncrementalDetokenizer(tokenizer, list(prompt_ids[-PREFIX_TOKENS:]), skip_special_tokens)


class StreamDetokenizer:
    """The deltas of `IncrementalDetokenizer`, exactly, from `tokenizers`' DecodeStream: one call into Rust per
    token (about a quarter of the reference's cost) and no copy of the prompt or the text.

    Both keep the same window: `window` holds the tokens whose text is the decode context (the prompt's last
    PREFIX_TOKENS at first; after each delta, the tokens that made it) and `pending` those since. Where
    DecodeStream would part from the reference (a context whose text ends in an incomplete character, which it
    would not treat as context; a decoded text that does not extend its context), this decodes the window itself
    from then on. `flush` decodes the held-back tokens the same way (DecodeStream has no end)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._hf, self._skip = tokenizer._tok, skip_special_tokens
        self.window: list[int] = list(prompt_ids[-PREFIX_TOKENS:])
        self.pending: list[int] = []
        context = self._hf.decode(self.window, skip_special_tokens=self._skip)
        # DecodeStream adopts a context only if its text ends in a whole character, and one that decodes to ""
        # it moves forward on its own: either way its windows would differ from the reference's.
        whole = context != "" and not context.endswith("\ufffd")
        self._stream: DecodeStream | None = DecodeStream(self.window, self._skip) if whole else None

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.pending.append(token_id)
        if self._stream is not None:
            try:
                delta = self._stream.step(self._hf, token_id)
            except Exception:  # the text no longer extends its context: decode the window here from now on
                self._stream = None
            else:
                if delta is None:
                    return ""
                self.window, self.pending = self.pending, []
                return delta
        prefix = self._hf.decode(self.window, skip_special_tokens=self._skip)
        full = self._hf.decode(self.window + self.pending, skip_special_tokens=self._skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.window, self.pending = self.pending, []
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """At the end of generation, emit whatever is held back (an incomplete character decodes to U+FFFD)."""
        if not self.pending:
            return ""
        prefix = self._hf.decode(self.window, skip_special_tokens=self._skip)
        full = self._hf.decode(self.window + self.pending, skip_special_tokens=self._skip)
        self.window, self.pending = self.pending, []
        return full[len(prefix):] if full.startswith(prefix) else ""


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
