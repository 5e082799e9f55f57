"""The CPU decode step in one C call (serving/models/cpu_step.c) against the layer-by-layer torch
path on the same inputs, layer by layer, and against transformers' bfloat16 logits; and where it
applies."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from counterpoint.serving.models import cpu_gemv, cpu_step
from counterpoint.serving.models.llama import LlamaForCausalLM

# NOTE: 8 of them, so that the C call's row loops run in parallel
PROMPTS = [[5, 17, 33, 100, 7, 9, 11], [200, 3], list(range(40, 77)), [9] * 19, [300], [41, 42], [8] * 5, [77, 1, 2]]
needs_step = pytest.mark.skipif(cpu_step._decode_layers() is None or not cpu_gemv.available(),
                                reason="no C compiler, or neither AVX-512 BF16 nor AVX2 on this CPU")


def both_paths(monkeypatch) -> list[dict]:
    """Makes every step whose rows the C call takes run the layers both ways on the same input,
    keeping the stream after each layer (the C call's first, then the torch path's); returns the record."""
    record, run_layers = [], LlamaForCausalLM.run_layers

    def run_both(model, x, residual, positions, ctx, first=0, capture=frozenset()):
        step = model.decode_layers
        if step is not None and step.takes(x, ctx):
            every = frozenset(range(first + 1, len(model.layers) + 1))
            streams = []
            for path in (step, None):
                model.decode_layers = path
                hidden, captured = run_layers(model, x, residual, positions, ctx, first, every)
                streams.append((hidden, captured))
            model.decode_layers = step
            record.append(dict(rows=x.shape[0], native=streams[0], layers=streams[1]))
        return run_layers(model, x, residual, positions, ctx, first, capture)

    monkeypatch.setattr(LlamaForCausalLM, "run_layers", run_both)
    return record


def assert_same_rounding(got: torch.Tensor, expected: torch.Tensor):
    """Equal, but where a float32 exponential (softmax, silu) lands on the other side of a bfloat16
    rounding: then within a couple of bfloat16 steps, and rarely."""
    step = expected.float().abs().clamp(min=1e-2) * 2**-6
    assert ((got.float() - expected.float()).abs() <= step).all()
    assert (got != expected).float().mean() < 0.02


@needs_step
@pytest.mark.parametrize("overrides", [
    {},  # 4 query heads over 2 kv heads, head size 16, llama3 rope
    # head size 32: rotary a vector at a time
    dict(hidden_size=192, num_attention_heads=6, num_key_value_heads=2, intermediate_size=256, num_hidden_layers=3),
])
def test_decode_layers_match_the_torch_path_layer_by_layer(model_factory, monkeypatch, overrides):
    model_dir = model_factory("llama", dtype=torch.bfloat16, **overrides)
    llm = LLM(str(model_dir), dtype="bfloat16", show_progress=False, max_num_seqs=8)
    assert llm.engine.main.model.decode_layers is not None
    record = both_paths(monkeypatch)
    llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert {step["rows"] for step in record} >= {len(PROMPTS)}  # every step after the prompts
    for step in record:
        (hidden, captured), (expected_hidden, expected) = step["native"], step["layers"]
        for k in expected:
            for got, want in zip(captured[k], expected[k]):
                assert_same_rounding(got, want)
        assert_same_rounding(hidden, expected_hidden)
    assert llm.engine.main.kv.pool.num_free_blocks == llm.engine.main.kv.pool.num_blocks


@needs_step
def test_greedy_logprobs_match_transformers_in_bfloat16(model_factory):
    """Each token's logprob, from decode steps in the C call, against transformers' forward pass over
    the whole sequence in bfloat16: within bfloat16's noise."""
    model_dir = model_factory("llama", dtype=torch.bfloat16)
    llm = LLM(str(model_dir), dtype="bfloat16", show_progress=False)
    assert llm.engine.main.model.decode_layers is not None
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1),
                        use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    for prompt, out in zip(PROMPTS, outs):
        tokens = out.outputs[0].token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens])).logits[0].float()
        expected = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(1, torch.tensor(tokens)[:, None])[:, 0]
        got = torch.tensor([lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, tokens)])
        torch.testing.assert_close(got, expected, atol=0.05, rtol=0)


@needs_step
@pytest.mark.parametrize("arch,dtype,invariant", [
    ("llama", torch.float32, False),  # float32 layers keep the torch path
    ("qwen2", torch.bfloat16, False),  # q/k/v biases
    ("qwen3", torch.bfloat16, False),  # q/k norms
    ("llama", torch.bfloat16, True),  # batch-invariant layers go one row at a time
])
def test_applies_only_where_the_c_call_computes_what_the_layers_would(model_factory, arch, dtype, invariant):
    model_dir = model_factory(arch, dtype=dtype)
    llm = LLM(str(model_dir), dtype=str(dtype).removeprefix("torch."), show_progress=False,
              batch_invariant=invariant)
    assert llm.engine.main.model.decode_layers is None


@needs_step
def test_more_rows_than_the_c_loop_takes_go_layer_by_layer(model_factory, monkeypatch):
    model_dir = model_factory("llama", dtype=torch.bfloat16)
    many = cpu_gemv.max_rows() + 1
    llm = LLM(str(model_dir), dtype="bfloat16", show_progress=False, max_num_seqs=many)
    record = both_paths(monkeypatch)
    outs = llm.generate([[7, i + 10] for i in range(many)], SamplingParams(max_tokens=3, temperature=0.0,
                                                                         ignore_eos=True), use_tqdm=False)
    assert len(outs) == many and all(len(out.outputs[0].token_ids) == 3 for out in outs)
    assert record == []  # NOTE: every decode step had `many` rows
