"""Sampling: seeded reproducibility, independence from the batch, and frequencies that match
the processed distribution computed here from the formulas of decoding/README.md."""

import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM

from counterpoint.decoding import SamplingParams
from counterpoint.decoding.processing import warp
from counterpoint.serving import LLM

PROMPT = [5, 17, 33, 100, 7, 9, 11]


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir), show_progress=False)


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, n=2, ignore_eos=True)
    alone = llm.generate([PROMPT], params, use_tqdm=False)[0]
    again = llm.generate([PROMPT], params, use_tqdm=False)[0]
    others = [SamplingParams(max_tokens=n, temperature=1.0, ignore_eos=True) for n in (5, 30, 9)]
    mixed = llm.generate([[1, 2, 3], PROMPT, [50] * 30, [7, 7]], [others[0], params, others[1], others[2]],
                         use_tqdm=False)[1]
    tokens = lambda out: [o.token_ids for o in out.outputs]  # noqa: E731
    assert tokens(alone) == tokens(again) == tokens(mixed)
    other_seed = llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=99, n=2,
                                                      ignore_eos=True), use_tqdm=False)[0]
    assert tokens(other_seed) != tokens(alone)


def test_a_tiny_temperature_samples_the_greedy_token(llama_dir, llm):
    """logits / 1e-40 overflows float32; the shift by the row max keeps it finite, so sampling
    picks transformers' greedy tokens instead of failing on a NaN distribution."""
    from test_greedy_vs_transformers import hf_greedy

    params = SamplingParams(max_tokens=8, temperature=1e-40, seed=3, ignore_eos=True)
    assert llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids == hf_greedy(llama_dir, PROMPT, 8)


def reference_distribution(logits: torch.Tensor, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """A slow, literal reading of decoding/README.md, "Process", steps 5-8 over one row."""
    z = (logits / temperature).tolist()
    order = sorted(range(len(z)), key=lambda v: -z[v])
    keep = set(order[:top_k] if top_k > 0 else order)
    probs = torch.softmax(torch.tensor([z[v] if v in keep else -float("inf") for v in range(len(z))]), 0)
    mass, kept_p = 0.0, set()
    for v in order:
        if v in keep and mass < top_p:
            kept_p.add(v)
            mass += probs[v].item()
    probs = torch.softmax(torch.tensor([z[v] if v in kept_p else -float("inf") for v in range(len(z))]), 0)
    probs = torch.where(probs < min_p * probs.max(), 0.0, probs)
    return probs / probs.sum()


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0),
    (0.7, 12, 1.0, 0.0),
    (1.3, 0, 0.6, 0.0),
    (1.0, 40, 0.9, 0.05),
])
def test_first_token_frequencies_match_processed_distribution(llama_dir, llm, temperature, top_k, top_p, min_p):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0, -1]
    logits = logits * 8  # sharpen the random model so the filters bite
    expected = reference_distribution(logits, temperature, top_k, top_p, min_p)
    bias = {v: float(logits[v] - logits[v] / 8) for v in range(logits.shape[0])}
    num_samples = 3000
    params = [SamplingParams(n=num_samples // 100, max_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
                             min_p=min_p, logit_bias=_clip(bias), seed=seed) for seed in range(100)]
    outs = llm.generate([PROMPT] * 100, params, use_tqdm=False)
    assert_first_tokens_follow(outs, expected, "sampled a token the filters remove")


def assert_first_tokens_follow(outs, expected: torch.Tensor, outside_message: str) -> None:
    """The first tokens of all outputs never leave the support of `expected` and pass a
    chi-square test against it."""
    counts = torch.zeros_like(expected)
    for out in outs:
        for o in out.outputs:
            counts[o.token_ids[0]] += 1
    support = expected > 0
    assert counts[~support].sum() == 0, outside_message
    observed, exp = _pool_rare(counts[support].double(), expected[support].double() * counts.sum().item())
    exp = [e * sum(observed) / sum(exp) for e in exp]  # float rounding only
    assert chisquare(observed, exp).pvalue > 1e-3


def _clip(bias: dict[int, float]) -> dict[int, float]:
    assert all(abs(b) <= 100 for b in bias.values())
    return bias


def _pool_rare(observed: torch.Tensor, expected: torch.Tensor, min_expected: float = 5.0):
    """Merge categories with small expected counts into one, as the chi-square test requires."""
    rare = expected < min_expected
    obs = observed[~rare].tolist() + ([observed[rare].sum().item()] if rare.any() else [])
    exp = expected[~rare].tolist() + ([expected[rare].sum().item()] if rare.any() else [])
    return obs, exp


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (0.8, 0, 0.9, 0.0),
    (1.0, 50, 1.0, 0.0),
    (1.0, 3000, 0.95, 0.0),
    (1.2, 0, 0.99, 0.02),
])
def test_warp_keeps_what_the_formulas_keep_on_sharp_and_flat_rows(temperature, top_k, top_p, min_p):
    """warp looks at each row's best tokens first and widens only where the cut lies beyond them: a
    sharp row stays within the first candidates, a flat one needs the whole vocabulary."""
    gen = torch.Generator().manual_seed(top_k)
    flat = torch.randn(8192, generator=gen)
    sharp = flat * 6
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    for row in (sharp, flat):
        probs = torch.softmax(warp(row[None].clone(), [params]), dim=-1)[0]
        expected = reference_distribution(row, temperature, top_k, top_p, min_p)
        assert torch.equal(probs > 0, expected > 0)
        torch.testing.assert_close(probs, expected.float(), atol=1e-6, rtol=1e-4)
