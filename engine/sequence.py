"""Request state inside an engine (pure Python)."""

from __future__ import annotations

import enum

from engine.sampling_params import SamplingParams
from engine.scheduler_output import TransferSpec

PLACEHOLDER = -1  # a token a step in flight is sampling; its id lives on the device until the step is collected


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request: its tokens, how many of them have KV in the cache, and the blocks holding that KV.

    Invariants: `num_computed_tokens <= num_tokens`; the KV of tokens [0, num_computed_tokens) is in the blocks of
    `block_table` (or is being written by a step in flight), token i in block `block_table[i // block_size]`.
    `block_hashes[i]` is the prefix hash of full block i of `token_ids` (filled lazily by the block manager, only
    over resolved tokens; tokens never change, so hashes never go stale).

    With async scheduling a token sampled by a step still in flight is a placeholder (PLACEHOLDER) at the tail of
    `token_ids` until that step is collected; `num_placeholders` counts them (at most one per step in flight).
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival: int = 0) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: the prompt is empty")
        self.request_id = request_id
        self.params = params
        self.arrival = arrival
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first admission
        self.admitted = False
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.num_cached_blocks = 0  # leading blocks already registered in the prefix cache by this sequence
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        # Opaque to the engine: set on a prefill-only request whose KV goes to a decode group; the worker
        # extension reads it from SchedulerOutput.transfers in the step that completes the prompt.
        self.transfer: TransferSpec | None = None
        self.transfer_sent = 0  # leading prompt blocks the decode group has (or will have once this step lands)
        self.num_placeholders = 0  # tail tokens sampled by steps in flight, not yet known on the host
        self.slot = -1  # row in the runner's persistent batch while scheduled (-1: none)
        self.num_sent_blocks = 0  # leading block_table entries the runner already has for this slot
        self.inflight = 0  # scheduled steps not yet collected that compute this sequence's tokens
        self.release_pending = False  # finished while in flight: blocks and slot go back once collected
        self.noise_seed = 0  # the seed of its sampling noise: params.seed, or a random one (see Scheduler.add)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens known on the host (placeholders excluded)."""
        return self.token_ids[self.num_prompt_tokens:self.num_resolved_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_resolved_tokens(self) -> int:
        """Tokens known on the host (all but the placeholders)."""
        return len(self.token_ids) - self.num_placeholders

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def append_placeholder(self) -> None:
        self.token_ids.append(PLACEHOLDER)
        self.num_placeholders += 1

    def resolve(self, token_id: int) -> int:
        """The oldest placeholder becomes `token_id`; returns its output index."""
        i = len(self.token_ids) - self.num_placeholders
        self.token_ids[i] = token_id
        self.num_placeholders -= 1
        return i - self.num_prompt_tokens

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={self.block_table}, {self.status.value})")
