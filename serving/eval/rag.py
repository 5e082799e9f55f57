"""`counterpoint eval rag`: exact match of no-RAG greedy, RAG greedy, CAD, ACD and AdaCAD on the
factual questions, each asked with its gold, irrelevant and conflicting passage, split by whether
the model answers correctly without any passage (known / unknown).

The target of a gold or irrelevant passage is the true answer; that of a conflicting passage is
the answer the passage states (faithfulness to the context, as in CAD's knowledge-conflict sets).
How often the model keeps its own answer against a conflicting passage is reported beside it.
"""

from dataclasses import dataclass, field

from tqdm import tqdm

from counterpoint.serving.eval.backends import Query
from counterpoint.serving.eval.datasets import PASSAGE_KINDS
from counterpoint.serving.eval.metrics import exact_match

GREEDY = {"temperature": 0}
METHODS = {
    "rag": {},
    "cad": {"context_contrast": {"method": "cad", "alpha": 0.5}},
    "acd": {"context_contrast": {"method": "acd"}},
    "adacad": {"context_contrast": {"method": "adacad"}},
}


@dataclass
class RagResult:
    """Per item: known or not; per (method, passage kind): the answers and their scores."""

    known: list[bool]
    outputs: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    correct: dict[str, dict[str, list[bool]]] = field(default_factory=dict)
    kept_own: dict[str, list[bool]] = field(default_factory=dict)  # conflicting passage, true answer given

    def table(self) -> dict[str, dict[str, dict]]:
        """method -> "known/gold", ..., "unknown/kept-own" -> {"em": percent or None, "n": items}."""
        rows = {}
        for method, by_kind in self.correct.items():
            rows[method] = {}
            for split, want in (("known", True), ("unknown", False)):
                pick = lambda scores: [s for s, k in zip(scores, self.known) if k == want]  # noqa: E731
                for kind, scores in by_kind.items():
                    rows[method][f"{split}/{kind}"] = _cell(pick(scores))
                rows[method][f"{split}/kept-own"] = _cell(pick(self.kept_own[method]))
        return rows

    def score(self, method: str, texts_by_kind: dict[str, list[str]], items: list[dict]) -> None:
        self.outputs[method] = texts_by_kind
        self.correct[method] = {kind: [exact_match(t, _target(item, kind)) for t, item in zip(texts, items)]
                                for kind, texts in texts_by_kind.items()}
        self.kept_own[method] = [exact_match(t, item["answers"])
                                 for t, item in zip(texts_by_kind["conflicting"], items)]


def _cell(scores: list[bool]) -> dict:
    return {"em": 100 * sum(scores) / len(scores) if scores else None, "n": len(scores)}


def evaluate_rag(backend, items: list[dict], max_tokens: int, methods: dict = METHODS) -> RagResult:
    """No-RAG greedy once (its answer stands for every passage kind), then every (method, passage)."""
    base = {**GREEDY, "max_tokens": max_tokens}
    total = len(items) * (1 + len(methods) * len(PASSAGE_KINDS))
    with tqdm(total=total, desc="eval rag", unit="req") as bar:
        no_rag = [c.text for c in backend.run([Query(item["question"]) for item in items], base, bar)]
        result = RagResult(known=[exact_match(text, item["answers"]) for text, item in zip(no_rag, items)])
        result.score("no-rag", {kind: no_rag for kind in PASSAGE_KINDS}, items)
        texts = {method: {} for method in methods}
        # NOTE: passage-major, so each prompt is asked by every method in a row: the prefix cache
        # then holds it (and its no-passage twin) for all four.
        for kind in PASSAGE_KINDS:
            queries = [Query(item["question"], (item[kind],)) for item in items]
            for method, extra in methods.items():
                texts[method][kind] = [c.text for c in backend.run(queries, {**base, **extra}, bar)]
        for method in methods:
            result.score(method, texts[method], items)
    return result


def _target(item: dict, kind: str) -> list[str]:
    return [item["conflict_answer"]] if kind == "conflicting" else item["answers"]
