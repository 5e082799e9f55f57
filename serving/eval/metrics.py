"""The evaluation metrics, each on plain strings.

- Exact match (SQuAD-style normalisation, for generated answers): an alias, lowercased with
  punctuation and the articles a/an/the removed, occurs as whole words in the answer's first
  non-empty line. A chat model answers "The capital of France is Paris.", which must count.
- distinct-n (Li et al., 2016): distinct word n-grams over all n-grams of every continuation.
- rep-n (Welleck et al., 2019): per continuation, 1 - distinct n-grams / n-grams; then the mean.
- Arithmetic: the first integer in the output that is not one of the question's own numbers
  ("12 + 7 = 19" answers 19).
"""

import re

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize(text: str) -> str:
    text = re.sub(r"[\W_]+", " ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def exact_match(output: str, aliases: list[str]) -> bool:
    answer = f" {normalize(first_line(output))} "
    return any(f" {alias} " in answer for alias in map(normalize, aliases) if alias)


def words(text: str) -> list[str]:
    return normalize(text).split()


def ngrams(tokens: list[str], n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    grams = [g for text in texts for g in ngrams(words(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def rep_n(texts: list[str], n: int) -> float:
    """Mean over the continuations that have at least one n-gram."""
    rates = [1 - len(set(g)) / len(g) for g in (ngrams(words(text), n) for text in texts) if g]
    return sum(rates) / len(rates) if rates else 0.0


def _integers(text: str) -> list[int]:
    found = []
    for match in _NUMBER.findall(text):
        value = float(match.replace(",", ""))
        if value.is_integer():
            found.append(int(value))
    return found


def extract_number(output: str, question: str) -> int | None:
    own = set(_integers(question))
    return next((n for n in _integers(output) if n not in own), None)
