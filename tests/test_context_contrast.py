"""Context contrast for RAG (CAD, ACD, AdaCAD) against slow reference loops written here from the
formulas of decoding/README.md, with a transformers model run on two contexts (no engine code):
greedy tokens and reported context weights, ACD's entropy floor, beam search, seeded sampling,
a mixed batch under preemption, and the errors a request can get."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from test_sampling import assert_first_tokens_follow

PROMPTS = [[5, 17, 33, 100, 7, 9, 11], [200, 3, 45]]
NUM_BLOCKS = 16  # tight enough that context-contrast requests get preempted
DOCS = ["Paris is the capital of France.", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir), show_progress=False)


@pytest.fixture(scope="module")
def hf(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def block_ids(llama_dir):
    """The documented context block, tokenized as the reference's documents prefix."""
    text = "Context:\n" + "\n".join(f"[{i}] {d}" for i, d in enumerate(DOCS, start=1)) + "\n\n"
    return AutoTokenizer.from_pretrained(llama_dir).encode(text, add_special_tokens=False)


def last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def entropy(z: torch.Tensor) -> float:
    p = torch.softmax(z, -1)
    return float(-sum(pi * math.log(pi) for pi in p.tolist() if pi > 0))


def reference_combine(z_ctx, z_noctx, method: str, alpha: float = 0.5, min_alpha: float = 0.0):
    """The formulas, literally: (combined logits, context weight or None)."""
    if method == "cad":
        return (1 + alpha) * z_ctx - alpha * z_noctx, None
    if method == "acd":
        h_ctx, h_noctx = entropy(z_ctx), entropy(z_noctx)
        w = 0.5 if h_ctx < 1e-6 and h_noctx < 1e-6 else min(max(h_noctx / (h_noctx + h_ctx), 0.0), 1.0)
        return z_noctx + w * (z_ctx - z_noctx), w
    p, q = torch.softmax(z_ctx, -1).clamp(min=1e-9), torch.softmax(z_noctx, -1).clamp(min=1e-9)
    m = (p + q) / 2
    a = max(float(0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()), min_alpha)
    return (1 + a) * z_ctx - a * z_noctx, a


def reference_greedy(model, ctx, noctx, n, **kw):
    ctx, noctx, tokens, weights = list(ctx), list(noctx), [], []
    for _ in range(n):
        c, w = reference_combine(last_logits(model, ctx), last_logits(model, noctx), **kw)
        token = int(c.argmax())
        tokens.append(token)
        weights.append(w)
        ctx.append(token)
        noctx.append(token)
    return tokens, weights


