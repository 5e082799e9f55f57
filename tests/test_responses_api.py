"""POST /v1/responses with the official openai client: the same text as the chat route on the same
messages, the stream's event sequence, text.format json_schema, and 400s."""

import json

import jsonschema
import openai
import pytest

from test_http_server import MODEL, Server

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}


@pytest.fixture(scope="module")
def server(llama_dir):
    s = Server(llama_dir)
    yield s
    s.stop()


def test_response_equals_the_chat_answer(server):
    client = server.client()
    resp = client.responses.create(model=MODEL, instructions="Be brief.", input="Paris is", max_output_tokens=8,
                                   temperature=0)
    chat = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris is"}])
    assert resp.output_text == chat.choices[0].message.content
    assert resp.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert resp.usage.output_tokens == chat.usage.completion_tokens
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    listed = client.responses.create(model=MODEL, max_output_tokens=8, temperature=0, input=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Paris is"}]}])
    assert listed.output_text == resp.output_text


def test_streamed_events_build_the_same_text(server):
    client = server.client()
    expected = client.responses.create(model=MODEL, input="The quick brown", max_output_tokens=10, temperature=0)
    events = list(client.responses.create(model=MODEL, input="The quick brown", max_output_tokens=10, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected.output_text
    assert events[-1].response.output_text == expected.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_text_format_json_schema(server):
    resp = server.client().responses.create(model=MODEL, input="Is it raining?", max_output_tokens=30,
                                            temperature=1.2, text={"format": {"type": "json_schema", "name": "a",
                                                                              "schema": SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(resp.output_text), SCHEMA)


def test_bad_input_is_a_400(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input=[{"role": "robot", "content": "hi"}], max_output_tokens=4)
    assert "input.0" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_1", max_output_tokens=4)
    assert "previous_response_id" in str(err.value)
