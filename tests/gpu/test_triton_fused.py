"""The fused Triton element-wise kernels against the torch layers they replace (computed on the CPU).

Runs on CUDA; without a GPU, float32 cases run in Triton's interpreter when triton is installed and
TRITON_INTERPRET=1, otherwise everything is skipped.
"""

import pytest
import torch
from triton_device import DEVICE, DTYPES, MARKS

from engine.config import RopeConfig
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding

pytestmark = MARKS


def close(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-6)
    else:  # same roundings as torch, yet a value near a cancellation may land one bf16 step (at 1.0) apart
        torch.testing.assert_close(out.cpu().float(), ref.float(), rtol=8e-3, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,residual", [(64, False), (2048, True), (4096, True), (80, True)])
def test_rms_norm(dtype, hidden, residual):
    from engine.layers.triton_fused import rms_norm

    g = torch.Generator().manual_seed(hidden)
    x = (torch.randn(5, hidden, generator=g) * 3).to(dtype)
    res = torch.randn(5, hidden, generator=g).to(dtype) if residual else None
    norm = RMSNorm(hidden, 1e-5).to(dtype)
    norm.weight.copy_(torch.rand(hidden, generator=g) + 0.5)
    ref_out, ref_res = norm(x, res)  # CPU: the torch code
    out, new_res = rms_norm(x.to(DEVICE), res.to(DEVICE) if residual else None, norm.weight.to(DEVICE), 1e-5)
    close(out, ref_out)
    close(new_res, ref_res)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (32, 8, 128), (12, 4, 80), (3, 1, 64)])
def test_rope_on_strided_q_and_k(dtype, heads, kv_heads, head_dim):
    from engine.layers.triton_fused import rope

    g = torch.Generator().manual_seed(heads)
    rot = RotaryEmbedding(head_dim, RopeConfig(theta=500000.0, kind="llama3", factor=8.0), 4096)
    t = 7
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)  # as the QKV projection
    q = qkv[:, :heads * head_dim].view(t, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(t, kv_heads, head_dim)
    pos = torch.tensor([0, 1, 5, 17, 1000, 4095, 3])
    ref_q, ref_k = rot(pos, q, k)
    qkv_d = qkv.to(DEVICE)
    out_q, out_k = rope(pos.to(DEVICE), qkv_d[:, :heads * head_dim].view(t, heads, head_dim),
                        qkv_d[:, heads * head_dim:(heads + kv_heads) * head_dim].view(t, kv_heads, head_dim),
                        rot.cos.to(DEVICE), rot.sin.to(DEVICE))
    close(out_q, ref_q)
    close(out_k, ref_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [128, 8192, 1000])
def test_silu_and_mul(dtype, n):
    from engine.layers.triton_fused import silu_and_mul

    x = (torch.randn(3, 2 * n, generator=torch.Generator().manual_seed(n)) * 4).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    close(silu_and_mul(x.to(DEVICE)), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (32, 8, 128), (12, 4, 80)])
def test_rope_and_store_equals_rope_then_store(dtype, heads, kv_heads, head_dim):
    """The decode path's one kernel writes exactly what `rope` + `store_kv` write: the rotated q, and the rotated
    k and the v in their cache slots, bit for bit; a padded row (slot -1) writes nothing."""
    from engine.layers.triton_fused import rope, rope_and_store
    from engine.layers.triton_paged_attention import store_kv

    g = torch.Generator().manual_seed(heads + head_dim)
    rot = RotaryEmbedding(head_dim, RopeConfig(theta=500000.0, kind="llama3", factor=8.0), 4096)
    t, block_size, num_blocks = 6, 16, 5
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype).to(DEVICE)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim), v.view(t, kv_heads, head_dim)
    pos = torch.tensor([0, 5, 17, 1000, 4095, 3], device=DEVICE)
    slots = torch.tensor([3, 16, -1, 79, 40, 0], device=DEVICE)
    cos, sin = rot.cos.to(DEVICE), rot.sin.to(DEVICE)
    caches = [torch.full((num_blocks, block_size, kv_heads, head_dim), 7.0, dtype=dtype, device=DEVICE)
              for _ in range(4)]
    ref_q, ref_k = rope(pos, q, k, cos, sin)
    store_kv(ref_k, v, caches[0], caches[1], slots)
    out_q = rope_and_store(pos, q, k, v, cos, sin, caches[2], caches[3], slots)
    assert torch.equal(out_q, ref_q)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
    written = (caches[2] != 7.0).any(-1).any(-1).flatten().nonzero().flatten().tolist()
    assert written == [0, 3, 16, 40, 79]  # the five real rows' slots, nothing for the padded one
