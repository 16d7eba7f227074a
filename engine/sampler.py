"""Logits -> next tokens for a batch with per-request parameters, without synchronising the host.

Parameters arrive as device tensors gathered from the runner's persistent batch (no `torch.tensor(list)` per
step), plus a few host flags the runner computes from its host mirror (all greedy? any top-k / top-p? logprobs?),
so no value is read back from the device. Greedy rows (temperature 0, or below GREEDY_EPS) take the argmax.
Sampled rows apply temperature, then top-k and top-p as a per-row threshold on the scaled logits, and draw with
the Gumbel-max trick, whose noise is a hash of (noise seed, output index, token id): a seeded request gives the
same tokens alone or batched, on every tensor-parallel rank, and again after a preemption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_noise import gumbel, row_keys


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [num_seqs] int64
    # Only when some request asked for logprobs (rows of the others are computed but ignored):
    sampled_logprobs: torch.Tensor | None = None  # [num_seqs] float32, log p(sampled token)
    top_logprobs: torch.Tensor | None = None  # [num_seqs, max_n] float32
    top_token_ids: torch.Tensor | None = None  # [num_seqs, max_n] int64


@dataclass
class SamplingBatch:
    """Per-row sampling inputs on the logits' device, and host flags about them."""

    temperature: torch.Tensor  # [n] float32, 0 = greedy
    top_k: torch.Tensor  # [n] int64, 0 = off
    top_p: torch.Tensor  # [n] float32, 1 = off
    noise_seed: torch.Tensor  # [n] int64
    output_index: torch.Tensor  # [n] int64: which output of its request each row samples
    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    max_logprobs: int | None  # largest logprobs=n asked in the batch; None when no row asks


def _thresholds(scaled: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """[n] float32: the smallest scaled logit each row keeps under its top-k and top-p (-inf keeps all)."""
    n, vocab = scaled.shape
    sorted_logits = scaled.sort(dim=-1, descending=True).values  # [n, vocab]
    keep = torch.full((n,), vocab, dtype=torch.int64, device=scaled.device)  # entries kept, most likely first
    if b.use_top_k:
        keep = torch.where(b.top_k > 0, torch.minimum(b.top_k, keep), keep)
    if b.use_top_p:
        probs = sorted_logits.softmax(dim=-1)
        # Keep a token while the mass before it is still below top_p (so the top token always stays).
        within = ((probs.cumsum(dim=-1) - probs) < b.top_p[:, None]).sum(dim=-1)
        keep = torch.minimum(keep, within.clamp(min=1))
    return sorted_logits.gather(-1, (keep - 1)[:, None]).squeeze(-1)


class Sampler:
    def __call__(self, logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
        # logits: [num_seqs, vocab] float32
        out = SamplerOutput(token_ids=logits.argmax(dim=-1))
        if b.max_logprobs is not None:
            logp = torch.log_softmax(logits, dim=-1)
            if b.max_logprobs > 0:
                out.top_logprobs, out.top_token_ids = logp.topk(b.max_logprobs, dim=-1)
        if not b.all_greedy:
            temp = b.temperature
            keys = row_keys(b.noise_seed, b.output_index)
            scaled = logits / torch.where(temp > 0, temp, 1.0)[:, None]
            if b.use_top_k or b.use_top_p:  # greedy rows keep everything: their argmax ignores top-k/top-p
                thresh = torch.where(temp > 0, _thresholds(scaled, b), float("-inf"))
            else:
                thresh = torch.full_like(temp, float("-inf"))
            if logits.is_cuda:
                from engine.layers.triton_sampling import gumbel_argmax

                out.token_ids = gumbel_argmax(logits, temp, thresh, keys)
            else:
                noisy = (scaled + gumbel(keys, logits.shape[1])).masked_fill_(scaled < thresh[:, None],
                                                                             float("-inf"))
                out.token_ids = torch.where(temp > 0, noisy.argmax(dim=-1), out.token_ids)
        if b.max_logprobs is not None:
            out.sampled_logprobs = logp.gather(-1, out.token_ids[:, None]).squeeze(-1)
        return out
