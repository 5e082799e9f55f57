"""The default amateur (the repetition anti-expert), built by the same code and recipe as for
SmolLM2 but from a tiny random expert: built once into the cache, shares the expert's vocabulary,
loads in transformers and in the engine for contrastive decoding, predicts the expert's own loops
more confidently than the expert while staying close to it elsewhere, and has a lower held-out
perplexity than the untrained first-4 slice. Also the early-exit amateur of `train amateur`."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from counterpoint.serving.cli import main
from counterpoint.training.anti_expert import repeated_spans
from counterpoint.training.defaults import ANTI_EXPERT, AntiExpertRecipe, DefaultModels, instant_amateur_config
from counterpoint.training.merge import run_merge
from counterpoint.training.replies import greedy_replies

pytestmark = pytest.mark.usefixtures("one_thread")

HELD_OUT = ["The weather today is", "def main():\n", "Paris is the capital of", "one two three"]


@pytest.fixture(scope="module")
def models(model_factory, tmp_path_factory) -> DefaultModels:
    # Six layers, so the first four leave two out; a wide initialisation makes the random expert's
    # predictions peaked, so the untrained slice is far from them and some greedy replies loop.
    expert = model_factory("llama", num_hidden_layers=6, initializer_range=0.2)
    cache = tmp_path_factory.mktemp("cache")
    instant = run_merge(instant_amateur_config(expert), cache / "instant", show_progress=False)
    return DefaultModels(expert, instant, None, cache, show_progress=False)


@pytest.mark.parametrize("tokens, n, marked", [
    ([1, 2, 3, 4, 1, 2, 3, 4, 5], 4, "....XXXX."),
    ([7, 7, 7, 7, 7], 2, ".XXXX"),
    ([1, 2, 1, 3, 1, 2], 2, "....XX"),
    ([1, 2, 3], 4, "..."),
])
def test_repeated_spans_marks_every_token_of_a_repeated_ngram(tokens, n, marked):
    assert "".join("X" if m else "." for m in repeated_spans(tokens, n)) == marked


def test_the_amateur_is_built_once_into_the_cache(models):
    amateur = models.amateur
    assert amateur == models.cache / ANTI_EXPERT
    provenance = (amateur / "counterpoint.json").stat().st_mtime_ns
    assert models.amateur == amateur and (amateur / "counterpoint.json").stat().st_mtime_ns == provenance
    metrics = json.loads((amateur / "counterpoint.json").read_text())["metrics"]
    assert metrics["repeated_tokens"] > 0
    assert sorted(p.name for p in models.cache.iterdir()) == sorted([ANTI_EXPERT, "instant"])  # no temporary left


def test_the_amateur_shares_the_vocabulary_and_loads(models):
    expert, amateur = models.expert, models.amateur
    assert AutoTokenizer.from_pretrained(amateur).get_vocab() == AutoTokenizer.from_pretrained(expert).get_vocab()
    hf = AutoModelForCausalLM.from_pretrained(amateur, dtype=torch.float32)
    assert hf.config.vocab_size == AutoModelForCausalLM.from_pretrained(expert).config.vocab_size
    ref = hf.generate(torch.tensor([[5, 17, 33]]), max_new_tokens=5, do_sample=False, eos_token_id=None)[0, 3:]
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    got = LLM(str(amateur), show_progress=False).generate([[5, 17, 33]], greedy, use_tqdm=False)
    assert got[0].outputs[0].token_ids == ref.tolist()
    contrastive = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, contrastive={"amateur": "amateur"})
    out = LLM(str(expert), amateur=str(amateur), show_progress=False).generate(
        HELD_OUT[:1], contrastive, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5


def test_the_amateur_repeats_the_experts_loops_more_than_the_expert(models):
    # Scored by transformers on the expert's greedy replies to the recipe's prompts (what a random
    # toy expert's loops teach does not carry over to unseen text; SmolLM2's does, see the README):
    # the amateur gives the tokens of repeated 4-grams a higher log-probability than the expert
    # does, and moves the other tokens' log-probabilities less than that.
    expert = AutoModelForCausalLM.from_pretrained(models.expert, dtype=torch.float32)
    amateur = AutoModelForCausalLM.from_pretrained(models.amateur, dtype=torch.float32)
    gain, shift = [], []
    for r in greedy_replies(models.expert, max_tokens=AntiExpertRecipe().reply_tokens, show_progress=False):
        reply = torch.tensor(r.reply_ids)
        full = torch.tensor([r.prompt_ids + r.reply_ids])
        with torch.no_grad():
            logp = [m(full).logits[0, len(r.prompt_ids) - 1 : -1].log_softmax(-1) for m in (expert, amateur)]
        change = logp[1].gather(1, reply[:, None])[:, 0] - logp[0].gather(1, reply[:, None])[:, 0]
        marked = torch.tensor(repeated_spans(r.reply_ids, 4))
        gain.append(change[marked])
        shift.append(change[~marked].abs())
    gain, shift = torch.cat(gain).mean().item(), torch.cat(shift).mean().item()
    assert gain > 0.1 and shift < gain


def test_the_amateur_is_closer_to_the_expert_than_the_slice(models):
    # On text sampled from the expert, perplexity is exp(H(expert) + KL(expert ‖ model)) per token,
    # so the lower one is the model closer to the expert (greedy text would not say that).
    expert = AutoModelForCausalLM.from_pretrained(models.expert, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(models.expert)
    torch.manual_seed(0)
    texts = []
    for prompt in HELD_OUT:
        ids = torch.tensor([tokenizer.encode(prompt)])
        texts.append((ids, expert.generate(ids, max_new_tokens=48, do_sample=True, top_k=0, eos_token_id=None)))
    assert perplexity(models.amateur, texts) < 0.9 * perplexity(models.instant_amateur, texts)


def test_train_amateur_early_exit_fits_a_head_closer_than_the_slice(models, tmp_path, capsys):
    main(["train", "amateur", str(models.expert), str(tmp_path / "exit"), "--kind", "early-exit"])
    metrics = json.loads((tmp_path / "exit" / "counterpoint.json").read_text())["metrics"]
    assert metrics["val_kl_fitted"] < 0.8 * metrics["val_kl_slice"]
    assert str(tmp_path / "exit") in capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "exit")
    assert hf.config.num_hidden_layers == 4 and not hf.config.tie_word_embeddings


@torch.no_grad()
def perplexity(model_dir, texts) -> float:
    """Per-token perplexity of each continuation given its prompt."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    nll, count = 0.0, 0
    for prompt, full in texts:
        logits = model(full).logits[0, prompt.shape[1] - 1 : -1]
        nll += torch.nn.functional.cross_entropy(logits, full[0, prompt.shape[1] :], reduction="sum").item()
        count += full.shape[1] - prompt.shape[1]
    return math.exp(nll / count)
