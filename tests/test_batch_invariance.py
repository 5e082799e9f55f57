"""`batch_invariant=True`: a request's tokens and logprobs are the same alone, inside batches of
several sizes, with its prompt prefilled in chunks, and after a prefix-cache hit, in bf16.

The CPU kernels of this machine happen to be batch-invariant already, so the tests also run
under a simulated kernel whose roundings depend on the number of rows, as AMX and GPU kernels'
do: without the flag that breaks invariance, with it nothing changes."""

import random

import pytest
import torch
import torch.nn.functional as F

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from counterpoint.serving.models.cpu_linear import PackedLinear
from test_greedy_vs_transformers import hf_greedy

PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)
RNG = random.Random(0)
TARGET = [RNG.randrange(3, 380) for _ in range(40)]
OTHERS = [[RNG.randrange(3, 380) for _ in range(RNG.randrange(2, 50))] for _ in range(7)]


@pytest.fixture(scope="module")
def bf16_dir(model_factory):
    return model_factory("llama", dtype=torch.bfloat16)


@pytest.fixture
def rows_dependent_linear(monkeypatch):
    """F.linear and the CPU's packed linear, whose results shift with the number of rows (a
    stand-in for kernels that block a batch by its size); one row at a time they are the real thing."""

    def rows_dependent(real):
        def linear(*args, **kwargs):
            out = real(*args, **kwargs)
            rows = out.reshape(-1, out.shape[-1]).shape[0]
            return out * (1 + 1e-2 * (rows - 1))

        return linear

    monkeypatch.setattr(F, "linear", rows_dependent(F.linear))
    monkeypatch.setattr(PackedLinear, "forward", rows_dependent(PackedLinear.forward))


def target_output(llm: LLM, others: list[list[int]]):
    """The target's (token ids, logprobs) when it runs in the middle of `others`."""
    prompts = others[: len(others) // 2] + [TARGET] + others[len(others) // 2:]
    out = llm.generate(prompts, PARAMS, use_tqdm=False)[len(others) // 2].outputs[0]
    return out.token_ids, [entry[token].logprob for token, entry in zip(out.token_ids, out.logprobs)]


def every_way(llm_args: dict) -> list:
    """The target alone, in batches of 3 and 8, prefilled in chunks, and after a prefix-cache hit."""
    llm = LLM(show_progress=False, enable_prefix_caching=False, **llm_args)
    results = [target_output(llm, []), target_output(llm, OTHERS[:2]), target_output(llm, OTHERS)]
    chunked = LLM(show_progress=False, enable_prefix_caching=False, max_num_batched_tokens=16, max_num_seqs=4,
                  **llm_args)
    results.append(target_output(chunked, OTHERS[:3]))
    cached = LLM(show_progress=False, **llm_args)
    cached.generate([TARGET[:33]], PARAMS, use_tqdm=False)
    results.append(target_output(cached, []))
    assert cached.engine.main.kv.pool.num_hits >= 2
    return results


def test_batch_invariant_mode_gives_one_answer_every_way(bf16_dir, rows_dependent_linear):
    results = every_way(dict(model=str(bf16_dir), batch_invariant=True))
    assert all(r == results[0] for r in results[1:])


def test_without_the_flag_the_simulated_kernel_does_break_invariance(bf16_dir, rows_dependent_linear):
    results = every_way(dict(model=str(bf16_dir)))
    assert any(r[1] != results[0][1] for r in results[1:])


def test_batch_invariant_mode_on_real_kernels_matches_transformers(llama_dir, bf16_dir):
    llm = LLM(str(llama_dir), show_progress=False, batch_invariant=True)
    got = llm.generate([TARGET], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), use_tqdm=False)
    assert got[0].outputs[0].token_ids == hf_greedy(llama_dir, TARGET, 10)
    results = every_way(dict(model=str(bf16_dir), batch_invariant=True))
    assert all(r == results[0] for r in results[1:])
