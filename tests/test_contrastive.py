"""Contrastive decoding against slow reference loops written here from the formula of decoding/README.md
with two transformers models (no engine code), and the errors a request can get."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from counterpoint.serving.engine.config import EngineConfig
from counterpoint.serving.engine.engine import Engine
from test_sampling import assert_first_tokens_follow

PROMPTS = [[5, 17, 33, 100, 7, 9, 11], [200, 3], list(range(40, 77))]


@pytest.fixture(scope="module")
def expert_dir(llama_dir):
    return llama_dir


@pytest.fixture(scope="module")
def llm(expert_dir, amateur_dir):
    return LLM(str(expert_dir), amateur=str(amateur_dir), show_progress=False)


@pytest.fixture(scope="module")
def hf_pair(expert_dir, amateur_dir):
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    return load(expert_dir), load(amateur_dir)


def reference_scores(expert, amateur, ids: list[int], alpha: float, beta: float, tau: float) -> torch.Tensor:
    """c(v) = log p_E(v) − β·log p_A,τ(v) on V_head, −inf elsewhere, over the shared vocabulary."""
    with torch.no_grad():
        z_e = expert(torch.tensor([ids])).logits[0, -1].float()
        z_a = amateur(torch.tensor([ids])).logits[0, -1].float()
    vocab = min(len(z_e), len(z_a))
    log_p_e = torch.log_softmax(z_e[:vocab], -1)
    log_p_a = torch.log_softmax(z_a[:vocab] / tau, -1)
    scores = torch.full_like(z_e, -math.inf)
    for v in range(vocab):
        if z_e[v] >= z_e[:vocab].max() + math.log(alpha):
            scores[v] = log_p_e[v] - beta * log_p_a[v]
    return scores


def reference_greedy(expert, amateur, prompt, max_tokens, alpha, beta, tau) -> list[int]:
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(int(reference_scores(expert, amateur, ids, alpha, beta, tau).argmax()))
    return ids[len(prompt):]


class ContrastiveProcessor(LogitsProcessor):
    """For transformers' beam search: replaces its log-probs with log_softmax of the CD scores,
    padding a head smaller than the beam width with the next expert tokens at −1e4."""

    def __init__(self, expert, amateur, alpha, beta, tau, width):
        self.models, self.params, self.width = (expert, amateur), (alpha, beta, tau), width

    def __call__(self, input_ids, scores):
        rows = []
        for ids in input_ids.tolist():
            c = reference_scores(*self.models, ids, *self.params)
            with torch.no_grad():
                z_e = self.models[0](torch.tensor([ids])).logits[0, -1].float()
            for v in z_e.argsort(descending=True).tolist()[: self.width]:
                if c[v] == -math.inf:
                    c[v] = -1.0e4
            rows.append(torch.log_softmax(c, -1))
        return torch.stack(rows)


@pytest.mark.parametrize("alpha,beta,tau", [(0.1, 1.0, 1.0), (0.3, 0.5, 0.7), (0.05, 2.0, 1.5), (1.0, 1.0, 1.0)])
def test_greedy_contrastive_matches_reference_loop(llm, hf_pair, alpha, beta, tau):
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, return_decoding_info=True, logprobs=0,
                            contrastive={"amateur": "amateur", "alpha": alpha, "beta": beta,
                                         "amateur_temperature": tau})
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    expert = hf_pair[0]
    for prompt, out in zip(PROMPTS, outs):
        expected = reference_greedy(*hf_pair, prompt, 10, alpha, beta, tau)
        o = out.outputs[0]
        assert o.token_ids == expected
        with torch.no_grad():
            logits = expert(torch.tensor([prompt + expected])).logits[0, len(prompt) - 1 : -1]
        raw = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(expected)[:, None]).squeeze(1)
        got = torch.tensor([info["main_logprob"] for info in o.decoding_info])
        torch.testing.assert_close(got, raw, atol=1e-4, rtol=0)
    _assert_pools_full(llm)


@pytest.mark.parametrize("width,n,alpha,beta", [(3, 2, 0.1, 1.0), (4, 1, 0.5, 0.5), (2, 2, 0.9, 1.0)])
def test_contrastive_beam_search_matches_transformers_with_reference_scores(llm, hf_pair, width, n, alpha, beta):
    """Beams search the contrastive objective: transformers' beam search over the formula's scores."""
    params = SamplingParams(max_tokens=8, use_beam_search=True, n=n, best_of=width, ignore_eos=True,
                            contrastive={"amateur": "amateur", "alpha": alpha, "beta": beta})
    expert = hf_pair[0]
    processor = LogitsProcessorList([ContrastiveProcessor(*hf_pair, alpha, beta, 1.0, width)])
    for prompt in PROMPTS[:2]:
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        ref = expert.generate(torch.tensor([prompt]), max_new_tokens=8, num_beams=width, num_return_sequences=n,
                              do_sample=False, logits_processor=processor, eos_token_id=None)
        assert [o.token_ids for o in out.outputs] == ref[:, len(prompt):].tolist()
    _assert_pools_full(llm)


def test_contrastive_sampling_matches_reference_distribution(llm, hf_pair):
    alpha, beta = 0.02, 0.5
    expected = torch.softmax(reference_scores(*hf_pair, PROMPTS[0], alpha, beta, 1.0), -1)
    assert (expected > 0).sum() > 5, "the head should hold several tokens for this test to mean something"
    params = [SamplingParams(n=30, max_tokens=1, temperature=1.0, seed=seed,
                             contrastive={"amateur": "amateur", "alpha": alpha, "beta": beta}) for seed in range(100)]
    outs = llm.generate([PROMPTS[0]] * 100, params, use_tqdm=False)
    assert_first_tokens_follow(outs, expected, "sampled a token outside the plausibility head")
    seeded = [SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=7, ignore_eos=True,
                             contrastive={"amateur": "amateur"})] * 2
    first, again = llm.generate([PROMPTS[1]] * 2, seeded, use_tqdm=False)
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]


def test_a_vanishing_amateur_temperature_samples_the_formula_s_limit(llm, hf_pair):
    """As τ -> 0 the amateur turns one-hot: log p_A,τ is 0 at its top token and -> −inf elsewhere,
    so every other head token gains the same unbounded score and the amateur's top token none.
    Sampling must follow that limit (p_E over the head without the amateur's top token) instead
    of failing on the NaN that dividing the logits by 1e-40 used to produce."""
    alpha = 0.02
    with torch.no_grad():
        z_e, z_a = (model(torch.tensor([PROMPTS[0]])).logits[0, -1].float() for model in hf_pair)
    vocab = min(len(z_e), len(z_a))
    head = torch.zeros(len(z_e), dtype=torch.bool)
    head[:vocab] = z_e[:vocab] >= z_e[:vocab].max() + math.log(alpha)
    top_amateur = int(z_a[:vocab].argmax())
    assert head[top_amateur] and head.sum() > 5, "the limit is only visible with the amateur's top token in the head"
    head[top_amateur] = False
    expected = torch.where(head, torch.softmax(z_e, -1), 0.0)
    contrastive = {"amateur": "amateur", "alpha": alpha, "beta": 0.5, "amateur_temperature": 1e-40}
    params = [SamplingParams(n=30, max_tokens=1, temperature=1.0, seed=seed, contrastive=contrastive)
              for seed in range(100)]
    outs = llm.generate([PROMPTS[0]] * 100, params, use_tqdm=False)
    assert_first_tokens_follow(outs, expected / expected.sum(), "sampled the amateur's top token or left the head")


def test_a_head_the_bans_empty_is_decoded_from_the_expert_alone(llm, hf_pair):
    """α = 1 keeps only the expert's top token; min_tokens bans it (as a stop token): no token is
    left, so the step falls back to the expert's own distribution under the same bans."""
    prompt = PROMPTS[0]
    with torch.no_grad():
        z_e = hf_pair[0](torch.tensor([prompt])).logits[0, -1].float()
    top = int(z_e.argmax())
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=0, min_tokens=1, stop_token_ids=[top],
                            contrastive={"amateur": "amateur", "alpha": 1.0})
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    banned = [top, *llm.engine.main.eos_ids]
    z_e[banned] = -math.inf
    assert out.token_ids == [int(z_e.argmax())]
    assert out.logprobs[0][out.token_ids[0]].logprob == pytest.approx(float(torch.log_softmax(z_e, -1).max()))
    _assert_pools_full(llm)


