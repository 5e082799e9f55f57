"""Greedy, sampling, beam search and contrastive requests in one batch: each gets the output it
gets alone, under preemption too, and every block of both models' pools comes back."""

import dataclasses

import pytest

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM

SHARED = list(range(100, 140))
CD = {"amateur": "amateur", "alpha": 0.2, "beta": 0.8}
WORKLOAD = [  # (prompt, params)
    (SHARED + [7, 8, 9], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)),
    (SHARED + [1, 2], SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=5, n=2, ignore_eos=True)),
    (SHARED + [7, 8, 9], SamplingParams(max_tokens=12, use_beam_search=True, n=2, best_of=3, ignore_eos=True)),
    ([5, 17, 33], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, contrastive=CD)),
    (SHARED[:20], SamplingParams(max_tokens=12, use_beam_search=True, n=2, best_of=2, contrastive=CD,
                                 ignore_eos=True)),
    ([9] * 30, SamplingParams(max_tokens=12, temperature=1.0, seed=11, contrastive=CD, logprobs=2,
                              ignore_eos=True)),
    (SHARED + [50], SamplingParams(max_tokens=12, use_beam_search=True, n=1, best_of=4, length_penalty=0.5,
                                   ignore_eos=True)),
]


def tokens(out):
    return [o.token_ids for o in out.outputs]


@pytest.fixture(scope="module")
def alone(llama_dir, amateur_dir):
    llm = LLM(str(llama_dir), amateur=str(amateur_dir), show_progress=False)
    return [tokens(llm.generate([prompt], params, use_tqdm=False)[0]) for prompt, params in WORKLOAD]


@pytest.mark.parametrize("engine_args", [
    dict(),
    dict(num_blocks=16, block_size=8, max_num_seqs=8, max_num_batched_tokens=64),
], ids=["roomy", "preempting"])
def test_mixed_batch_gives_each_request_its_solo_output(llama_dir, amateur_dir, alone, engine_args):
    llm = LLM(str(llama_dir), amateur=str(amateur_dir), show_progress=False, **engine_args)
    outs = llm.generate([p for p, _ in WORKLOAD], [params for _, params in WORKLOAD], use_tqdm=False)
    assert [tokens(o) for o in outs] == alone
    for slot in llm.engine.slots.values():
        assert slot.kv.pool.num_free_blocks == slot.kv.pool.num_blocks, slot.name
    if engine_args:
        beams = [o for o, (_, params) in zip(outs, WORKLOAD) if params.use_beam_search]
        assert any(o.metrics.num_preemptions > 0 for o in beams), "no beam search was preempted"


def test_max_num_seqs_counts_each_models_batch(llama_dir, amateur_dir):
    """A contrastive request holds one sequence on each model, so it runs with max_num_seqs=1;
    a beam wider than the batch is refused up front instead of waiting forever."""
    llm = LLM(str(llama_dir), amateur=str(amateur_dir), show_progress=False, max_num_seqs=1)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, contrastive=CD)
    outs = llm.generate([[5, 17, 33], [7, 8]], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4]
    with pytest.raises(ValueError, match="best_of must be <= max_num_seqs") as err:
        llm.generate([[5, 17]], SamplingParams(use_beam_search=True, n=1, best_of=2), use_tqdm=False)
    assert err.value.param == "best_of"


def test_mixed_batch_on_the_triton_kernels_and_decode_graphs(llama_dir, amateur_dir):
    """The same batch through the Triton kernels and both models' decode-graph buffers (replayed
    eagerly off CUDA): beam forks copy their blocks before the replay, amateur streams replay
    their own model's graphs, and every request still gets the torch path's solo output.
    NOTE: 6 new tokens, not 12: Triton's interpreter is slow, and 6 steps cover every fork."""
    workload = [(prompt, dataclasses.replace(params, max_tokens=6)) for prompt, params in WORKLOAD]
    torch_path = LLM(str(llama_dir), amateur=str(amateur_dir), show_progress=False)
    alone = [tokens(torch_path.generate([prompt], params, use_tqdm=False)[0]) for prompt, params in workload]
    llm = LLM(str(llama_dir), amateur=str(amateur_dir), attention_backend="triton", dtype="float32",
              max_num_seqs=16, show_progress=False)
    slots = list(llm.engine.slots.values())
    for slot in slots:
        slot.runner.capture_decode_graphs([1, 2, 4, 8, 16], slot.max_model_len, show_progress=False)
    outs = llm.generate([p for p, _ in workload], [params for _, params in workload], use_tqdm=False)
    assert [tokens(o) for o in outs] == alone
    assert all(slot.runner.graphs.replays > 0 for slot in slots)
    assert all(slot.kv.pool.num_free_blocks == slot.kv.pool.num_blocks for slot in slots)
