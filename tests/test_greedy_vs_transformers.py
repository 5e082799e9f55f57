"""Greedy output and logprobs against transformers' generate and log_softmax (float32)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM

PROMPTS = [
    [5, 17, 33, 100, 7, 9, 11],
    [200, 3],
    list(range(40, 77)),
    [9] * 19,
]


def hf_greedy(model_dir, prompt, max_new_tokens, stop_at_eos=False):
    """transformers' greedy continuation; like ignore_eos unless stop_at_eos (then it ends with EOS)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if not stop_at_eos:
        model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def hf_logprobs(model_dir, prompt, output):
    """log_softmax of the logits that predicted each output token: (len(output),)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].float()
    logq = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
    return logq.gather(1, torch.tensor(output)[:, None]).squeeze(1)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_single_and_batch_match_transformers(model_factory, arch):
    model_dir = model_factory(arch)
    llm = LLM(str(model_dir), show_progress=False)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
    expected = [hf_greedy(model_dir, p, 24) for p in PROMPTS]
    single = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    assert single.outputs[0].token_ids == expected[0]
    batch = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out, ref in zip(PROMPTS, batch, expected):
        assert out.outputs[0].token_ids == ref
        got = torch.tensor([lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, ref)])
        torch.testing.assert_close(got, hf_logprobs(model_dir, prompt, ref), atol=1e-4, rtol=0)
    assert llm.engine.main.kv.pool.num_free_blocks == llm.engine.main.kv.pool.num_blocks


def test_text_prompt_and_eos_stop(model_factory):
    model_dir = model_factory("llama")
    llm = LLM(str(model_dir), show_progress=False)
    tokenizer = llm.get_tokenizer()
    out = llm.generate("The quick brown fox", SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)[0]
    prompt_ids = tokenizer.encode("The quick brown fox")
    assert out.prompt_token_ids == prompt_ids
    ref = hf_greedy(model_dir, prompt_ids, 12, stop_at_eos=True)
    eos = tokenizer.eos_token_id
    ref = ref[: ref.index(eos) + 1] if eos in ref else ref
    assert out.outputs[0].token_ids == ref
    assert out.outputs[0].text == tokenizer.decode(ref, skip_special_tokens=True)
    assert out.outputs[0].finish_reason == ("stop" if ref[-1] == eos else "length")


def test_bfloat16_checkpoint_loads_and_matches_its_float32_logprobs(tmp_path, tokenizer_dir):
    from helpers import build_model

    model_dir = build_model(tmp_path / "bf16", tokenizer_dir, "llama", dtype=torch.bfloat16)
    llm = LLM(str(model_dir), show_progress=False)
    assert llm.engine.main.model.embed_tokens.weight.dtype == torch.bfloat16
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    ref = hf_logprobs(model_dir, PROMPTS[0], out.token_ids)
    got = torch.tensor([lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)])
    torch.testing.assert_close(got, ref, atol=0.1, rtol=0)


def test_prompt_logprobs_match_transformers(llama_dir):
    llm = LLM(str(llama_dir), show_progress=False, max_num_batched_tokens=256, max_num_seqs=8)
    prompt = list(range(40, 77))
    out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3), use_tqdm=False)[0]
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    with torch.no_grad():
        logq = torch.log_softmax(model(torch.tensor([prompt])).logits[0], dim=-1)
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry[prompt[pos]].logprob == pytest.approx(logq[pos - 1, prompt[pos]].item(), abs=1e-4)
        top3 = logq[pos - 1].topk(3).indices.tolist()
        assert set(top3) <= set(entry)
