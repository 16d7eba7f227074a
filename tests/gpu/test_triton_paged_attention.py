"""The Triton decode kernels against a float64 torch reference on random paged caches.

Runs on CUDA; without a GPU it runs in Triton's interpreter when triton is installed and TRITON_INTERPRET=1
(slow but exact enough to debug on a laptop), otherwise it is skipped.
"""

import pytest
import torch
from triton_device import DEVICE, MARKS

pytestmark = MARKS


def random_paged(lens, hkv, d, block_size, dtype, seed):
    """Caches [num_blocks, block_size, hkv, d] with each sequence's blocks scattered at random (block 0 unused, so a
    kernel that reads past a table's used entries reads another sequence's data, not zeros)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 3
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    width = max(need) + 2
    tables = torch.zeros(len(lens), width, dtype=torch.int64)
    for b, k in enumerate(need):
        tables[b, :k] = torch.tensor(perm[:k])
        tables[b, k:] = torch.randint(1, num_blocks, (width - k,), generator=g)  # junk past the end
        perm = perm[k:]
    kc = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    vc = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    return kc, vc, tables


def reference(q, kc, vc, tables, lens, scale, window):
    # float64 per sequence: gather its tokens, softmax over the (windowed) keys; G query heads per KV head.
    out = torch.zeros(q.shape, dtype=torch.float64)
    h, hkv = q.shape[1], kc.shape[2]
    bs = kc.shape[1]
    for b, n in enumerate(lens):
        if n == 0:
            continue
        pos = torch.arange(n)
        slots = tables[b][pos // bs] * bs + pos % bs
        k = kc.reshape(-1, hkv, kc.shape[3])[slots].double().repeat_interleave(h // hkv, dim=1)  # [n, H, D]
        v = vc.reshape(-1, hkv, vc.shape[3])[slots].double().repeat_interleave(h // hkv, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale
        if window is not None:
            s[:, pos <= n - 1 - window] = float("-inf")
        out[b] = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
    return out


CASES = [
    # lens, H, Hkv, D, block_size, window, splits
    ([1, 17, 64, 133], 4, 2, 16, 16, None, None),
    ([5, 300, 0, 77], 32, 8, 128, 16, None, 1),
    ([5, 300, 0, 77], 32, 8, 128, 16, None, 8),
    ([1000], 8, 1, 64, 8, None, 16),
    ([40, 41, 100, 3], 4, 4, 32, 16, 40, 4),
    ([257, 2], 12, 4, 80, 32, 100, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_decode_kernel_matches_reference(case, dtype):
    from engine.layers.triton_paged_attention import paged_decode_attention

    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes bfloat16 tl.dot wrongly; this case runs on CUDA")
    lens, h, hkv, d, bs, window, splits = CASES[case]
    kc, vc, tables = random_paged(lens, hkv, d, bs, dtype, seed=case)
    q = torch.randn(len(lens), h, d, generator=torch.Generator().manual_seed(100 + case)).to(dtype)
    scale = d ** -0.5
    ref = reference(q, kc, vc, tables, lens, scale, window)
    out = paged_decode_attention(q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE), tables.to(DEVICE),
                                 torch.tensor(lens, device=DEVICE), scale, window, splits=splits)
    assert out.dtype == dtype and out.shape == q.shape
    out = out.double().cpu()
    assert not out.isnan().any()
    err = (out - ref).norm() / ref.norm()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err
    assert (out[[b for b, n in enumerate(lens) if n == 0]] == 0).all()  # padded rows give zeros


def test_store_kv_writes_only_mapped_slots():
    from engine.layers.triton_paged_attention import store_kv

    g = torch.Generator().manual_seed(5)
    kc = torch.randn(6, 16, 2, 32, generator=g)
    vc = torch.randn(6, 16, 2, 32, generator=g)
    qkv = torch.randn(4, 8 * 32, generator=g)  # k and v as strided views of one projection, as in the model
    k, v = qkv[:, 4 * 32:6 * 32].view(4, 2, 32), qkv[:, 6 * 32:].view(4, 2, 32)
    slots = torch.tensor([17, -1, 0, 95])
    ek, ev = kc.clone(), vc.clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            ek.view(-1, 2, 32)[s], ev.view(-1, 2, 32)[s] = k[i], v[i]
    kd, vd = kc.to(DEVICE), vc.to(DEVICE)
    store_kv(k.to(DEVICE), v.to(DEVICE), kd, vd, slots.to(DEVICE))
    assert torch.equal(kd.cpu(), ek) and torch.equal(vd.cpu(), ev)
