"""What the engine reports for a request after a step (plain data)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


@dataclass
class RequestOutput:
    """What one step added to a request (`new_*`), and on its final output the whole of it.

    Per step the engine reports deltas only, so a step costs O(new tokens) whatever the requests' lengths; the
    cumulative fields (prompt, every generated token, the text, every logprob) are filled on the final output
    (`finished`), where `LLM.generate` reads them, and are None before.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str = ""
    new_logprobs: list[Logprob] | None = None  # logprobs of new_token_ids (when asked; may lack the first token's)
    num_output_tokens: int = 0  # generated so far, new_token_ids included
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "prefilled"
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # why a request was aborted by the system (e.g. its KV transfer failed)
    # Final output only:
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None  # every generated token
    text: str | None = None  # generated text (stop string removed once matched)
    logprobs: list[Logprob] | None = None
