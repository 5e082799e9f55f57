"""The CPU's C linear loop for few rows (serving/models/cpu_gemv.c) against torch's float32 product
rounded to bfloat16, and PackedLinear taking it exactly where it applies."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from counterpoint.serving.models import cpu_gemv
from counterpoint.serving.models.cpu_linear import PackedLinear, compute_dtype, packing_available

needs_gemv = pytest.mark.skipif(not cpu_gemv.available(),
                                reason="no C compiler, or neither AVX-512 BF16 nor AVX2 on this CPU")


def bf16_linear(out_features: int, in_features: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)


def assert_within_one_rounding(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """Equal to the float32 product rounded to bfloat16, but where float32 sums in another order
    land on the other side of a rounding boundary: then about one bfloat16 step away, and rarely."""
    reference = F.linear(x.float(), weight.float())
    expected = reference.to(torch.bfloat16)
    # NOTE: plus float32 summation error, which counts where the products cancel to a tiny sum
    summed = F.linear(x.float().abs(), weight.float().abs())
    step = expected.float().abs() * 2**-7 + summed * 2**-16
    assert ((out.float() - expected.float()).abs() <= step).all()
    assert (out != expected).float().mean() < 0.01


@needs_gemv
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16, 33, 130])
@pytest.mark.parametrize("out_features,in_features", [(8, 32), (48, 64), (960, 576), (576, 1536)])
@torch.inference_mode()
def test_matches_a_float32_product_rounded_to_bfloat16(rows, out_features, in_features):
    linear = bf16_linear(out_features, in_features, rows)
    x = torch.randn(rows, in_features, dtype=torch.bfloat16) * 4
    out = cpu_gemv.linear(x, linear.weight)
    assert out.shape == (rows, out_features) and out.dtype == torch.bfloat16
    assert_within_one_rounding(out, x, linear.weight)


@needs_gemv
@torch.inference_mode()
def test_rows_may_be_a_strided_view():
    """The model hands it column slices of a wider tensor (q, k, v split from one projection)."""
    linear = bf16_linear(64, 96, 0)
    wide = torch.randn(3, 160, dtype=torch.bfloat16)
    x = wide[:, 32:128]
    assert not x.is_contiguous()
    assert torch.equal(cpu_gemv.linear(x, linear.weight), cpu_gemv.linear(x.contiguous(), linear.weight))
    assert_within_one_rounding(cpu_gemv.linear(x, linear.weight), x, linear.weight)


@needs_gemv
@torch.inference_mode()
def test_infinities_and_nans_come_out_as_torch_rounds_them():
    """inf·0 is NaN and rounds to a NaN, not to an infinity; an overflow to inf stays inf."""
    weight = torch.zeros(8, 32, dtype=torch.bfloat16)
    weight[4:, 0] = 1
    x = torch.zeros(2, 32, dtype=torch.bfloat16)
    x[0, 0] = float("inf")
    out, expected = cpu_gemv.linear(x, weight), F.linear(x.float(), weight.float()).to(torch.bfloat16)
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().any()
    assert torch.equal(out.nan_to_num(0), expected.nan_to_num(0))


@needs_gemv
def test_supports_only_the_layers_it_can_read():
    assert cpu_gemv.supports(bf16_linear(8, 64, 0))
    assert not cpu_gemv.supports(nn.Linear(64, 8, bias=True, dtype=torch.bfloat16))
    assert not cpu_gemv.supports(nn.Linear(64, 8, bias=False))  # float32
    assert not cpu_gemv.supports(bf16_linear(8, 48, 0))  # in_features not a multiple of 32
    assert not cpu_gemv.supports(bf16_linear(6, 64, 0))  # out_features not a multiple of 4


@needs_gemv
@pytest.mark.skipif(not packing_available(), reason="this torch has no oneDNN linear")
@torch.inference_mode()
def test_packed_linear_takes_the_c_loop_up_to_max_rows_then_a_gemm():
    """The C loop for few rows, on the row-major weight. Beyond, where oneDNN multiplies bfloat16
    natively, F.linear on that same weight (one copy); where it would emulate bfloat16 (AVX2),
    oneDNN on a packed float32 copy. oneDNN's packed weight is also held when asked (c_loop=False)."""
    linear = bf16_linear(96, 64, 1)
    layer = PackedLinear(linear)
    native = compute_dtype(torch.bfloat16) == torch.bfloat16
    assert layer.gemv and (layer.packed is None) == native
    few = torch.randn(cpu_gemv.max_rows(), 64, dtype=torch.bfloat16)
    assert torch.equal(layer(few), cpu_gemv.linear(few, linear.weight))
    many = torch.randn(cpu_gemv.max_rows() + 1, 64, dtype=torch.bfloat16)
    if native:
        assert torch.equal(layer(many), F.linear(many, linear.weight))
    else:
        onednn = torch.ops.mkldnn._linear_pointwise(many.float(), layer.packed, None, "none", [], "")
        assert torch.equal(layer(many), onednn.to(torch.bfloat16))
    packed = PackedLinear(linear, c_loop=False)
    assert not packed.gemv
    onednn = torch.ops.mkldnn._linear_pointwise(few.to(packed.compute_dtype), packed.packed, None, "none", [], "")
    assert torch.equal(packed(few), onednn.to(torch.bfloat16))
    assert_within_one_rounding(packed(few), few, linear.weight)