def test_contrastive_request_errors(llm, expert_dir, model_factory, tmp_path):
    bad = [({"amateur": "missing"}, "'missing' is not served"),
           ({"amateur": llm.engine.default_model}, "is the request's own model")]
    for contrastive, message in bad:
        with pytest.raises(ValueError, match=message) as err:
            llm.generate([PROMPTS[0]], SamplingParams(contrastive=contrastive), use_tqdm=False)
        assert err.value.param == "contrastive.amateur"
    from helpers import build_model, train_tokenizer

    other_tokenizer = tmp_path / "tok"
    train_tokenizer(other_tokenizer, vocab_size=300)
    stranger = build_model(tmp_path / "stranger", other_tokenizer, vocab_size=300)
    with pytest.raises(ValueError, match="different tokenizer"):
        LLM(str(expert_dir), amateur=str(stranger), show_progress=False)
    # Served side by side, unrelated models are fine until a request contrasts them.
    engine = Engine(EngineConfig(model=str(expert_dir), extra_models=(("stranger", str(stranger)),),
                                 show_progress=False))
    with pytest.raises(ValueError, match="'stranger' has a different tokenizer") as err:
        engine.add_request("r", PROMPTS[0], SamplingParams(contrastive={"amateur": "stranger"}))
    assert err.value.param == "contrastive.amateur"
    with pytest.raises(ValueError, match="contrastive.alpha must be in"):
        SamplingParams(contrastive={"amateur": "amateur", "alpha": 1.5})


def _assert_pools_full(llm):
    for slot in llm.engine.slots.values():
        assert slot.kv.pool.num_free_blocks == slot.kv.pool.num_blocks, slot.name
