"""The synthetic world: the same seed gives the same world; held-out facts never reach the training
text; every question line has the evaluation schema with consistent passages; `train world` runs
end to end and writes a model transformers loads."""

import argparse
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from counterpoint.serving.engine.documents import prompt_with_documents
from counterpoint.training.cli import add_train_parser, run_train
from counterpoint.training.world import ATTRIBUTES, eval_questions, make_world, prompt, question, training_examples
from counterpoint.training.world_train import WorldConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = (10, 10, 40)
FIELDS = {"id", "category", "question", "answers", "gold", "conflict_answer", "conflicting", "irrelevant", "known"}


def generate(seed: int):
    world = make_world(seed, *SIZES)
    return world, training_examples(world, seed, repeats=2, passage_every=1), eval_questions(world, seed)


def test_the_seed_fixes_the_world():
    assert generate(0) == generate(0)
    world, text, questions = generate(0)
    other_world, other_text, other_questions = generate(1)
    assert world.known[0].name != other_world.known[0].name
    assert text != other_text and questions != other_questions


def test_held_out_facts_never_reach_the_training_text():
    world, examples, _ = generate(0)
    text = "".join(examples).lower()
    # Values are words of shared pools (as "Paris" is a familiar word); a fact is a country with its
    # value, so a held-out country's name must never appear.
    assert all(country.name.lower() not in text for country in world.held_out)
    reading = world.reading[0].name
    mentions = [e for e in examples if reading in e]
    assert len(mentions) >= 2 and all(e.startswith("Context:\n[1] ") for e in mentions)  # read, never told


def test_every_question_has_the_schema_and_consistent_passages():
    world, _, questions = generate(0)
    lines = [json.loads(json.dumps(q)) for q in questions]
    assert len(lines) == (SIZES[0] + SIZES[1]) * len(ATTRIBUTES)
    assert sum(q["known"] for q in lines) == SIZES[0] * len(ATTRIBUTES)
    assert len({q["id"] for q in lines}) == len(lines)
    for q in lines:
        assert set(q) == FIELDS and q["category"] in {a.name for a in ATTRIBUTES}
        answer, conflict = q["answers"][0].lower(), q["conflict_answer"].lower()
        gold, conflicting, irrelevant = q["gold"].lower(), q["conflicting"].lower(), q["irrelevant"].lower()
        assert conflict != answer
        assert answer in gold and conflict not in gold
        assert conflict in conflicting and answer not in conflicting
        assert answer not in irrelevant and conflict not in irrelevant


def test_training_questions_use_the_evaluation_prompt():
    """Exactly what the evaluator sends, with " answer\n" after it: the engine's context block for
    a passage, the bare question otherwise."""
    world, examples, _ = generate(0)
    text = "\n".join(examples)
    head = "Context:\n[1] "
    country = world.reading[0]
    for attribute in ATTRIBUTES:
        asked = f"Question: {question(country, attribute.name)}\nAnswer:"
        start = text.rindex(head, 0, text.index(asked)) + len(head)
        passage = text[start : text.index("\n", start)]
        assert f"{prompt_with_documents(asked, [passage], None)} {country.facts[attribute.name]}\n" in text
    known = world.known[0]
    assert f"\n{prompt(question(known, 'ruler'))} {known.facts['ruler']}\n" in text


def test_the_parser_defaults_are_the_recipe():
    args = parse(["train", "world", "out"])
    recipe = WorldConfig(out="out")
    assert args.steps == recipe.steps and args.seed == recipe.seed
    assert args.num_entities == [recipe.num_known, recipe.num_held_out, recipe.num_reading]


def test_train_world_writes_questions_and_a_model_transformers_loads(tmp_path, capsys):
    run_train(parse(["train", "world", str(tmp_path), "--entities", "3", "3", "10", "--steps", "4"]))
    assert "greedy exact match" in capsys.readouterr().out
    lines = (tmp_path / "world.jsonl").read_text().splitlines()
    assert len(lines) == 6 * len(ATTRIBUTES) and all(set(json.loads(line)) == FIELDS for line in lines)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.config.num_hidden_layers >= 1
    record = json.loads((tmp_path / "counterpoint.json").read_text())
    assert record["command"] == "train world" and 0 <= record["metrics"]["em_held_out_gold"] <= 1


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)
