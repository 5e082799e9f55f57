"""Greedy decoding with bias, min_tokens and penalties against a slow loop written here from
decoding/README.md, "Process", on transformers' logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM

PROMPT = [5, 17, 33, 17, 5, 9, 11, 11, 11]


def reference_greedy(model, prompt, steps, eos, rep=1.0, presence=0.0, frequency=0.0, bias=None, min_tokens=0):
    out = []
    for _ in range(steps):
        with torch.no_grad():
            z = model(torch.tensor([prompt + out])).logits[0, -1].tolist()
        for tok, b in (bias or {}).items():
            z[tok] += b
        if len(out) < min_tokens:
            z[eos] = -float("inf")
        for tok in set(prompt) | set(out):
            z[tok] = z[tok] / rep if z[tok] > 0 else z[tok] * rep
        for tok in set(out):
            z[tok] -= out.count(tok) * frequency + presence
        out.append(max(range(len(z)), key=lambda v: z[v]))
    return out


CASES = [
    dict(rep=1.3),
    dict(rep=0.8),
    dict(presence=1.5),
    dict(frequency=0.7),
    dict(rep=1.2, presence=0.5, frequency=0.3),
    dict(bias={7: 5.0, 11: -100.0}),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_penalised_greedy_matches_reference(llama_dir, case):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    llm = LLM(str(llama_dir), show_progress=False)
    eos = llm.get_tokenizer().eos_token_id
    expected = reference_greedy(model, PROMPT, 16, eos, **case)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, repetition_penalty=case.get("rep", 1.0),
                            presence_penalty=case.get("presence", 0.0), frequency_penalty=case.get("frequency", 0.0),
                            logit_bias=case.get("bias"))
    assert llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids == expected


def test_min_tokens_bans_eos_until_reached(llama_dir, tokenizer_dir):
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tokenizer_dir).eos_token_id
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    llm = LLM(str(llama_dir), show_progress=False)
    # A bias makes EOS the argmax everywhere; min_tokens must hold it off for 5 tokens.
    params = SamplingParams(max_tokens=12, temperature=0, min_tokens=5, logit_bias={eos: 30.0})
    out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    expected = reference_greedy(model, PROMPT, 6, eos, bias={eos: 30.0}, min_tokens=5)
    assert out.token_ids == expected and expected[-1] == eos
    assert out.finish_reason == "stop"


def test_an_extreme_repetition_penalty_samples_without_failing(llama_dir):
    """rep = 1e-45 divides positive logits of seen tokens past float32's range; sampling must still
    run (it used to meet inf − inf = NaN), and only seen tokens can win: they are the only ones
    pushed up, and any seen token with a positive logit ends above every unseen one."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    with torch.no_grad():
        z = model(torch.tensor([PROMPT])).logits[0, -1]
    assert (z[PROMPT] / 1e-45).isinf().any(), "a seen token's logit must overflow for this test"
    llm = LLM(str(llama_dir), show_progress=False)
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=2, n=8, repetition_penalty=1e-45)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    assert all(o.token_ids[0] in PROMPT and z[o.token_ids[0]] > 0 for o in out.outputs)
