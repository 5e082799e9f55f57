"""Greedy outputs stay the same under prefix caching, tiny chunked prefill and preemption.

The reference is transformers' greedy generate; every run must leave the KV pool full again.
"""

import pytest

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from test_greedy_vs_transformers import hf_greedy

SHARED = list(range(100, 140))  # 40 tokens: 2 full blocks of 16 shared by every prompt
PROMPTS = [SHARED + [7, 8, 9], SHARED + list(range(300, 330)), [3, 4, 5, 6], SHARED + [11] * 21, [42] * 50, SHARED]
MAX_TOKENS = 20

CONFIGS = {
    "prefix_cache_on": dict(enable_prefix_caching=True),
    "prefix_cache_off": dict(enable_prefix_caching=False),
    "chunked_prefill_7": dict(max_num_batched_tokens=7, max_num_seqs=4),
    "preemption": dict(num_blocks=14, max_num_seqs=6, max_num_batched_tokens=64),
    "preemption_and_chunks": dict(num_blocks=12, block_size=8, max_num_seqs=3, max_num_batched_tokens=9),
}


@pytest.fixture(scope="module")
def expected(llama_dir):
    return [hf_greedy(llama_dir, p, MAX_TOKENS) for p in PROMPTS]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_is_invariant_to_scheduling(llama_dir, expected, name):
    llm = LLM(str(llama_dir), show_progress=False, **CONFIGS[name])
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    # Twice: the second round hits the prefix cache the first round filled.
    for _ in range(2):
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
    pool = llm.engine.main.kv.pool
    assert pool.num_free_blocks == pool.num_blocks
    if name.startswith("preemption"):
        assert llm.engine.scheduler.preemptions.total() > 0
    if name == "prefix_cache_on":
        assert pool.num_hits > 0
    if name == "prefix_cache_off":
        assert pool.num_hits == 0


def test_parallel_sampling_forks_share_blocks_and_match_transformers(llama_dir):
    """n > 1 forks the prompt's blocks (copy-on-write of the partial one); every hypothesis'
    reported logprobs must equal transformers' log_softmax over its own tokens."""
    import torch
    from test_greedy_vs_transformers import hf_logprobs

    llm = LLM(str(llama_dir), show_progress=False, num_blocks=24, max_num_seqs=8)
    prompt = SHARED + [7, 8, 9]  # 43 tokens: the third block is partial when the fork happens
    out = llm.generate([prompt], SamplingParams(n=4, max_tokens=12, seed=3, ignore_eos=True, logprobs=0),
                       use_tqdm=False)[0]
    assert len(out.outputs) == 4
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:
        got = torch.tensor([lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)])
        torch.testing.assert_close(got, hf_logprobs(llama_dir, prompt, o.token_ids), atol=1e-4, rtol=0)
    pool = llm.engine.main.kv.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_abort_frees_blocks(llama_dir):
    llm = LLM(str(llama_dir), show_progress=False)
    engine = llm.engine
    engine.add_request("a", PROMPTS[1], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True, n=3))
    for _ in range(3):
        engine.step()
    assert engine.abort_request("b").outputs[0].finish_reason == "abort"
    assert engine.abort_request("a").finished
    assert not engine.has_unfinished_requests()
    assert engine.main.kv.pool.num_free_blocks == engine.main.kv.pool.num_blocks
