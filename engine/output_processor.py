"""The output side of one request: incremental text, stop strings with stream hold-back, logprobs, and what was
already streamed (pure Python; the engine uses it, and so does the router, which detokenizes for the workers).
"""

from __future__ import annotations

from engine.outputs import Logprob
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer, detokenizer


class OutputState:
    """Mutates: its text, tokens and stream cursors. Feed generated tokens with `add`, end with `flush`, read what
    to stream with `take`. A stop string may straddle tokens, so the last `holdback` characters of the text are
    held back until they can no longer begin a match; once one matches, the text is cut there and `stopped` set.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer | None) -> None:
        self.params = params
        # The detokenizer keeps a few tokens of context and no text: `text` is the one copy of the output's text.
        self.detok = detokenizer(tokenizer, prompt_ids, params.skip_special_tokens) if tokenizer else None
        self.token_ids: list[int] = []  # generated so far
        self.text = ""
        self.stopped = False  # a stop string matched: the request must end with finish_reason "stop"
        self.emitted_chars = 0
        self.emitted_tokens = 0
        self.emitted_logprobs = 0
        self.logprobs: list[Logprob] | None = [] if params.logprobs is not None else None
        self.holdback = max((len(s) for s in params.stop), default=1) - 1

    def add(self, token: int, logprob: Logprob | None = None) -> bool:
        """Account one generated token; True when a stop string matched because of it."""
        if self.stopped:
            return False
        self.token_ids.append(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        if self.detok is None:
            return False
        checked = len(self.text)
        self.text += self.detok.add(token)
        return self._check_stop(checked)

    def flush(self) -> bool:
        """Generation ended: emit text held back for an incomplete character; True if that completed a stop."""
        if self.detok is None or self.stopped:
            return False
        checked = len(self.text)
        self.text += self.detok.flush()
        return self._check_stop(checked)

    def _check_stop(self, checked: int) -> bool:
        """Cut the text at the first stop string; text before `checked` held no match already."""
        if not self.params.stop:
            return False
        hits = [i for i in (self.text.find(s, max(0, checked - len(s) + 1)) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.stopped = True
        return True

    def take(self, finished: bool) -> tuple[list[int], str]:
        """The tokens and text not streamed yet (all of it once finished; else minus the hold-back)."""
        end = len(self.text) if finished else max(len(self.text) - self.holdback, self.emitted_chars)
        new_text = self.text[self.emitted_chars:end]
        self.emitted_chars = end
        new_tokens = self.token_ids[self.emitted_tokens:]
        self.emitted_tokens = len(self.token_ids)
        return new_tokens, new_text

    def take_logprobs(self) -> list[Logprob] | None:
        """The logprobs not handed out yet (None when the request asked for none)."""
        if self.logprobs is None:
            return None
        new = self.logprobs[self.emitted_logprobs:]
        self.emitted_logprobs = len(self.logprobs)
        return new
