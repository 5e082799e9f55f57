"""The CPU's packed linear layers against torch's own F.linear, and the engine's choice of them."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from counterpoint.serving import LLM
from counterpoint.serving.models.cpu_linear import PackedLinear, compute_dtype, pack_linears, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch has no oneDNN linear")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 17, 130])
def test_float32_matches_f_linear(bias, rows):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 200, bias=bias)
    x = torch.randn(rows, 96)
    out = PackedLinear(linear)(x)
    assert out.dtype == torch.float32 and out.shape == (rows, 200)
    torch.testing.assert_close(out, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_bfloat16_matches_a_float32_product_rounded_to_bfloat16(rows):
    """Whatever it computes in, a bfloat16 layer returns bfloat16 within one rounding of the exact
    product of its bfloat16 inputs."""
    torch.manual_seed(rows)
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    out = PackedLinear(linear)(x)
    exact = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), exact, rtol=2 ** -7, atol=1e-2)


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU flags from /proc/cpuinfo")
def test_bfloat16_computes_natively_exactly_where_the_cpu_has_the_instructions():
    """oneDNN's bfloat16 linear needs AVX-512 BW+VL+DQ or AVX-NE-CONVERT: read off the CPU's flags."""
    flags = cpu_flags()
    native = {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags
    assert compute_dtype(torch.bfloat16) == (torch.bfloat16 if native else torch.float32)
    assert compute_dtype(torch.float32) == torch.float32
    assert compute_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16


def test_pack_linears_swaps_float_linears_only():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4), nn.ReLU()), nn.Embedding(10, 8))
    assert pack_linears(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[1][0], PackedLinear)
    assert isinstance(model[2], nn.Embedding)


def test_engine_packs_its_cpu_linears_unless_batch_invariant(llama_dir):
    packed = LLM(str(llama_dir), show_progress=False).engine.main.model
    rowwise = LLM(str(llama_dir), show_progress=False, batch_invariant=True).engine.main.model
    assert isinstance(packed.lm_head, PackedLinear) and isinstance(packed.layers[0].mlp.down_proj, PackedLinear)
    assert not any(isinstance(m, PackedLinear) for m in rowwise.modules())
