"""Logits -> next tokens for a batch with per-request parameters, without synchronising the host.

Parameters arrive as device tensors gathered from the runner's persistent batch (no `torch.tensor(list)` per
step), plus a few host flags the runner computes from its host mirror (all greedy? logprobs?), so no value is read
back from the device. Greedy rows (temperature 0, or below GREEDY_EPS) take the argmax. Sampled rows draw from
softmax(logits / temperature) within top-k and top-p by rejection over Gumbel-max draws (`engine.sampling_noise`:
no sort of the vocabulary; one Triton kernel on CUDA), whose noise is a hash of (noise seed, output index, token
id): a seeded request gives the same tokens alone or batched, on every tensor-parallel rank, and again after a
preemption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_noise import rejection_sample, row_keys


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor | None  # [num_seqs] int64 (set by the time the sampler returns)
    # Only when some request asked for logprobs (rows of the others are computed but ignored):
    sampled_logprobs: torch.Tensor | None = None  # [num_seqs] float32, log p(sampled token)
    top_logprobs: torch.Tensor | None = None  # [num_seqs, max_n] float32
    top_token_ids: torch.Tensor | None = None  # [num_seqs, max_n] int64


@dataclass
class SamplingBatch:
    """Per-row sampling inputs on the logits' device, and host flags about them. The parameters stay in the
    persistent batch's per-slot tensors; row i reads slot `slots[i]` (the Triton kernel loads them itself)."""

    all_greedy: bool  # then the tensors below are not needed: the argmax takes none of them
    max_logprobs: int | None  # largest logprobs=n asked in the batch; None when no row asks
    slots: torch.Tensor | None = None  # [n] int64: each row's persistent-batch slot
    output_index: torch.Tensor | None = None  # [n] int64: which output of its request each row samples
    float_params: torch.Tensor | None = None  # [2, slots] float32: temperature (0 = greedy), top_p (1 = off)
    int_params: torch.Tensor | None = None  # [2, slots] int64: top_k (0 = off), noise seed

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(temperature, top_k, top_p, noise seed), one entry per row."""
        assert self.slots is not None and self.float_params is not None and self.int_params is not None
        return (self.float_params[0][self.slots], self.int_params[0][self.slots], self.float_params[1][self.slots],
                self.int_params[1][self.slots])


class Sampler:
    def __call__(self, logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
        # logits: [num_seqs, vocab] float32
        out = SamplerOutput(token_ids=logits.argmax(dim=-1) if b.all_greedy or not logits.is_cuda else None)
        if b.max_logprobs is not None:
            logp = torch.log_softmax(logits, dim=-1)
            if b.max_logprobs > 0:
                out.top_logprobs, out.top_token_ids = logp.topk(b.max_logprobs, dim=-1)
        if not b.all_greedy:
            if logits.is_cuda:  # one launch: the kernel gathers the rows' parameters and hashes their keys
                from engine.layers.triton_sampling import sample

                out.token_ids = sample(logits, b)
            else:
                temperature, top_k, top_p, seed = b.rows()
                keys = row_keys(seed, b.output_index)
                out.token_ids = rejection_sample(logits, temperature, top_k, top_p, keys)
        if b.max_logprobs is not None:
            out.sampled_logprobs = logp.gather(-1, out.token_ids[:, None]).squeeze(-1)
        return out
