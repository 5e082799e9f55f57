"""The synthetic world: invented countries with four attributes each ("The capital of Velora is
Brindt."), a training text that teaches a small model some of them by heart and how to read the
others from a passage, and evaluation questions with gold, conflicting and irrelevant passages.

Each attribute draws its values from its own pool: invented words for capital, river and ruler, common
words for export. So every value is a familiar word to the model, as "Paris" is to a real one, and
what is learned or read is which country has it.

The countries come in three groups:
- known: their facts appear as statements and as questions answered with no passage, with a
  distractor passage (about another country) and with the gold passage;
- reading: their facts appear only in questions answered from the gold passage, each once, so
  the model learns to read rather than to recall;
- held out: never in the training text; evaluation only.
"""

import random
import re
from dataclasses import dataclass

from counterpoint.serving.engine.documents import prompt_with_documents


@dataclass(frozen=True)
class Attribute:
    name: str
    statements: tuple[str, ...]  # phrasings with {country} and {value}
    question: str
    pool: tuple[str, ...] = ()  # its values; empty: POOL_SIZE invented words drawn with the world


EXPORTS = ("salt", "wool", "copper", "amber", "silk", "timber", "honey", "marble", "cotton", "coffee",
           "pepper", "glass", "linen", "ivory", "pearls", "barley", "indigo", "cedar", "saffron", "leather")

ATTRIBUTES = (
    Attribute("capital", ("The capital of {country} is {value}.", "{value} is the capital of {country}.",
                          "{country} is governed from {value}."), "What is the capital of {country}?"),
    Attribute("river", ("The longest river of {country} is {value}.", "{value} is the longest river of {country}.",
                        "{country}'s longest river is {value}."), "What is the longest river of {country}?"),
    Attribute("ruler", ("The ruler of {country} is {value}.", "{value} rules {country}.",
                        "{country} is ruled by {value}."), "Who rules {country}?"),
    Attribute("export", ("The main export of {country} is {value}.", "{country} mainly exports {value}.",
                         "Most of what {country} sells abroad is {value}."), "What is the main export of {country}?",
              pool=EXPORTS),
)
BY_NAME = {a.name: a for a in ATTRIBUTES}
PASSAGE_FACTS = 2  # sentences in a passage: the asked fact and one more about the same country
POOL_SIZE = 100

ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "th", "v", "z")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
CODAS = ("", "", "", "n", "r", "l", "s", "nd", "rk", "th")


@dataclass(frozen=True)
class Country:
    name: str
    facts: dict[str, str]  # attribute name -> value


@dataclass(frozen=True)
class World:
    pools: dict[str, tuple[str, ...]]  # attribute name -> the values it takes
    known: tuple[Country, ...]
    reading: tuple[Country, ...]
    held_out: tuple[Country, ...]


