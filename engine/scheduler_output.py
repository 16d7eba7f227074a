"""What the scheduler hands the runner for one step: a diff against the runner's persistent batch (pure Python).

Columnar and small, so it pickles cheaply to tensor-parallel ranks: one entry per scheduled row, plus the few
requests that enter the batch this step and the block-table rows that grew. A request that merely advanced by one
token costs four integers and no copy of its block table or its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class TransferSpec:
    """A prefill-only request's destination: decode group `peer`, which holds the prompt's first `skip_blocks`
    blocks already (its prefix cache) and receives the rest."""

    peer: str
    skip_blocks: int = 0

    def __post_init__(self) -> None:
        if not self.peer or self.skip_blocks < 0:
            raise ValueError(f"a transfer needs a peer and skip_blocks >= 0, got {self!r}")


@dataclass(frozen=True)
class TransferChunk:
    """What one row of a step sends (the worker side's instructions): the prefill-side blocks `src_blocks`, which
    land in the receiver's reserved blocks from index `dst_offset` on. A chunked prefill sends each chunk's
    blocks as it is computed (a block the chunk leaves partial is sent again, complete, with the next one); the
    receiver admits the request once the `final` chunk has landed."""

    peer: str
    src_blocks: list[int]
    dst_offset: int
    final: bool


@dataclass
class TransferEvents:
    """What one rank's KV connector reports with a step's result (or when polled): requests whose chunk it sent
    or failed to send, and requests whose KV landed or failed to arrive on it."""

    sent: list[str] = field(default_factory=list)
    send_failed: dict[str, str] = field(default_factory=dict)
    landed: list[str] = field(default_factory=list)
    recv_failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NewRequest:
    """A request entering the runner's batch at `slot` (first schedule, or again after a preemption): the runner
    resets the slot's block-table row and sampling parameters."""

    request_id: str
    slot: int
    params: SamplingParams
    noise_seed: int  # seed of its sampling noise (the request's seed, or one drawn for it)


@dataclass
class SchedulerOutput:
    """Row b computes `num_tokens[b]` tokens of request `request_ids[b]` at positions
    [starts[b], starts[b] + num_tokens[b]) of its sequence, in persistent-batch row `slots[b]`."""

    request_ids: list[str] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # tokens already in the cache == position of the first
    num_tokens: list[int] = field(default_factory=list)
    # Index among the request's outputs of the token row b samples, or -1 when the row's chunk does not reach the
    # sequence's last token (a prefill chunk). Seeded noise derives from it.
    output_index: list[int] = field(default_factory=list)
    # Every row's input tokens concatenated (sum(num_tokens) ids); PLACEHOLDER (-1) where the token is the one the
    # previous step sampled for that slot and is read on the device (async scheduling).
    token_ids: list[int] = field(default_factory=list)
    new_requests: list[NewRequest] = field(default_factory=list)
    # (slot, first column, block ids): entries appended to a slot's block table since the runner last saw it.
    new_blocks: list[tuple[int, int, list[int]]] = field(default_factory=list)
    # Rows computing prompt tokens whose KV goes elsewhere: row -> what that chunk sends.
    transfers: dict[int, TransferChunk] = field(default_factory=dict)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.request_ids)

    @property
    def total_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_empty(self) -> bool:
        return not self.request_ids

    @property
    def is_pure_decode(self) -> bool:
        """Every row computes exactly one token (the CUDA fast path and its graphs)."""
        return bool(self.request_ids) and len(self.token_ids) == len(self.request_ids)
