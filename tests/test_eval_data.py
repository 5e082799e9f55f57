"""The evaluation data shipped in counterpoint.serving.eval: each factual item's gold passage states
one of its answers, its conflicting passage states the wrong answer instead, and its irrelevant
passage states neither; each arithmetic answer is an integer that is not one of the question's own
numbers (a scorer takes the first number in the output that the question does not contain)."""

import json
import re
from importlib.resources import files

DATA = files("counterpoint.serving.eval") / "data"
FACTUAL_KEYS = {"id", "category", "question", "answers", "gold", "conflict_answer", "conflicting", "irrelevant"}
PASSAGES = ("gold", "conflicting", "irrelevant")
MAX_PASSAGE_WORDS = 40
ID = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
NUMBER_WORDS = re.compile(r"\b(zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|thirty"
                          r"|forty|fifty|hundred|thousand|dozen|half|twice|double|triple)\b", re.IGNORECASE)


def load(name):
    with (DATA / name).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


FACTUAL = load("factual.jsonl")
OPEN_ENDED = load("open_ended.jsonl")
ARITHMETIC = load("arithmetic.jsonl")


def norm(text):
    """Lowercased, every run of punctuation or spaces one space: 'Washington, D.C.' -> 'washington d c'."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def contains(text, phrase):
    """Whether `phrase` occurs in `text` as whole words."""
    return f" {norm(phrase)} " in f" {norm(text)} "


def assert_ids(items):
    ids = [item["id"] for item in items]
    assert all(ID.fullmatch(i) for i in ids), [i for i in ids if not ID.fullmatch(i)]
    assert len(set(ids)) == len(ids), sorted(i for i in set(ids) if ids.count(i) > 1)


def is_text(value):
    return isinstance(value, str) and value.strip() == value and value != ""


def test_factual_items_are_well_formed():
    for item in FACTUAL:
        assert set(item) == FACTUAL_KEYS, item["id"]
        assert all(is_text(item[k]) for k in FACTUAL_KEYS - {"answers"}), item["id"]
        assert isinstance(item["answers"], list) and item["answers"], item["id"]
        assert all(is_text(a) for a in item["answers"]), item["id"]
    assert_ids(FACTUAL)
    assert len(FACTUAL) >= 250
    assert len({item["category"] for item in FACTUAL}) >= 4


def test_gold_states_an_answer_and_conflicting_states_the_wrong_one():
    bad_gold = [i["id"] for i in FACTUAL if not any(contains(i["gold"], a) for a in i["answers"])]
    bad_conflicting = [i["id"] for i in FACTUAL if not contains(i["conflicting"], i["conflict_answer"])
                       or any(contains(i["conflicting"], a) for a in i["answers"])]
    assert bad_gold == []
    assert bad_conflicting == []


def test_conflict_answer_and_answers_do_not_contain_each_other():
    bad = [i["id"] for i in FACTUAL
           if any(contains(a, i["conflict_answer"]) or contains(i["conflict_answer"], a) for a in i["answers"])]
    assert bad == []


def test_irrelevant_passage_states_neither_answer():
    bad = [i["id"] for i in FACTUAL if contains(i["irrelevant"], i["conflict_answer"])
           or any(contains(i["irrelevant"], a) for a in i["answers"])]
    assert bad == []


def test_passages_are_short_and_do_not_quote_the_question():
    long = [(i["id"], k) for i in FACTUAL for k in PASSAGES if len(i[k].split()) > MAX_PASSAGE_WORDS]
    quoting = [(i["id"], k) for i in FACTUAL for k in PASSAGES if contains(i[k], i["question"])]
    assert long == []
    assert quoting == []


def test_open_ended_prompts_are_well_formed():
    assert all(set(item) == {"id", "prompt"} and is_text(item["prompt"]) for item in OPEN_ENDED)
    assert_ids(OPEN_ENDED)
    assert len(OPEN_ENDED) >= 30


def test_arithmetic_answers_are_integers_not_in_the_question():
    for item in ARITHMETIC:
        assert set(item) == {"id", "question", "answer"} and is_text(item["question"]), item
        assert type(item["answer"]) is int, item["id"]
        assert item["answer"] not in {int(n) for n in re.findall(r"\d+", item["question"])}, item["id"]
        assert not NUMBER_WORDS.search(item["question"]), item["id"]
    assert_ids(ARITHMETIC)
    assert len(ARITHMETIC) >= 30
