"""The sampler's draw (torch reference, the CPU path; the Triton kernel reproduces it bit for bit, see
tests/gpu/test_sampler_gpu.py): exact support, the right distribution under top-k/top-p, reproducible keys."""

import math

import torch

from engine.sampling_noise import rejection_sample, row_keys

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def draws(n, temperature, top_k, top_p, seed=0):
    logits = LOGITS.repeat(n, 1)
    keys = row_keys(torch.full((n,), seed, dtype=torch.int64), torch.arange(n))
    return rejection_sample(logits, torch.full((n,), temperature), torch.full((n,), top_k, dtype=torch.int64),
                            torch.full((n,), top_p), keys)


def expected(temperature, top_k, top_p):
    """softmax(logits / T) over the smallest most-likely prefix reaching top_p, at most top_k entries."""
    p = torch.softmax(LOGITS / temperature, dim=0).tolist()
    keep, mass = [], 0.0
    for i in sorted(range(len(p)), key=lambda i: -p[i]):
        if (top_k and len(keep) >= top_k) or mass >= top_p:
            break
        keep.append(i)
        mass += p[i]
    z = sum(p[i] for i in keep)
    return {i: p[i] / z for i in keep}


def check(temperature, top_k, top_p, n=40000):
    got = torch.bincount(draws(n, temperature, top_k, top_p), minlength=len(LOGITS)).tolist()
    want = expected(temperature, top_k, top_p)
    assert {i for i, c in enumerate(got) if c} == set(want)  # never a token outside top-k / top-p
    for i, q in want.items():
        sd = math.sqrt(q * (1 - q) / n)
        assert abs(got[i] / n - q) < 5 * sd + 1e-4, (i, got[i] / n, q)


def test_full_distribution():
    check(1.0, 0, 1.0)


def test_top_p_nucleus():
    check(1.0, 0, 0.7)  # the first round's candidate is often outside: rejection rounds run
    check(0.5, 0, 0.9)


def test_top_k_and_both():
    check(1.3, 3, 1.0)
    check(1.0, 4, 0.8)


def test_greedy_rows_and_reproducible_keys():
    a = draws(64, 0.9, 0, 0.95, seed=7)
    assert torch.equal(a, draws(64, 0.9, 0, 0.95, seed=7)) and not torch.equal(a, draws(64, 0.9, 0, 0.95, seed=8))
    assert (draws(16, 0.0, 2, 0.5) == 0).all()  # temperature 0: the argmax, top-k/top-p aside
