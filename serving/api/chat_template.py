"""Chat messages to a prompt through the model's own chat template."""

import jinja2

from counterpoint.serving.api.errors import APIError


def chat_prompt(tokenizer, messages: list[dict], **kwargs):
    """The model's chat template over the messages; a template that refuses them is a 400."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except (ValueError, TypeError, jinja2.TemplateError) as err:
        raise APIError(400, f"messages: the chat template refused them: {err}", param="messages") from err
