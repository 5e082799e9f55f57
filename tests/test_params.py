"""Bad SamplingParams are rejected with a message that names the field."""

import pytest

from counterpoint.decoding import SamplingParams

BAD = [
    ("n", dict(n=0)),
    ("best_of", dict(n=3, best_of=2)),
    ("temperature", dict(temperature=-0.1)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("top_k", dict(top_k=-2)),
    ("min_p", dict(min_p=1.5)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("presence_penalty", dict(presence_penalty=2.5)),
    ("frequency_penalty", dict(frequency_penalty=-3)),
    ("logit_bias", dict(logit_bias={5: 200.0})),
    ("max_tokens", dict(max_tokens=-1)),
    ("min_tokens", dict(min_tokens=-1)),
    ("min_tokens", dict(max_tokens=4, min_tokens=5)),
    ("logprobs", dict(logprobs=21)),
    ("prompt_logprobs", dict(prompt_logprobs=-1)),
    ("stop", dict(stop=["ok", ""])),
    ("stop_token_ids", dict(stop_token_ids=[-4])),
    ("seed", dict(seed="abc")),
    ("seed", dict(seed=2**64)),
    ("early_stopping", dict(early_stopping="sometimes")),
    ("contrastive.alpha", dict(contrastive={"amateur": "small", "alpha": 0.0})),
    ("contrastive.beta", dict(contrastive={"amateur": "small", "beta": -1})),
    ("contrastive.amateur_temperature", dict(contrastive={"amateur": "small", "amateur_temperature": 0})),
    ("context_contrast.method", dict(context_contrast={"method": "xyz"})),
    ("contrastive and context_contrast", dict(contrastive={"amateur": "a"}, context_contrast={"method": "cad"})),
]


@pytest.mark.parametrize("field,kwargs", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_values_name_the_field(field, kwargs):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert str(err.value).startswith(field)


def test_good_values_pass_and_normalise():
    p = SamplingParams(stop="###", logit_bias={"7": 1}, top_k=-1, contrastive={"amateur": "small"})
    assert p.stop_strings == ["###"]
    assert p.logit_bias == {7: 1.0}
    assert p.contrastive.alpha == 0.25 and p.contrastive.beta == 0.5  # the documented defaults


def test_engine_rejects_prompts_that_do_not_fit(llama_dir):
    from counterpoint.serving import LLM
    from counterpoint.serving.engine.admission import ContextLengthExceeded

    llm = LLM(str(llama_dir), show_progress=False, max_model_len=32)
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 32"):
        llm.generate([[5] * 40], SamplingParams(max_tokens=1), use_tqdm=False)
    with pytest.raises(ContextLengthExceeded):
        llm.generate([[5] * 20], SamplingParams(max_tokens=20), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt token ids must be in"):
        llm.generate([[5, 100000]], SamplingParams(max_tokens=1), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt must not be empty"):
        llm.generate([""], SamplingParams(max_tokens=1), use_tqdm=False)
    out = llm.generate([[5] * 20], SamplingParams(max_tokens=None, ignore_eos=True, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 12 and out[0].outputs[0].finish_reason == "length"
