"""Beam search against transformers' generate(num_beams=...) token for token (float32)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from helpers import make_eos_likely

PROMPTS = [[5, 17, 33, 100, 7, 9, 11], [200, 3], list(range(40, 77))]
CASES = [  # (beam width, n, length_penalty, early_stopping)
    (2, 1, 1.0, False),
    (4, 2, 1.0, False),
    (4, 4, 0.5, True),
    (3, 2, 2.0, "never"),
    (4, 3, -1.0, False),
    (5, 2, 1.0, True),
    (4, 2, 0.0, "never"),
]


@pytest.fixture(scope="module")
def eos_model(model_factory, tmp_path_factory):
    base = model_factory("llama", tie_word_embeddings=False)
    return make_eos_likely(base, tmp_path_factory.mktemp("eos-likely"))


def hf_beams(model, prompt, max_new_tokens, width, n, length_penalty, early_stopping):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, num_beams=width,
                         num_return_sequences=n, length_penalty=length_penalty, early_stopping=early_stopping,
                         do_sample=False)
    eos = model.generation_config.eos_token_id
    results = []
    for row in out[:, len(prompt):].tolist():
        results.append(row[: row.index(eos) + 1] if eos in row else row)
    return results


@pytest.mark.parametrize("width,n,length_penalty,early_stopping", CASES)
def test_beam_search_matches_transformers(eos_model, model_factory, width, n, length_penalty, early_stopping):
    """On a model whose EOS is likely (beams finish early) and on a plain one."""
    plain = model_factory("llama", tie_word_embeddings=False)
    params = SamplingParams(max_tokens=14, use_beam_search=True, n=n, best_of=width, length_penalty=length_penalty,
                            early_stopping=early_stopping)
    for model_dir in (eos_model, plain):
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        llm = LLM(str(model_dir), show_progress=False)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        for prompt, out in zip(PROMPTS, outs):
            expected = hf_beams(hf, prompt, 14, width, n, length_penalty, early_stopping)
            assert [o.token_ids for o in out.outputs] == expected
        pool = llm.engine.main.kv.pool
        assert pool.num_free_blocks == pool.num_blocks


def test_eos_likely_model_ends_beams_early(eos_model):
    """Guards the fixture: the comparisons above must include hypotheses that end in EOS early."""
    llm = LLM(str(eos_model), show_progress=False)
    params = SamplingParams(max_tokens=14, use_beam_search=True, n=4, best_of=4)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    early = [o for out in outs for o in out.outputs if len(o.token_ids) < 14]
    assert early and all(o.finish_reason == "stop" and o.token_ids[-1] == llm.get_tokenizer().eos_token_id
                         for o in early)


def test_beam_search_cumulative_logprob_and_order(eos_model):
    """Results come best first by sum(log q) / length^penalty, and the sum is transformers' log_softmax."""
    llm = LLM(str(eos_model), show_progress=False)
    params = SamplingParams(max_tokens=10, use_beam_search=True, n=3, best_of=3, logprobs=1)
    out = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    hf = AutoModelForCausalLM.from_pretrained(eos_model, dtype=torch.float32)
    scores = []
    for o in out.outputs:
        with torch.no_grad():
            logits = hf(torch.tensor([PROMPTS[0] + o.token_ids])).logits[0]
        logq = torch.log_softmax(logits.float(), -1)[len(PROMPTS[0]) - 1 : -1]
        total = logq.gather(1, torch.tensor(o.token_ids)[:, None]).sum().item()
        assert o.cumulative_logprob == pytest.approx(total, abs=1e-3)
        scores.append(total / len(o.token_ids))
    assert scores == sorted(scores, reverse=True)


def strip_padding(row: list[int], pad: int) -> list[int]:
    while row and row[-1] == pad:
        row = row[:-1]
    return row


class StopStringCriteria(StoppingCriteria):
    """Ends a candidate whose newest token completes a stop string in the decoded output text."""

    def __init__(self, tokenizer, prompt_len: int, stops: list[str]):
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, stops

    def __call__(self, input_ids, scores, **kwargs):
        done = []
        for row in input_ids.tolist():
            generated = row[self.prompt_len:]
            now = self.tokenizer.decode(generated, skip_special_tokens=True)
            before = self.tokenizer.decode(generated[:-1], skip_special_tokens=True)
            done.append(any(s in now and s not in before for s in self.stops))
        return torch.tensor(done)


@pytest.mark.parametrize("stops", [["e"], ["th", "\n"], ["a"]])
def test_beam_search_with_stop_strings_matches_transformers(llama_dir, stops):
    """A stop string ends a candidate like EOS does: transformers' beam search with a stopping
    criterion written here gives the same beams; the text is cut before the stop string."""
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    llm = LLM(str(llama_dir), show_progress=False)
    tokenizer, pad = llm.get_tokenizer(), hf.generation_config.pad_token_id
    params = SamplingParams(max_tokens=12, use_beam_search=True, n=2, best_of=3, stop=stops)
    for prompt in PROMPTS:
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        criteria = StoppingCriteriaList([StopStringCriteria(tokenizer, len(prompt), stops)])
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, num_beams=3, num_return_sequences=2,
                          do_sample=False, stopping_criteria=criteria)
        expected = [strip_padding(row, pad) for row in ref[:, len(prompt):].tolist()]
        assert [o.token_ids for o in out.outputs] == expected
        for o in out.outputs:
            full = tokenizer.decode(o.token_ids, skip_special_tokens=True)
            if o.stop_reason is not None:
                assert full.startswith(o.text) and full[len(o.text):].startswith(o.stop_reason)
    pool = llm.engine.main.kv.pool
    assert pool.num_free_blocks == pool.num_blocks
