"""The combine stage's C loops on the CPU (serving/engine/cpu_combine.c) against the torch code they
replace (decoding/combine/contrastive.dense, acd.entropy, adacad.jsd) and against the formulas in float64,
and the methods taking them only where they apply."""

import math

import pytest
import torch

from counterpoint.decoding.combine import acd, adacad, combine, contrastive
from counterpoint.decoding.params import ContextContrastParams, ContrastiveParams
from counterpoint.serving.engine import cpu_combine

needs_native = pytest.mark.skipif(cpu_combine.native.load(cpu_combine.SOURCE) is None, reason="no C compiler here")
# α, β, τ per row: the defaults, a wide head, a one-token head, no amateur, and τ at both extremes
ROWS = [(0.1, 0.5, 1.0), (1e-3, 1.0, 0.5), (1.0, 0.5, 1.0), (0.1, 0.0, 1.0), (0.5, 2.0, 1e-30), (0.1, 0.5, 1e30)]


def _inputs(rows: int, vocab: int, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    z_e, z_a = ((torch.randn(rows, vocab + 16, generator=gen) * 4).to(dtype)[:, :vocab] for _ in range(2))
    params = [ContrastiveParams(amateur="a", alpha=a, beta=b, amateur_temperature=t) for a, b, t in ROWS[:rows]]
    return z_e, z_a, params


def _row_values(params):
    def col(name):
        return torch.tensor([[getattr(p, name)] for p in params], dtype=torch.float32)

    tau = col("amateur_temperature").clamp(min=torch.finfo(torch.float32).tiny, max=torch.finfo(torch.float32).max)
    return col("alpha"), col("beta"), tau


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,vocab", [(1, 64), (6, 49152)])
def test_contrastive_matches_the_torch_code(dtype, rows, vocab):
    z_e, z_a, params = _inputs(rows, vocab, dtype, seed=rows)
    alpha, beta, tau = _row_values(params)
    fused = cpu_combine.contrastive(z_e, z_a, alpha, beta, tau)
    expected = contrastive.dense(z_e.float(), z_a.float(), alpha, beta, tau)
    assert torch.equal(torch.isneginf(fused), torch.isneginf(expected))  # the same head, token for token
    head = ~torch.isneginf(expected)
    # NOTE: float32 exponentials and sums in another order: a few ulps of log-probabilities up to ~10
    torch.testing.assert_close(fused[head], expected[head], atol=2e-5, rtol=1e-5)


@needs_native
def test_contrastive_matches_the_formula_written_out():
    z_e, z_a, params = _inputs(3, 64, torch.float32, seed=7)
    alpha, beta, tau = _row_values(params)
    fused = cpu_combine.contrastive(z_e, z_a, alpha, beta, tau)
    for r, p in enumerate(params):  # in float64, but the head by the float32 test that defines it
        e, a = z_e[r].double(), z_a[r].double()
        log_p_e = torch.log_softmax(e, dim=-1)
        log_p_a = torch.log_softmax(a / p.amateur_temperature, dim=-1).clamp(min=contrastive.LOG_FLOOR)
        head = z_e[r] >= z_e[r].max() + torch.log(alpha[r])
        expected = torch.where(head, log_p_e - p.beta * log_p_a, -math.inf).float()
        torch.testing.assert_close(fused[r], expected, atol=2e-5, rtol=1e-5)


@needs_native
def test_contrastive_takes_it_only_where_it_applies(monkeypatch):
    calls = []
    real = cpu_combine.contrastive

    def spy(*args):
        out = real(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setitem(contrastive.FUSED, "cpu", spy)
    for vocab, taken in [(64, True), (72, False)]:  # the C loop wants the vocabulary in whole vectors
        z_e, z_a, params = _inputs(2, vocab, torch.bfloat16, seed=vocab)
        out = combine("contrastive", z_e, z_a, params, [1, 1]).logits
        alpha, beta, tau = _row_values(params)
        torch.testing.assert_close(out, contrastive.dense(z_e.float(), z_a.float(), alpha, beta, tau),
                                   atol=2e-5, rtol=1e-5)
        assert calls[-1] is taken


def _entropy_inputs(dtype):
    """Random rows, a one-hot row (−inf elsewhere: H = 0), a uniform row (H = ln V), a peaked one."""
    z = torch.randn(5, 49152, generator=torch.Generator().manual_seed(3)) * 4
    z[1] = -math.inf
    z[1, 17] = 2.0
    z[2] = 0.5
    z[3, 100] = 90.0
    z[4, :1000] = -math.inf
    return z.to(dtype)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_entropy_matches_the_torch_code_and_the_formula(dtype, monkeypatch):
    z = _entropy_inputs(dtype)
    fused = cpu_combine.entropy(z)
    monkeypatch.delitem(acd.FUSED, "cpu", raising=False)
    torch.testing.assert_close(fused, acd.entropy(z.float()), atol=2e-5, rtol=1e-5)
    p = torch.softmax(z.double(), dim=-1)
    expected = torch.special.entr(p).sum(dim=-1).float()
    torch.testing.assert_close(fused, expected, atol=2e-5, rtol=1e-5)
    assert fused[1] == 0 and abs(fused[2] - math.log(49152)) < 1e-5


@needs_native
def test_acd_takes_it_only_where_it_applies(monkeypatch):
    calls = []

    def spy(z):
        out = cpu_combine.entropy(z)
        calls.append(out is not None)
        return out

    monkeypatch.setitem(acd.FUSED, "cpu", spy)
    for vocab, taken in [(64, True), (72, False)]:
        z_ctx, z_noctx, _ = _inputs(2, vocab, torch.float32, seed=vocab)
        fused = combine("acd", z_ctx, z_noctx, [None, None], [1, 1])
        assert calls[-2:] == [taken, taken]
        monkeypatch.delitem(acd.FUSED, "cpu")
        reference = combine("acd", z_ctx, z_noctx, [None, None], [1, 1])
        monkeypatch.setitem(acd.FUSED, "cpu", spy)
        torch.testing.assert_close(fused.logits, reference.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused.weights, reference.weights, atol=1e-6, rtol=1e-5)


def _jsd_inputs(dtype):
    """Random pairs at several scales, a pair of equal rows (JSD 0), two one-hot rows on different
    tokens (ln 2, as far apart as two distributions get), a row with −inf logits."""
    gen = torch.Generator().manual_seed(5)
    z_p = torch.randn(6, 49152, generator=gen) * torch.tensor([[0.1], [1.0], [5.0], [1.0], [1.0], [3.0]])
    z_q = z_p + torch.randn(6, 49152, generator=gen)
    z_q[3] = z_p[3]
    z_p[4], z_q[4] = -math.inf, -math.inf
    z_p[4, 1], z_q[4, 2] = 0.0, 0.0
    z_p[5, :500] = -math.inf
    return z_p.to(dtype), z_q.to(dtype)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_jsd_matches_the_torch_code_and_the_formula(dtype, monkeypatch):
    z_p, z_q = _jsd_inputs(dtype)
    fused = cpu_combine.jsd(z_p, z_q)
    monkeypatch.delitem(adacad.FUSED, "cpu", raising=False)
    torch.testing.assert_close(fused, adacad.jsd(z_p.float(), z_q.float()), atol=2e-6, rtol=1e-5)
    p, q = (torch.softmax(z.double(), dim=-1).clamp(min=adacad.PROB_FLOOR) for z in (z_p, z_q))
    m = (p + q) / 2
    expected = 0.5 * (p * (p / m).log()).sum(dim=-1) + 0.5 * (q * (q / m).log()).sum(dim=-1)
    torch.testing.assert_close(fused, expected.float(), atol=2e-6, rtol=1e-5)
    assert abs(fused[3]) < 1e-6 and abs(fused[4] - math.log(2)) < 1e-4


@needs_native
def test_adacad_takes_it_only_where_it_applies(monkeypatch):
    calls = []

    def spy(z_p, z_q):
        out = cpu_combine.jsd(z_p, z_q)
        calls.append(out is not None)
        return out

    params = [ContextContrastParams("adacad", min_alpha=0.0)] * 2
    for vocab, taken in [(64, True), (72, False)]:
        z_ctx, z_noctx, _ = _inputs(2, vocab, torch.float32, seed=vocab)
        monkeypatch.setitem(adacad.FUSED, "cpu", spy)
        fused = combine("adacad", z_ctx, z_noctx, params, [1, 1])
        assert calls[-1] is taken
        monkeypatch.delitem(adacad.FUSED, "cpu")
        reference = combine("adacad", z_ctx, z_noctx, params, [1, 1])
        torch.testing.assert_close(fused.logits, reference.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused.weights, reference.weights, atol=1e-6, rtol=1e-5)
