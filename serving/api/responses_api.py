"""POST /v1/responses, OpenAI's Responses API for text: `input` as a string or a message list,
`instructions`, `max_output_tokens`, `temperature`, `top_p`, `text.format` (text, json_object,
json_schema) and `stream` with the Responses event sequence. A request becomes a chat request and
runs as one; the reply is one output message of `output_text`.
"""

import time
import uuid

from fastapi import APIRouter, Request
from pydantic import Field

from counterpoint.serving.api import responses as R
from counterpoint.serving.api.completions import params_or_400, render_chat
from counterpoint.serving.api.engine_streams import last_all, start_all
from counterpoint.serving.api.errors import APIError
from counterpoint.serving.api.protocol import ChatCompletionRequest, _Body
from counterpoint.serving.api.state import state
from counterpoint.serving.api.streaming import sse

router = APIRouter()
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


class ResponsesRequest(_Body):
    model: str
    input: str | list[dict]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    text: dict | None = None
    tools: list[dict] | None = None
    previous_response_id: str | None = None

    def messages(self) -> list[dict]:
        """The input as chat messages, `instructions` first as a system message."""
        if self.tools:
            raise NotImplementedError("tools are not supported on /v1/responses yet; use /v1/chat/completions")
        if self.previous_response_id:
            raise NotImplementedError("previous_response_id is not supported: responses are not stored")
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        for i, item in enumerate(items):
            role = ROLES.get(item.get("role")) if isinstance(item, dict) else None
            if role is None or item.get("type", "message") != "message":
                raise ValueError(f"input.{i}: expected a message with role user, assistant, system or developer")
            messages.append({"role": role, "content": _text(item.get("content"), f"input.{i}.content")})
        return messages

    def as_chat(self) -> ChatCompletionRequest:
        fmt = (self.text or {}).get("format") or {"type": "text"}
        response_format = fmt if fmt.get("type") != "json_schema" else {"type": "json_schema", "json_schema": {
            "name": fmt.get("name", "output"), "schema": fmt.get("schema"), "strict": fmt.get("strict")}}
        return ChatCompletionRequest(model=self.model, messages=self.messages(), max_tokens=self.max_output_tokens,
                                     temperature=self.temperature, top_p=self.top_p, response_format=response_format)


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text")
                                         for p in content):
        return "\n".join(p.get("text", "") for p in content)
    raise ValueError(f"{where}: only text (a string or input_text / output_text parts) is supported")


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request):
    server = state(request)
    chat = _chat_or_400(body)
    params = params_or_400(chat)
    tokenizer = server.tokenizer(body.model)
    prompt, ids, _ = await server.off_loop(render_chat, chat.message_dicts(), None, params, tokenizer, [])
    gen = server.engine.generate(prompt, params, "resp", body.model, prompt_token_ids=ids)
    [stream] = await start_all([gen], request, {"prompt": "input", "max_tokens": "max_output_tokens"})
    ids_ = {"response": f"resp_{uuid.uuid4().hex}", "message": f"msg_{uuid.uuid4().hex}", "created": int(time.time())}
    if body.stream:
        return sse(_events(body, stream, ids_))
    [out] = await last_all([stream], request)
    return _response(body, ids_, out.outputs[0].text, out.outputs[0].finish_reason,
                     R.usage(len(out.prompt_token_ids), len(out.outputs[0].token_ids)))


def _chat_or_400(body: ResponsesRequest) -> ChatCompletionRequest:
    try:
        return body.as_chat()
    except NotImplementedError as err:
        raise APIError(400, str(err), param=str(err).split(" ", 1)[0], code="not_supported") from err
    except ValueError as err:
        raise APIError(400, str(err), param=str(err).split(":", 1)[0]) from err


def _response(body: ResponsesRequest, ids: dict, text: str | None, finish_reason: str | None,
              usage: dict | None) -> dict:
    """The Response object: in progress (text None) or complete."""
    done = text is not None
    status = "in_progress" if not done else ("incomplete" if finish_reason == "length" else "completed")
    output = [_message(ids, text, "completed")] if done else []
    return {
        "id": ids["response"], "object": "response", "created_at": ids["created"], "status": status,
        "model": body.model, "output": output, "instructions": body.instructions, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "max_output_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p,
        "text": body.text or {"format": {"type": "text"}}, "tools": [], "tool_choice": "auto",
        "parallel_tool_calls": False, "metadata": {},
        "usage": None if usage is None else {
            "input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}},
    }


def _message(ids: dict, text: str, status: str) -> dict:
    content = [{"type": "output_text", "text": text, "annotations": []}] if text is not None else []
    return {"type": "message", "id": ids["message"], "status": status, "role": "assistant", "content": content}


async def _events(body: ResponsesRequest, stream, ids: dict):
    """The Responses stream: created, in_progress, the output item and its text part opened, text
    deltas, each closed with its full text, then completed (or incomplete) with usage."""
    seq = iter(range(1 << 30))
    part = {"item_id": ids["message"], "output_index": 0, "content_index": 0}
    yield {"type": "response.created", "sequence_number": next(seq), "response": _response(body, ids, None, None, None)}
    yield {"type": "response.in_progress", "sequence_number": next(seq),
           "response": _response(body, ids, None, None, None)}
    yield {"type": "response.output_item.added", "sequence_number": next(seq), "output_index": 0,
           "item": _message(ids, None, "in_progress")}
    yield {"type": "response.content_part.added", "sequence_number": next(seq), **part,
           "part": {"type": "output_text", "text": "", "annotations": []}}
    sent, out = 0, None
    try:
        async for out in stream:
            text = out.outputs[0].text
            if len(text) > sent:
                yield {"type": "response.output_text.delta", "sequence_number": next(seq), **part,
                       "delta": text[sent:], "logprobs": []}
                sent = len(text)
    finally:
        await stream.aclose()
    final = out.outputs[0]
    yield {"type": "response.output_text.done", "sequence_number": next(seq), **part, "text": final.text,
           "logprobs": []}
    yield {"type": "response.content_part.done", "sequence_number": next(seq), **part,
           "part": {"type": "output_text", "text": final.text, "annotations": []}}
    yield {"type": "response.output_item.done", "sequence_number": next(seq), "output_index": 0,
           "item": _message(ids, final.text, "completed")}
    response = _response(body, ids, final.text, final.finish_reason,
                         R.usage(len(out.prompt_token_ids), len(final.token_ids)))
    kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
    yield {"type": kind, "sequence_number": next(seq), "response": response}
