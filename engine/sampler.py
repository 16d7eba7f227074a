"""Logits -> next tokens for a batch with per-request parameters, without synchronising the host.

Greedy rows take the argmax. Sampled rows apply temperature, then top-k and top-p on the sorted logits, and draw
with the exponential-race trick (argmax of p / E with E ~ Exp(1)), which equals sampling from p and lets a seeded
request draw its noise from its own generator. That generator is re-seeded from (seed, output index) each step,
so a seeded request gives the same tokens alone or batched, and again after a preemption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [num_seqs] int64
    # Only when some request asked for logprobs (rows of the others are computed but ignored):
    sampled_logprobs: torch.Tensor | None = None  # [num_seqs] float32, log p(sampled token)
    top_logprobs: torch.Tensor | None = None  # [num_seqs, max_n] float32
    top_token_ids: torch.Tensor | None = None  # [num_seqs, max_n] int64


def _seed_for(seed: int, step: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + step) % (2**63 - 1)


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._gen = torch.Generator(device=device)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> SamplerOutput:
        # logits: [num_seqs, vocab] float32; steps[i]: index of the token being sampled for row i
        num_seqs, vocab = logits.shape
        out = SamplerOutput(token_ids=logits.argmax(dim=-1))
        max_lp = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        if max_lp is not None:
            logp = torch.log_softmax(logits, dim=-1)
            out.sampled_logprobs = logp  # replaced below once tokens are known
            if max_lp > 0:
                out.top_logprobs, out.top_token_ids = logp.topk(max_lp, dim=-1)
        if all(p.greedy for p in params):
            if max_lp is not None:
                out.sampled_logprobs = logp.gather(-1, out.token_ids[:, None]).squeeze(-1)
            return out

        dev = logits.device
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=dev)
        scaled = logits / temps[:, None]
        use_k = any(p.effective_top_k for p in params)
        use_p = any(p.top_p < 1.0 for p in params)
        if use_k or use_p:
            sorted_logits, order = scaled.sort(dim=-1, descending=True)
            if use_k:
                k = torch.tensor([p.effective_top_k or vocab for p in params], device=dev)
                sorted_logits.masked_fill_(torch.arange(vocab, device=dev)[None, :] >= k[:, None], float("-inf"))
            if use_p:
                top_p = torch.tensor([p.top_p for p in params], device=dev)
                probs = sorted_logits.softmax(dim=-1)
                # Drop a token when the mass before it already reaches top_p (the top token always stays).
                sorted_logits.masked_fill_(probs.cumsum(dim=-1) - probs >= top_p[:, None], float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter_(-1, order, sorted_logits)
        probs = scaled.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self._gen)
        for i, p in enumerate(params):
            if p.seed is not None and not p.greedy:
                g = torch.Generator(device=dev).manual_seed(_seed_for(p.seed, steps[i]))
                noise[i].exponential_(generator=g)
        sampled = (probs / noise).argmax(dim=-1)
        greedy = torch.tensor([p.greedy for p in params], device=dev)
        out.token_ids = torch.where(greedy, out.token_ids, sampled)
        if max_lp is not None:
            out.sampled_logprobs = logp.gather(-1, out.token_ids[:, None]).squeeze(-1)
        return out
