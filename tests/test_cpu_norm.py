"""The CPU path's C RMSNorm (serving/models/cpu_norm.c) against transformers' LlamaRMSNorm, and the
model's norms taking it only where it applies."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from counterpoint.serving.models import cpu_norm
from counterpoint.serving.models.llama import RMSNorm

needs_native = pytest.mark.skipif(cpu_norm.native.load(cpu_norm.SOURCE) is None, reason="no C compiler here")


def reference(dim: int, dtype, seed: int) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(dim, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return norm


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,dim", [(1, 576), (5, 64), (33, 2048)])  # one row, a head's norm, rows in parallel
@torch.no_grad()
def test_matches_transformers(dtype, rows, dim):
    norm = reference(dim, dtype, rows)
    gen = torch.Generator().manual_seed(dim)
    x, residual = (torch.randn(rows, dim, generator=gen) * 3).to(dtype), torch.randn(rows, dim, generator=gen).to(dtype)
    out, total = cpu_norm.add_rms_norm(x, residual, norm.weight, 1e-5)
    assert torch.equal(total, x + residual)
    # NOTE: float32 sums of squares in another order: a last-bit difference at most, gone in bfloat16
    tolerance = dict(atol=0, rtol=0) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out, norm(x + residual), **tolerance)
    torch.testing.assert_close(cpu_norm.add_rms_norm(x, None, norm.weight, 1e-5), norm(x), **tolerance)


@needs_native
@torch.no_grad()
def test_model_norm_takes_it_where_it_applies(monkeypatch):
    calls = []
    real = cpu_norm.add_rms_norm
    monkeypatch.setattr(cpu_norm, "add_rms_norm", lambda *args: calls.append(args) or real(*args))
    norm = RMSNorm(64, 1e-6)
    norm(torch.randn(3, 64))
    assert len(calls) == 1
    norm(torch.randn(3, 4, 64))  # a per-head norm (Qwen3's q/k norm): (T, heads, dim)
    RMSNorm(40, 1e-6)(torch.randn(3, 40))  # a width that is not a multiple of 16 is not taken
    with torch.enable_grad():
        norm(torch.randn(3, 64))  # autograd cannot see into the C call
    assert len(calls) == 1
