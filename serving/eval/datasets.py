"""The bundled evaluation sets (data/*.jsonl), or a question file in the factual schema.

factual: {id, category, question, answers (aliases), gold, conflict_answer, conflicting, irrelevant}
open_ended: {id, prompt}
arithmetic: {id, question, answer (an integer that is not one of the question's numbers)}
"""

import json
from importlib.resources import files
from pathlib import Path

DATA = files("counterpoint.serving.eval") / "data"
PASSAGE_KINDS = ("gold", "irrelevant", "conflicting")


def load(name: str) -> list[dict]:
    """A bundled set by name ("factual", "open_ended", "arithmetic")."""
    with (DATA / f"{name}.jsonl").open(encoding="utf-8") as fh:
        return _lines(fh)


def load_file(path: str | Path) -> list[dict]:
    """A JSON Lines question file in the factual schema (e.g. a synthetic world's world.jsonl)."""
    with open(path, encoding="utf-8") as fh:
        items = _lines(fh)
    for i, item in enumerate(items, start=1):
        missing = {"question", "answers", *PASSAGE_KINDS, "conflict_answer"} - set(item)
        if missing:
            raise ValueError(f"{path}: line {i} lacks {', '.join(sorted(missing))}")
    return items


def _lines(fh) -> list[dict]:
    return [json.loads(line) for line in fh if line.strip()]


def spread(items: list, limit: int | None) -> list:
    """`limit` items spread evenly over `items` (the sets are grouped by category, so the first N
    would be one category); all of them without a limit."""
    if limit is None or limit >= len(items):
        return list(items)
    return [items[i * len(items) // limit] for i in range(limit)]
