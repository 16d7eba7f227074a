"""The one-row Triton matmuls (`engine.layers.triton_linear`) against the torch code they replace.

Runs on CUDA; without a GPU, float32 cases run in Triton's interpreter when triton is installed and
TRITON_INTERPRET=1, otherwise everything is skipped.
"""

import pytest
import torch
from triton_device import DEVICE, DTYPES, MARKS

from engine.layers.norm import RMSNorm

pytestmark = MARKS
CONFIG = (16, 128, 4, 2)  # small tiles: the test matrices are small


def close(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = dict(rtol=1e-4, atol=1e-4) if ref.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.cpu().float(), ref.cpu().float(), **tol)


def rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 48, 512), (1, 100, 1024), (5, 40, 256), (16, 64, 384)])
def test_skinny_linear(dtype, m, n, k):
    from engine.layers.triton_linear import skinny_linear

    x, w = rand(m, k, dtype=dtype, seed=m), rand(n, k, dtype=dtype, seed=n) * 0.1
    close(skinny_linear(x, w, CONFIG), (x.float() @ w.float().T).to(dtype))
    if k % 512 == 0:  # the default one-row config
        close(skinny_linear(x, w), (x.float() @ w.float().T).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,residual", [(1, True), (1, False), (3, True)])
def test_norm_linear_equals_norm_then_matmul(dtype, m, residual):
    from engine.layers.triton_linear import norm_linear

    k, n = 512, 80
    x = rand(m, k, dtype=dtype, seed=1) * 3
    res = rand(m, k, dtype=dtype, seed=2) if residual else None
    w = rand(n, k, dtype=dtype, seed=3) * 0.1
    norm = RMSNorm(k, 1e-5).to(dtype)
    norm.weight.copy_(torch.rand(k, generator=torch.Generator().manual_seed(4)) + 0.5)
    ref_h, ref_res = norm(x.cpu(), res.cpu() if residual else None)  # the torch code
    out, new_res = norm_linear(x, res, norm.weight.to(DEVICE), 1e-5, w, CONFIG)
    close(out, (ref_h.float() @ w.cpu().float().T).to(dtype))
    if residual:
        assert torch.equal(new_res.cpu(), ref_res)  # the next layer's residual, exactly x + residual
    else:
        assert new_res is x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 4])
def test_silu_linear_equals_silu_then_matmul(dtype, m):
    from engine.layers.triton_linear import silu_linear

    k, n = 256, 48
    gate_up = rand(m, 2 * k, dtype=dtype, seed=5) * 4
    w = rand(n, k, dtype=dtype, seed=6) * 0.1
    gate, up = gate_up.cpu().chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) * up
    close(silu_linear(gate_up, w, CONFIG), (act.float() @ w.cpu().float().T).to(dtype))


def test_one_row_kernel_choice_for_llama_shapes():
    from engine.layers.triton_linear import prefers_skinny

    # (n, k): 1B qkv, o, gate_up, down, LM head; then the 8B's
    assert [prefers_skinny(n, k) for n, k in [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192),
                                               (128256, 2048)]] == [True, True, False, False, True]
    assert [prefers_skinny(n, k) for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
                                               (128256, 4096)]] == [True, True, False, False, True]
    assert not prefers_skinny(2048, 2000)  # k not a multiple of the kernel's tile: cuBLAS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the engine's decode graphs)")
def test_batch_one_decode_through_one_row_kernels_matches_hf(tmp_path, monkeypatch):
    """A model wide enough for the one-row kernels (hidden 512): a single request's decode steps run q/k/v with
    the input norm fused, o and the LM head through them (counted), and its greedy tokens equal HF's."""
    from checkpoints import hf_greedy, make_checkpoint
    from engine import LLM, SamplingParams
    from engine.layers import triton_linear

    calls = {"norm_linear": 0, "skinny_linear": 0}
    for name in calls:
        real = getattr(triton_linear, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(triton_linear, name, counted)
    path = make_checkpoint(str(tmp_path / "wide"), hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                           num_key_value_heads=2, initializer_range=0.05)
    prompt = [[5, 77, 300, 12, 9, 41, 250]]
    out = LLM(path, dtype="float32", device="cuda", kv_cache_memory=1 << 28).generate(
        prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert out[0].token_ids == hf_greedy(path, prompt, 24, device="cuda")[0]
    # 2 layers: one fused norm + q/k/v each; o of each layer and the LM head (at least the batch-1 graph's capture)
    assert calls["norm_linear"] >= 2 and calls["skinny_linear"] >= 3
