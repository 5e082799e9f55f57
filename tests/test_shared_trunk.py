"""Contrastive decoding against an amateur that shares the expert's first layers (an anti-expert
tuned from the last layers, an early-exit cut): the shared layers are held and run once, and the
tokens are still those of the formula's reference loop over two separate transformers models,
through chunked prefill, prefix-cache hits on one side only, beams and preemption."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from counterpoint.serving.engine.trunks import shared_layers
from helpers import depart_after
from test_contrastive import ContrastiveProcessor, reference_greedy

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 17, 33, 100, 7, 9, 11], [200, 3], list(range(40, 97))]
CD = {"alpha": 0.1, "beta": 1.0}


@pytest.fixture(scope="module")
def expert_dir(model_factory):
    return model_factory("llama", num_hidden_layers=4, seed=3)


@pytest.fixture(scope="module")
def tuned_dir(expert_dir, tmp_path_factory):
    """Layers 0-1 are the expert's; layers 2-3 and the final norm depart from it."""
    return depart_after(expert_dir, tmp_path_factory.mktemp("tuned"), first=2)


@pytest.fixture(scope="module")
def cut_dir(expert_dir, tmp_path_factory):
    """The expert's first layer alone, under a different final norm: an early exit."""
    return depart_after(expert_dir, tmp_path_factory.mktemp("cut"), first=1, num_layers=1)


def hf(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(expert_dir, tuned_dir, cut_dir):
    return LLM(str(expert_dir), extra_models=(("tuned", str(tuned_dir)), ("cut", str(cut_dir))), show_progress=False,
               max_num_batched_tokens=32, max_num_seqs=8)


def params(amateur: str, **extra) -> SamplingParams:
    extra = {"max_tokens": 8, "temperature": 0, "ignore_eos": True} | extra
    return SamplingParams(**extra, contrastive={"amateur": amateur, **CD})


def assert_clean(llm):
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert all(s.kv.pool.num_free_blocks == s.kv.pool.num_blocks for s in engine.all_slots.values())


def test_the_shared_layers_are_found_and_held_once(llm, expert_dir, tuned_dir, cut_dir, amateur_dir):
    from counterpoint.serving.models.loader import load_model

    load = lambda path: load_model(path, torch.float32, torch.device("cpu"), 64, show_progress=False)  # noqa: E731
    expert = load(expert_dir)
    assert [shared_layers(expert, load(d)) for d in (tuned_dir, cut_dir, amateur_dir)] == [2, 1, 0]
    slots = llm.engine.slots
    main = slots[llm.engine.default_model].model
    assert all(slots["tuned"].model.layers[i] is main.layers[i] for i in range(2))
    assert slots["tuned"].model.layers[2] is not main.layers[2]
    assert slots["cut"].model.layers[0] is main.layers[0]


def test_equal_ends_are_held_once_and_a_step_reads_the_lm_head_once(llm, monkeypatch):
    """The amateurs' embeddings and lm_heads equal the expert's: one module each, and a contrastive
    step runs both streams' rows through the lm_head in one call (its weight read once)."""
    from counterpoint.serving.engine.model_runner import ModelRunner

    slots = llm.engine.slots
    main = slots[llm.engine.default_model].model
    for name in ("tuned", "cut"):
        assert slots[name].model.embed_tokens is main.embed_tokens and slots[name].model.lm_head is main.lm_head
    calls = []
    real = ModelRunner.logits
    monkeypatch.setattr(ModelRunner, "logits", lambda self, hidden: calls.append(hidden.shape[0]) or real(self, hidden))
    llm.generate([PROMPTS[0]], params("tuned", max_tokens=4), use_tqdm=False)
    assert calls == [2] * 4  # the expert's row and the tail's, every step


@pytest.mark.parametrize("amateur", ["tuned", "cut"])
def test_greedy_contrastive_matches_the_reference_loop(llm, expert_dir, tuned_dir, cut_dir, amateur):
    """The longest prompt is prefilled in chunks of the 32-token step budget, both streams together."""
    pair = hf(expert_dir), hf({"tuned": tuned_dir, "cut": cut_dir}[amateur])
    outs = llm.generate(PROMPTS, params(amateur), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == reference_greedy(*pair, prompt, 8, CD["alpha"], CD["beta"], 1.0)
    tail = llm.engine.tails[f"{amateur}@{llm.engine.default_model}"]
    expected_layers = {"tuned": 2, "cut": 0}[amateur]
    assert tail.runner.cache.data.shape[0] == expected_layers  # the tail's cache holds its own layers alone
    assert_clean(llm)


def test_cache_hits_on_one_side_only_are_recomputed_on_both(llm, expert_dir, tuned_dir):
    """A plain request leaves the prompt's blocks in the expert's pool alone; the contrastive request
    after it still gets the reference tokens, and so does the same request again (hits on both)."""
    prompt = list(range(100, 150))
    plain = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    assert len(plain[0].outputs[0].token_ids) == 1
    expected = reference_greedy(hf(expert_dir), hf(tuned_dir), prompt, 8, CD["alpha"], CD["beta"], 1.0)
    for _ in range(2):
        out = llm.generate([prompt], params("tuned"), use_tqdm=False)[0]
        assert out.outputs[0].token_ids == expected
    assert_clean(llm)


def test_the_amateur_served_alone_is_unchanged(llm, tuned_dir):
    model = hf(tuned_dir)
    prompt = PROMPTS[0]
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    engine = llm.engine
    engine.add_request("alone", prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), model="tuned")
    outs = [out for _ in range(20) for out in engine.step() if out.finished]
    assert [o.outputs[0].token_ids for o in outs] == [ref[0, len(prompt):].tolist()]


def test_contrastive_beam_search_forks_the_tail_with_its_main(llm, expert_dir, tuned_dir):
    width, n = 3, 2
    expert, amateur = hf(expert_dir), hf(tuned_dir)
    processor = ContrastiveProcessor(expert, amateur, CD["alpha"], CD["beta"], 1.0, width)
    request = params("tuned", use_beam_search=True, n=n, best_of=width)
    for prompt in PROMPTS[:2]:
        out = llm.generate([prompt], request, use_tqdm=False)[0]
        ref = expert.generate(torch.tensor([prompt]), max_new_tokens=8, num_beams=width, num_return_sequences=n,
                              do_sample=False, logits_processor=[processor], eos_token_id=None)
        assert [o.token_ids for o in out.outputs] == ref[:, len(prompt):].tolist()
    assert_clean(llm)


def test_preempted_contrastive_requests_recompute_both_streams(expert_dir, tuned_dir):
    """Too few blocks for eight requests at once: some are preempted and recomputed."""
    llm = LLM(str(expert_dir), extra_models=(("tuned", str(tuned_dir)),), num_blocks=8, block_size=8,
              max_num_seqs=4, max_num_batched_tokens=16, show_progress=False)
    prompts = [[7 + i, 30, 31 + i] + list(range(50, 59)) for i in range(6)]
    outs = llm.generate(prompts, params("tuned", max_tokens=16), use_tqdm=False)
    assert sum(llm.engine.scheduler.preemptions.values()) > 0
    expert, amateur = hf(expert_dir), hf(tuned_dir)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == reference_greedy(expert, amateur, prompt, 16, CD["alpha"], CD["beta"], 1.0)
    assert_clean(llm)
