"""Tool calls over HTTP with the official openai client: `tool_choice` required and named are
enforced by the grammar, so even a tiny random model answers with a call whose arguments validate;
streamed calls reassemble to the same; calls and tool results are accepted in the history."""

import json

import jsonschema
import openai
import pytest

from test_http_server import MODEL, Server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                                       "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}}}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(model_factory):
    # NOTE: a longer context than the other tests' model: the tools' JSON takes many tokens of
    # the tiny test vocabulary
    s = Server(model_factory("llama", max_position_embeddings=2048))
    yield s
    s.stop()


def check_call(call, tools=(WEATHER, TIME)):
    spec = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), spec[call.function.name])


@pytest.mark.parametrize("temperature", [0, 1.3])
def test_required_gives_a_valid_call(server, temperature):
    client = server.client()
    for seed in range(3):
        resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME],
                                              tool_choice="required", max_tokens=120, temperature=temperature,
                                              seed=seed)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        check_call(call)


def test_named_function_and_streamed_calls(server):
    client = server.client()
    named = {"type": "function", "function": {"name": "get_time"}}
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], tool_choice=named,
                                          max_tokens=120, temperature=0)
    [call] = resp.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    check_call(call)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER, TIME], tool_choice=named,
                                            max_tokens=120, temperature=0, stream=True)
    parts, finish = {}, None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                entry = parts.setdefault(delta.index, {"name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert parts == {0: {"name": "get_time", "arguments": call.function.arguments}}


def test_history_with_calls_and_results_and_auto(server):
    client = server.client()
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "C"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    resp = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="auto",
                                          max_tokens=8, temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert (choice.message.content is not None) != bool(choice.message.tool_calls)


def test_bad_tools_are_400s_naming_the_field(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, tool_choice="required")
    assert "tool_choice" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "tool_choice" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, tools=[{"type": "web"}])
    assert "tools.0" in str(err.value)