CASES = [dict(method="cad", alpha=0.5), dict(method="cad", alpha=2.0), dict(method="acd"),
         dict(method="adacad"), dict(method="adacad", min_alpha=0.3)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_greedy_matches_the_reference_loop_with_its_weights(llm, hf, block_ids, case):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, return_decoding_info=True,
                            context_contrast=case)
    outs = llm.generate(PROMPTS, params, documents=DOCS, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt_token_ids == block_ids + prompt  # the documented format, documents first
        tokens, weights = reference_greedy(hf, block_ids + prompt, prompt, 8, **case)
        o = out.outputs[0]
        assert o.token_ids == tokens
        got = [info.get("context_weight") for info in o.decoding_info]
        if case["method"] == "cad":
            assert got == [None] * 8
        else:
            assert got == pytest.approx(weights, rel=1e-4, abs=1e-6)
    pools_full(llm)


def test_acd_entropy_floor_gives_half_and_weights_follow_the_formula():
    from counterpoint.decoding.combine import combine
    from counterpoint.decoding.params import ContextContrastParams

    peaked = torch.full((1, 50), -200.0)
    peaked[0, 3] = 200.0  # both streams near one-hot: entropies below 1e-6
    other = peaked.clone()
    other[0, 7] = 150.0
    z_ctx, z_noctx = torch.cat([peaked, torch.randn(1, 50)]), torch.cat([other, torch.randn(1, 50)])
    params = [ContextContrastParams("acd")] * 2
    result = combine("acd", z_ctx, z_noctx, params, [1, 1])
    for i in range(2):
        expected, w = reference_combine(z_ctx[i], z_noctx[i], "acd")
        assert float(result.weights[i]) == pytest.approx(w, abs=1e-6)
        torch.testing.assert_close(result.logits[i], expected)
    assert float(result.weights[0]) == 0.5


class ACDProcessor(LogitsProcessor):
    """For transformers' beam search: its log-probs of the context stream are replaced by
    log_softmax of the ACD combination with the same model run without the documents."""

    def __init__(self, model, num_block_ids: int):
        self.model, self.skip = model, num_block_ids

    def __call__(self, input_ids, scores):
        rows = []
        for ids, z_ctx in zip(input_ids.tolist(), scores):
            combined, _ = reference_combine(z_ctx.float(), last_logits(self.model, ids[self.skip:]), "acd")
            rows.append(torch.log_softmax(combined, -1))
        return torch.stack(rows)


def test_acd_beam_search_matches_transformers_with_a_reference_processor(llm, hf, block_ids):
    """log_softmax(z_ctx) differs from z_ctx by a constant per row, which w·(z_ctx − z_noctx) turns
    into a constant of the combination, so log_softmax of it is the same either way."""
    prompt = PROMPTS[0]
    params = SamplingParams(max_tokens=6, use_beam_search=True, n=2, best_of=3, ignore_eos=True,
                            context_contrast={"method": "acd"})
    out = llm.generate([prompt], params, documents=DOCS, use_tqdm=False)[0]
    processor = LogitsProcessorList([ACDProcessor(hf, len(block_ids))])
    ref = hf.generate(torch.tensor([block_ids + prompt]), max_new_tokens=6, num_beams=3, num_return_sequences=2,
                      do_sample=False, logits_processor=processor, eos_token_id=None)
    assert [o.token_ids for o in out.outputs] == ref[:, len(block_ids) + len(prompt):].tolist()
    pools_full(llm)


def test_seeded_cad_sampling_follows_the_reference_distribution(llm, hf, block_ids):
    prompt = PROMPTS[1]
    combined, _ = reference_combine(last_logits(hf, block_ids + prompt), last_logits(hf, prompt), "cad", alpha=1.0)
    expected = torch.softmax(combined / 1.5, -1)
    params = [SamplingParams(n=30, max_tokens=1, temperature=1.5, seed=seed,
                             context_contrast={"method": "cad", "alpha": 1.0}) for seed in range(100)]
    outs = llm.generate([prompt] * 100, params, documents=DOCS, use_tqdm=False)
    assert_first_tokens_follow(outs, expected, "a sampled token the CAD distribution gives no mass")


def test_a_mixed_batch_under_preemption_gives_each_request_its_solo_output(llama_dir, amateur_dir):
    workload = [
        ([5, 17, 33], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), None),
        ([9, 9, 9, 9], SamplingParams(max_tokens=10, use_beam_search=True, n=2, ignore_eos=True), None),
        ([40, 41, 42], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                      contrastive={"amateur": "amateur"}), None),
        ([7, 8], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, context_contrast={"method": "cad"}),
         DOCS),
        ([7, 8, 9], SamplingParams(max_tokens=10, temperature=0.9, seed=3, n=2, ignore_eos=True,
                                   context_contrast={"method": "acd"}, return_decoding_info=True), DOCS),
        ([11, 12], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                  context_contrast={"method": "adacad"}), DOCS[:1]),
    ]

    def run(llm, items):
        return [[o.token_ids for o in llm.generate([p], [sp], documents=d, use_tqdm=False)[0].outputs]
                for p, sp, d in items]

    roomy = LLM(str(llama_dir), amateur=str(amateur_dir), show_progress=False)
    alone = run(roomy, workload)
    tight = LLM(str(llama_dir), amateur=str(amateur_dir), show_progress=False, num_blocks=NUM_BLOCKS, block_size=8,
                max_num_seqs=8, max_num_batched_tokens=64)
    docs = [d or [] for _, _, d in workload]
    outs = tight.generate([p for p, _, _ in workload], [sp for _, sp, _ in workload], documents=docs,
                          use_tqdm=False)
    assert [[o.token_ids for o in out.outputs] for out in outs] == alone
    assert any(out.metrics.num_preemptions > 0 for out in outs[3:]), "no context-contrast request was preempted"
    pools_full(tight)


def test_both_streams_count_against_the_pool(llama_dir, block_ids):
    """main (with the documents) and no_context share the model's pool: a request whose two
    sequences together exceed it is refused up front, not left waiting forever."""
    need_main = -(-(len(block_ids) + 3 + 10) // 8)
    small = LLM(str(llama_dir), show_progress=False, num_blocks=need_main, block_size=8)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    assert small.generate([[7, 8, 9]], params, documents=DOCS, use_tqdm=False)[0].outputs[0].finish_reason
    with pytest.raises(ValueError, match="needs up to"):
        small.generate([[7, 8, 9]], SamplingParams(max_tokens=10, context_contrast={"method": "cad"}),
                       documents=DOCS, use_tqdm=False)


def test_both_streams_count_against_max_num_seqs(llama_dir):
    """With one sequence per step a contrasted request (two sequences) could never start: it is
    refused up front, naming context_contrast; with two it runs."""
    params = SamplingParams(max_tokens=3, temperature=0, context_contrast={"method": "acd"})
    one = LLM(str(llama_dir), show_progress=False, max_num_seqs=1)
    with pytest.raises(ValueError, match="max_num_seqs is 1") as err:
        one.generate([[7, 8, 9]], params, documents=DOCS, use_tqdm=False)
    assert err.value.param == "context_contrast"
    two = LLM(str(llama_dir), show_progress=False, max_num_seqs=2)
    assert len(two.generate([[7, 8, 9]], params, documents=DOCS, use_tqdm=False)[0].outputs[0].token_ids) == 3


def test_context_contrast_errors(llm):
    with pytest.raises(ValueError, match="context_contrast needs documents") as err:
        llm.generate([PROMPTS[0]], SamplingParams(context_contrast={"method": "acd"}), use_tqdm=False)
    assert err.value.param == "context_contrast"
    with pytest.raises(ValueError, match="cannot be combined"):
        SamplingParams(context_contrast={"method": "cad"}, contrastive={"amateur": "amateur"})
    for bad, message in (({"method": "x"}, "context_contrast.method"), ({"method": "cad", "alpha": -1},
                                                                          "context_contrast.alpha")):
        with pytest.raises(ValueError, match=message):
            SamplingParams(context_contrast=bad)


def pools_full(llm):
    for slot in llm.engine.slots.values():
        assert slot.kv.pool.num_free_blocks == slot.kv.pool.num_blocks, slot.name
