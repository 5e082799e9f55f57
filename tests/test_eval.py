"""`counterpoint eval`: the metrics on hand-computed strings, the RAG table from scripted answers,
and both evaluations end to end, offline and against a live server, on a tiny model."""

import json

import pytest

from counterpoint.decoding import SamplingParams
from counterpoint.serving.cli import main
from counterpoint.serving.eval.backends import Completion
from counterpoint.serving.eval.datasets import load
from counterpoint.serving.eval.quality import MAX_TOKENS
from counterpoint.serving.eval.metrics import distinct_n, exact_match, extract_number, rep_n
from counterpoint.serving.eval.rag import evaluate_rag
from counterpoint.serving.llm import LLM
from test_http_server import Server

QUESTIONS = [
    {"id": "q1", "question": "What is the capital of France?", "answers": ["Paris"], "gold": "Paris is the capital.",
     "conflict_answer": "Lyon", "conflicting": "Lyon is the capital.", "irrelevant": "Zinc is Zn."},
    {"id": "q2", "question": "Who wrote Emma?", "answers": ["Jane Austen", "Austen"], "gold": "Austen wrote Emma.",
     "conflict_answer": "Dickens", "conflicting": "Dickens wrote Emma.", "irrelevant": "Mars is red."},
]


@pytest.mark.parametrize("output, aliases, expected", [
    ("The capital of France is Paris.", ["Paris"], True),
    ("Parisian cafes are famous.", ["Paris"], False),
    ("\n\nWashington, D.C. is the capital", ["Washington, D.C."], True),
    ("I do not know.\nParis", ["Paris"], False),
    ("It was written by J.R.R. Tolkien", ["J. R. R. Tolkien"], True),
    ("The Hobbit", ["Hobbit"], True),
])
def test_exact_match(output, aliases, expected):
    assert exact_match(output, aliases) is expected


