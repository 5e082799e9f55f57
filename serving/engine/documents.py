"""Retrieved documents rendered into a prompt: through the chat template's own `documents` argument
where the template has one, otherwise as one numbered context block before the question, the same
for chat and completions:

    Context:
    [1] first document
    [2] second document

    <the prompt, or the last user message>
"""

CONTEXT_HEADER = "Context:"


def context_block(documents: list[str]) -> str:
    lines = [f"[{i}] {doc}" for i, doc in enumerate(documents, start=1)]
    return "\n".join([CONTEXT_HEADER, *lines]) + "\n\n"


def prompt_with_documents(prompt: str | list[int], documents: list[str], tokenizer) -> str | list[int]:
    """A completions prompt with its documents; token-id prompts get the block's ids in front."""
    if isinstance(prompt, str):
        return context_block(documents) + prompt
    return tokenizer.encode(context_block(documents), add_special_tokens=False) + list(prompt)


def template_takes_documents(tokenizer) -> bool:
    template = tokenizer.chat_template or ""
    return "documents" in (template if isinstance(template, str) else str(template))


def chat_with_documents(messages: list[dict], documents: list[str], tokenizer) -> tuple[list[dict], dict]:
    """(messages, extra chat-template arguments) that carry the documents."""
    if template_takes_documents(tokenizer):
        return messages, {"documents": [{"title": f"Document {i}", "text": doc}
                                        for i, doc in enumerate(documents, start=1)]}
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        raise ValueError("documents need a user message to put their context block before")
    messages = [dict(m) for m in messages]
    messages[last_user]["content"] = context_block(documents) + (messages[last_user].get("content") or "")
    return messages, {}
