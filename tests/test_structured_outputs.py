"""Structured outputs (xgrammar) over HTTP with the official openai client against a real uvicorn
server: a tiny random model cannot write valid JSON by itself, so every valid answer here is the
grammar's doing. Greedy, sampling at temperature 1.5, n = 3, contrastive decoding, beam search."""

import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from test_http_decoding import server  # noqa: F401  (the served model and its amateur)
from test_http_server import MODEL

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "ok", "count"],
          "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                         "count": {"type": "integer", "minimum": 0, "maximum": 99}}}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Describe the sky as JSON."}]


class Answer(BaseModel):
    color: Literal["red", "green", "blue"]
    ok: bool
    count: int = Field(ge=0, le=99)


@pytest.mark.parametrize("decoding", [
    dict(temperature=0),
    dict(temperature=1.5, n=3),
    dict(temperature=0, extra_body={"contrastive": {"amateur": "amateur", "alpha": 0.1, "beta": 1.0}}),
    dict(temperature=0, n=2, extra_body={"use_beam_search": True}),
])
def test_json_schema_answers_validate(server, decoding):
    client = server.client()
    decoding = dict(decoding)
    extra = decoding.pop("extra_body", {})
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64, seed=0,
                                          response_format=RESPONSE_FORMAT, extra_body=extra, **decoding)
    assert len(resp.choices) == decoding.get("n", 1)
    for choice in resp.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_twenty_samples_at_high_temperature_all_validate(server):
    client = server.client()
    for seed in range(20):
        resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64, seed=seed,
                                              temperature=1.5, response_format=RESPONSE_FORMAT)
        jsonschema.validate(json.loads(resp.choices[0].message.content), SCHEMA)


def test_parse_returns_the_pydantic_object(server):
    resp = server.client().beta.chat.completions.parse(model=MODEL, messages=MESSAGES, max_tokens=60,
                                                      temperature=0, response_format=Answer)
    answer = resp.choices[0].message.parsed
    assert isinstance(answer, Answer)


def test_json_object_and_vllm_guided_fields(server):
    client = server.client()
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=30, temperature=0,
                                          response_format={"type": "json_object"})
    text = resp.choices[0].message.content
    if resp.choices[0].finish_reason == "stop":  # any object is allowed, so it may run out of tokens
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")
    resp = client.completions.create(model=MODEL, prompt="The answer:", max_tokens=10, temperature=1.0, seed=1,
                                     extra_body={"guided_choice": ["yes", "no", "maybe later"]})
    assert resp.choices[0].text in ("yes", "no", "maybe later")
    resp = client.completions.create(model=MODEL, prompt="Code:", max_tokens=20, temperature=1.0, seed=2,
                                     extra_body={"guided_regex": r"[A-Z]{3}-[0-9]{2}"})
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", resp.choices[0].text)
    stream = client.completions.create(model=MODEL, prompt="x", max_tokens=64, temperature=1.2, seed=3, stream=True,
                                       extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads("".join(chunk.choices[0].text for chunk in stream if chunk.choices)), SCHEMA)


def test_invalid_schema_is_a_400_naming_the_field(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 3}}})
    assert "response_format" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=5, extra_body={"guided_regex": "(unclosed"})
    assert "guided_regex" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5,
                                       response_format={"type": "xml"})
    assert "response_format.type" in str(err.value)