def test_distinct_and_rep_by_hand():
    # "x y x y": bigrams xy, yx, xy -> 2 distinct of 3; "x y z": xy, yz -> 2 of 2
    assert distinct_n(["x y x y"], 2) == pytest.approx(2 / 3)
    assert rep_n(["x y x y"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["x y x y", "x y z"], 2) == pytest.approx(3 / 5)
    assert rep_n(["x y x y", "x y z"], 2) == pytest.approx((1 / 3 + 0) / 2)
    assert rep_n(["x y x y", "w"], 4) == 0.0  # no text long enough: no 4-grams at all


@pytest.mark.parametrize("output, question, expected", [
    ("12 + 7 = 19.", "What is 12 + 7?", 19),
    ("The answer is 1,024.", "What is 32 times 32?", 1024),
    ("4 - 7 is -3", "What is 4 - 7?", -3),
    ("I cannot say.", "What is 2 + 3?", None),
    ("2.5 apples", "Split 5 apples in 2.", None),
])
def test_extract_number(output, question, expected):
    assert extract_number(output, question) == expected


class Scripted:
    """A backend answering from a script: (question, passage or None, method) -> text."""

    chat = True

    def __init__(self, script):
        self.script = script

    def run(self, queries, body, bar):
        method = (body.get("context_contrast") or {}).get("method", "rag")
        bar.update(len(queries))
        return [Completion(self.script(q.text, q.documents[0] if q.documents else None, method), 1)
                for q in queries]


def test_rag_table_from_scripted_answers():
    """q1 is known (Paris with no passage), q2 unknown; CAD follows every passage, RAG keeps Paris
    against the conflicting one. Each cell below is counted by hand from that script."""
    def script(question, passage, method):
        if passage is None:
            return "Paris." if "France" in question else "Shakespeare."
        if method == "cad" or "Paris" not in passage and "Lyon" not in passage:
            return passage
        return "Paris."

    table = evaluate_rag(Scripted(script), QUESTIONS, max_tokens=8).table()
    assert table["no-rag"]["known/gold"] == {"em": 100.0, "n": 1}
    assert table["no-rag"]["unknown/gold"] == {"em": 0.0, "n": 1}
    assert table["rag"]["known/conflicting"]["em"] == 0.0 and table["rag"]["known/kept-own"]["em"] == 100.0
    assert table["cad"]["known/conflicting"]["em"] == 100.0 and table["cad"]["known/kept-own"]["em"] == 0.0
    assert table["cad"]["known/irrelevant"]["em"] == 0.0  # it repeated "Zinc is Zn."
    assert table["rag"]["unknown/gold"]["em"] == 100.0 and table["rag"]["unknown/conflicting"]["em"] == 100.0


@pytest.fixture(scope="module")
def questions_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def _reference_answers(llama_dir, method):
    """What the engine answers directly, asked as the evaluation asks: chat, greedy, gold passage."""
    llm = LLM(str(llama_dir), show_progress=False)
    contrast = {"method": method} if method != "rag" else None
    params = SamplingParams(temperature=0, max_tokens=6, context_contrast=contrast)
    out = llm.chat([[{"role": "user", "content": q["question"]}] for q in QUESTIONS], params,
                   documents=[[q["gold"]] for q in QUESTIONS], use_tqdm=False)
    return [o.outputs[0].text for o in out]


def test_eval_rag_offline_and_over_http_give_the_engine_answers(llama_dir, questions_file, tmp_path, one_thread):
    offline, served = tmp_path / "offline.json", tmp_path / "served.json"
    main(["eval", "rag", "--model", str(llama_dir), "--questions", str(questions_file), "--max-tokens", "6",
          "--json", str(offline), "--plot", str(tmp_path / "rag.png")])
    server = Server(llama_dir)
    try:
        main(["eval", "rag", "--base-url", server.url + "/v1", "--questions", str(questions_file),
              "--max-tokens", "6", "--json", str(served), "--concurrency", "2"])
    finally:
        server.stop()
    offline_items, served_items = json.loads(offline.read_text())["items"], json.loads(served.read_text())["items"]
    assert served_items == offline_items
    for method in ("rag", "acd"):
        assert [item[f"{method}/gold"] for item in offline_items] == _reference_answers(llama_dir, method)
    result = json.loads(offline.read_text())
    assert set(result["table"]) == {"no-rag", "rag", "cad", "acd", "adacad"}
    assert result["command"].startswith("counterpoint eval rag") and result["machine"] and result["date"]
    assert (tmp_path / "rag.png").stat().st_size > 0


def test_eval_decoding_offline_and_over_http(llama_dir, amateur_dir, tmp_path, one_thread):
    config = ["--config", 'greedy={"temperature": 0}', "--config", 'penalty={"temperature": 0, '
              '"repetition_penalty": 1.2}', "--limit", "2", "--scorer", str(llama_dir)]
    offline, served = tmp_path / "offline.json", tmp_path / "served.json"
    cd = ["--config", 'cd={"temperature": 0, "contrastive": {"amateur": "small", "beta": 0.5}}',
          "--amateur", f"small={amateur_dir}", "--sets", "factual"]
    main(["eval", "decoding", "--model", str(llama_dir), *config, "--json", str(offline), "--plot",
          str(tmp_path / "decoding.png")])
    main(["eval", "decoding", "--model", str(llama_dir), *cd, "--limit", "2", "--json", str(tmp_path / "cd.json")])
    # Without --config, --amateur replaces the bundled amateurs in the default table.
    main(["eval", "decoding", "--model", str(llama_dir), *cd[2:], "--limit", "1", "--json", str(tmp_path / "t.json")])
    assert set(json.loads((tmp_path / "t.json").read_text())["table"]) == {
        "greedy", "sampling T=0.7 p=0.9", "repetition penalty 1.2", "beam 4", "CD (small)"}
    server = Server(llama_dir)
    try:
        main(["eval", "decoding", "--base-url", server.url + "/v1", *config, "--json", str(served)])
    finally:
        server.stop()
    offline, served = json.loads(offline.read_text()), json.loads(served.read_text())
    assert served["outputs"] == offline["outputs"]
    factual = load("factual")
    conversations = [[{"role": "user", "content": item["question"]}] for item in (factual[0], factual[len(factual) // 2])]
    llm = LLM(str(llama_dir), amateur=str(amateur_dir), show_progress=False)
    direct = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=MAX_TOKENS["factual"]), use_tqdm=False)
    assert offline["outputs"]["greedy"]["factual"] == [o.outputs[0].text for o in direct]
    contrasted = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=MAX_TOKENS["factual"], contrastive={
        "amateur": "amateur", "beta": 0.5}), use_tqdm=False)
    assert json.loads((tmp_path / "cd.json").read_text())["outputs"]["cd"]["factual"] == [
        o.outputs[0].text for o in contrasted]
    row = offline["table"]["greedy"]
    assert row["coherence"] < 0 and 0 <= row["rep-2"] <= 100 and row["length"] > 0
