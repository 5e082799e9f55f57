"""Tool calls for chat: the `tools` a request offers, how they reach the prompt, the grammar that
enforces `tool_choice` "required" or a named function, and the parsing of the model's answer into
OpenAI's `tool_calls`.

A chat template that knows tools (it uses the `tools` variable) gets them through
`apply_chat_template(..., tools=...)`; for one that does not, a system block lists them and asks
for a JSON object `{"name": ..., "arguments": {...}}`. The answer is read as a call when it is
such an object, a list of them, or Hermes-style `<tool_call>{...}</tool_call>` blocks, naming an
offered function.
"""

import json
import re
import uuid

HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
FALLBACK_INSTRUCTIONS = ("You can call the functions below. To call one, answer with only a JSON object of the "
                         'form {"name": <function name>, "arguments": <an object of its parameters>}.\n'
                         "Functions:\n")


def check_tools(tools: list[dict] | None, tool_choice) -> list[dict]:
    """The offered functions; ValueError naming the field for a malformed tool or choice."""
    functions = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"tools.{i}: must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        if not isinstance(fn.get("parameters", {}), dict):
            raise ValueError(f"tools.{i}.function.parameters must be a JSON schema object")
        functions.append(fn)
    name = named_choice(tool_choice)
    if tool_choice not in (None, "none", "auto", "required") and name is None:
        raise ValueError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                         '"function": {"name": ...}}')
    if (tool_choice == "required" or name) and not functions:
        raise ValueError("tool_choice: required or a named function needs tools")
    if name and name not in {fn["name"] for fn in functions}:
        raise ValueError(f"tool_choice: function {name!r} is not among the tools")
    return functions


def named_choice(tool_choice) -> str | None:
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        return tool_choice["function"].get("name")
    return None


def call_schema(functions: list[dict], tool_choice) -> dict | None:
    """The JSON schema an answer must follow when a call is required (any offered function) or
    named (that one); None when the model may answer freely."""
    name = named_choice(tool_choice)
    if tool_choice != "required" and name is None:
        return None
    chosen = [fn for fn in functions if name is None or fn["name"] == name]
    options = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"enum": [fn["name"]]},
                               "arguments": fn.get("parameters") or {"type": "object"}}} for fn in chosen]
    return options[0] if len(options) == 1 else {"anyOf": options}


def template_knows_tools(tokenizer) -> bool:
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    return "tools" in template


def render_messages(messages: list[dict], functions: list[dict], tokenizer) -> tuple[list[dict], dict]:
    """(messages, apply_chat_template kwargs): tools through the template, or the fallback block,
    with earlier calls and tool results written as text the template can show."""
    messages = [_with_dict_arguments(m) for m in messages]
    if template_knows_tools(tokenizer):
        return messages, {"tools": [{"type": "function", "function": fn} for fn in functions]} if functions else {}
    flat = [_as_text(m) for m in messages]
    if not functions:
        return flat, {}
    block = FALLBACK_INSTRUCTIONS + json.dumps(functions, ensure_ascii=False)
    if flat and flat[0]["role"] == "system":
        return [{"role": "system", "content": f"{flat[0]['content']}\n\n{block}"}, *flat[1:]], {}
    return [{"role": "system", "content": block}, *flat], {}


def _with_dict_arguments(message: dict) -> dict:
    """OpenAI sends earlier calls' arguments as JSON text; templates expect objects (as in vLLM)."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    fixed = []
    for call in calls:
        fn = dict(call.get("function") or {})
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except json.JSONDecodeError:
                raise ValueError("messages: a tool call's function.arguments is not valid JSON") from None
        fixed.append({**call, "function": fn})
    return {**message, "tool_calls": fixed}


def _as_text(message: dict) -> dict:
    """A message a template without tool support can render: calls and results become text."""
    if message.get("role") == "tool":
        return {"role": "user", "content": f"Result of tool call {message.get('tool_call_id', '')}: "
                                           f"{message.get('content') or ''}"}
    if message.get("tool_calls"):
        calls = [{"name": c["function"]["name"], "arguments": c["function"].get("arguments", {})}
                 for c in message["tool_calls"]]
        text = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
        return {"role": "assistant", "content": ((message.get("content") or "") + text)}
    return {k: v for k, v in message.items() if k in ("role", "content")}


def parse_tool_calls(text: str, functions: list[dict]) -> list[dict] | None:
    """The calls in an answer, as OpenAI's tool_calls, or None when it is not a call."""
    names = {fn["name"] for fn in functions}
    blocks = HERMES.findall(text) or [text.strip()]
    calls = []
    for block in blocks:
        try:
            value = json.loads(block)
        except json.JSONDecodeError:
            return None
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, dict) or item.get("name") not in names:
                return None
            arguments = item.get("arguments", item.get("parameters", {}))
            if not isinstance(arguments, dict):
                return None
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": item["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
    return calls or None