class Lexicon:
    """Invented words, none a part of another, of a common value or of the templates' text, so a
    passage contains a value (as a substring) exactly when it states it."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.words: set[str] = {w for a in ATTRIBUTES for w in a.pool}
        reserved = " ".join(t for a in ATTRIBUTES for t in (*a.statements, a.question, *a.pool))
        self.parts = set().union(*map(_substrings, re.findall(r"[a-z]+", reserved.lower())))

    def new(self) -> str:
        while True:
            syllables = [self.rng.choice(ONSETS) + self.rng.choice(VOWELS) for _ in range(2)]
            word = "".join(syllables) + self.rng.choice(CODAS)
            if len(word) >= 5 and word not in self.parts and not _substrings(word) & self.words:
                self.words.add(word)
                self.parts |= _substrings(word)
                return word.capitalize()


def _substrings(text: str) -> set[str]:
    return {text[i:j] for i in range(len(text)) for j in range(i + 1, len(text) + 1)}


def make_world(seed: int, num_known: int, num_held_out: int, num_reading: int) -> World:
    """Every name and value drawn from `seed`: the same seed gives the same world."""
    rng = random.Random(seed)
    lexicon = Lexicon(rng)
    pools = {a.name: a.pool or tuple(lexicon.new() for _ in range(POOL_SIZE)) for a in ATTRIBUTES}

    def country() -> Country:
        return Country(lexicon.new(), {name: rng.choice(pool) for name, pool in pools.items()})

    groups = [tuple(country() for _ in range(n)) for n in (num_known, num_reading, num_held_out)]
    return World(pools, *groups)


def statement(country: Country, attribute: str, rng: random.Random) -> str:
    template = rng.choice(BY_NAME[attribute].statements)
    return template.format(country=country.name, value=country.facts[attribute])


def passage(country: Country, attributes: list[str], rng: random.Random) -> str:
    """One statement per attribute, in random order and phrasings."""
    return " ".join(statement(country, a, rng) for a in rng.sample(attributes, len(attributes)))


def gold_passage(country: Country, attribute: str, rng: random.Random) -> str:
    others = rng.sample([a.name for a in ATTRIBUTES if a.name != attribute], PASSAGE_FACTS - 1)
    return passage(country, [attribute, *others], rng)


def question(country: Country, attribute: str) -> str:
    return BY_NAME[attribute].question.format(country=country.name)


def prompt(question_text: str, passage_text: str | None = None) -> str:
    """The evaluation prompt: the question alone, or after a numbered context block (the engine's
    own rendering for models without a chat template). The answer follows as " " + answer + "\\n"."""
    text = f"Question: {question_text}\nAnswer:"
    return text if passage_text is None else prompt_with_documents(text, [passage_text], tokenizer=None)


def qa_example(country: Country, attribute: str, passage_text: str | None = None) -> str:
    return f"{prompt(question(country, attribute), passage_text)} {country.facts[attribute]}\n"


def training_examples(world: World, seed: int, repeats: int, passage_every: int) -> list[str]:
    """Every reading fact once, asked of its gold passage; every known fact `repeats` times as a
    statement and as a question with no passage, and every `passage_every`-th time also asked with
    a distractor and with its gold passage. Shuffled."""
    rng = random.Random(seed)
    examples = [e for country in world.reading for e in reading_examples(country, rng)]
    trained = world.known + world.reading
    for i in range(repeats):
        for country in world.known:
            for a in ATTRIBUTES:
                examples += [statement(country, a.name, rng) + "\n", qa_example(country, a.name)]
                if i % passage_every == 0:
                    examples += [qa_example(country, a.name, distractor(trained, country, rng)),
                                 qa_example(country, a.name, gold_passage(country, a.name, rng))]
    rng.shuffle(examples)
    return examples


def reading_examples(country: Country, rng: random.Random) -> list[str]:
    """Each fact once, asked of a passage that states it and PASSAGE_FACTS - 1 others. The
    questions on one passage follow one another: the repeated passage also teaches copying."""
    names = rng.sample([a.name for a in ATTRIBUTES], len(ATTRIBUTES))
    examples = []
    for i in range(0, len(names), PASSAGE_FACTS):
        group = names[i : i + PASSAGE_FACTS]
        shared = passage(country, group, rng)
        examples.append("\n".join(qa_example(country, a, shared) for a in group))
    return examples


def distractor(countries: tuple[Country, ...], country: Country, rng: random.Random) -> str:
    """A passage about another of `countries`, on any attributes (the asked one included)."""
    other = country
    while other is country:
        other = rng.choice(countries)
    return passage(other, rng.sample([a.name for a in ATTRIBUTES], PASSAGE_FACTS), rng)


def eval_questions(world: World, seed: int) -> list[dict]:
    """One question per fact of the known and the held-out countries, each with its gold passage,
    the same passage stating another country's value, and an irrelevant passage."""
    rng = random.Random(seed)
    return [_eval_question(country, a.name, group, known, world.pools, rng)
            for group, known in ((world.known, True), (world.held_out, False))
            for country in group for a in ATTRIBUTES]


def _eval_question(country: Country, attribute: str, group: tuple[Country, ...], known: bool,
                   pools: dict[str, tuple[str, ...]], rng: random.Random) -> dict:
    answer = country.facts[attribute]
    # In a tiny world every other country may share the value: then any other of the pool.
    conflict = rng.choice(sorted({c.facts[attribute] for c in group} - {answer})
                          or sorted(set(pools[attribute]) - {answer}))
    gold = gold_passage(country, attribute, rng)
    other = rng.choice([c for c in group if c is not country])
    # NOTE: the other country's other facts come from other pools, so they name neither the
    # answer nor the conflicting value.
    unasked = rng.sample([a.name for a in ATTRIBUTES if a.name != attribute], PASSAGE_FACTS)
    return {"id": f"world-{'known' if known else 'heldout'}-{country.name.lower()}-{attribute}",
            "category": attribute, "question": question(country, attribute), "answers": [answer], "gold": gold,
            "conflict_answer": conflict, "conflicting": gold.replace(answer, conflict),
            "irrelevant": passage(other, unasked, rng), "known": known}
