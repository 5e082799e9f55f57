"""`counterpoint eval decoding`: output quality of decoding configurations on the bundled sets.

- open_ended: distinct-2/3/4, rep-2/3/4, coherence (the scorer model's mean log-likelihood per
  token of the continuation, as Li et al. 2023 report beside diversity) and mean length in tokens.
- factual: exact match of the answer (metrics.py), no passage.
- arithmetic: accuracy of the first number in the output that the question does not contain.
"""

from tqdm import tqdm

from counterpoint.serving.eval.backends import QA_FORMAT, Query
from counterpoint.serving.eval.datasets import load, spread
from counterpoint.serving.eval.metrics import distinct_n, exact_match, extract_number, rep_n

SETS = ("open_ended", "factual", "arithmetic")
MAX_TOKENS = {"open_ended": 256, "factual": 32, "arithmetic": 48}
COLUMNS = ["rep-2", "rep-3", "rep-4", "distinct-2", "distinct-3", "distinct-4", "coherence", "length",
           "factual EM", "arithmetic acc"]


def default_configs(amateurs: dict[str, str]) -> dict[str, dict]:
    """The configurations of the README's table; `amateurs`: label -> served amateur name."""
    configs = {
        "greedy": {"temperature": 0},
        "sampling T=0.7 p=0.9": {"temperature": 0.7, "top_p": 0.9, "seed": 0},
        "repetition penalty 1.2": {"temperature": 0, "repetition_penalty": 1.2},
        "beam 4": {"temperature": 0, "use_beam_search": True, "n": 4},
    }
    for label, name in amateurs.items():
        configs[f"CD ({label})"] = {"temperature": 0, "contrastive": {"amateur": name}}
    return configs


def evaluate_decoding(backend, configs: dict[str, dict], sets: tuple[str, ...], limit: int | None,
                      scorer=None) -> tuple[dict, dict]:
    """Returns (config -> metric -> value, config -> set -> outputs)."""
    data = {name: spread(load(name), limit) for name in sets}
    total = len(configs) * sum(len(items) for items in data.values())
    table, outputs = {}, {}
    with tqdm(total=total, desc="eval decoding", unit="req") as bar:
        for label, body in configs.items():
            table[label], outputs[label] = {}, {}
            for name, items in data.items():
                queries = [Query(item.get("prompt") or item["question"]) for item in items]
                done = backend.run(queries, {"max_tokens": MAX_TOKENS[name], **body}, bar)
                outputs[label][name] = [c.text for c in done]
                table[label].update(_score(name, items, done, scorer))
    return table, outputs


def _score(name: str, items: list[dict], done: list, scorer) -> dict:
    texts = [c.text for c in done]
    if name == "factual":
        return {"factual EM": 100 * _mean([exact_match(t, item["answers"]) for t, item in zip(texts, items)])}
    if name == "arithmetic":
        return {"arithmetic acc": 100 * _mean([extract_number(t, item["question"]) == item["answer"]
                                               for t, item in zip(texts, items)])}
    scores = {f"rep-{n}": 100 * rep_n(texts, n) for n in (2, 3, 4)}
    scores |= {f"distinct-{n}": 100 * distinct_n(texts, n) for n in (2, 3, 4)}
    scores["length"] = _mean([c.num_tokens for c in done])
    if scorer is not None:
        scores["coherence"] = _mean(scorer.mean_logprobs([item["prompt"] for item in items], texts))
    return scores


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


class Scorer:
    """A model's mean log-likelihood per token of continuations, each after its prompt rendered as
    the model was asked (its chat template, or the plain question format)."""

    def __init__(self, model_dir: str, chat: bool):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.chat = chat

    def mean_logprobs(self, prompts: list[str], continuations: list[str]) -> list[float]:
        return [self._one(p, c) for p, c in zip(prompts, continuations) if c.strip()]

    def _one(self, prompt: str, continuation: str) -> float:
        torch = self.torch
        if self.chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        else:
            text = QA_FORMAT.format(question=prompt)
        context = self.tokenizer.encode(text, add_special_tokens=False)
        target = self.tokenizer.encode(continuation, add_special_tokens=False)
        ids = torch.tensor([context + target])
        with torch.inference_mode():
            logprobs = self.model(input_ids=ids).logits[0, len(context) - 1 : -1].float().log_softmax(-1)
        return logprobs.gather(-1, torch.tensor(target)[:, None]).mean().item()
