"""OpenAI-compatible request bodies (pydantic) and their translation to SamplingParams.

Standard fields follow the OpenAI API; the extensions of serving/api/README.md sit beside them at the top level
(the OpenAI SDK sends them through `extra_body`).
"""

import math
from dataclasses import fields
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from counterpoint.decoding import SamplingParams
from counterpoint.decoding.params import CONTEXT_CONTRAST_METHODS, ContrastiveParams
from counterpoint.serving.api.tools import call_schema, check_tools

_CD_DEFAULTS = {f.name: f.default for f in fields(ContrastiveParams)}

MAX_PROMPTS = 1024  # prompts in one completions request; a larger batch is a 400


def _check_values(value, path: str) -> None:
    """Every string must be encodable as UTF-8 (JSON can carry lone surrogates, which the
    tokenizer cannot take) and every number finite, at any depth, extra fields included."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise PydanticCustomError("invalid_text", "{field}: not valid Unicode text ({reason})",
                                      {"field": path or "body", "reason": err.reason}) from None
    elif isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("non_finite", "{field}: numbers must be finite; got {value}",
                                  {"field": path or "body", "value": str(value)})
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_values(key, path)
            _check_values(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_values(item, f"{path}.{i}" if path else str(i))


class _Body(BaseModel):
    """A request body: unknown top-level fields are ignored (as OpenAI clients send new ones),
    but every value is checked for broken text and non-finite numbers first."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _values(cls, data):
        _check_values(data, "")
        return data


class StreamOptions(BaseModel):
    include_usage: bool = False


class ContrastiveBody(BaseModel):
    """`contrastive`: every field checked here, so a bad one is a 400 naming `contrastive.<field>`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    amateur: str
    alpha: float = _CD_DEFAULTS["alpha"]
    beta: float = _CD_DEFAULTS["beta"]
    amateur_temperature: float = _CD_DEFAULTS["amateur_temperature"]


class ContextContrastBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal[CONTEXT_CONTRAST_METHODS]
    alpha: float = 0.5
    min_alpha: float = 0.0


class _Common(_Body):

    model: str
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions (serving/api/README.md).
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    contrastive: ContrastiveBody | None = None
    documents: list[str] | None = None
    context_contrast: ContextContrastBody | None = None
    return_decoding_info: bool = False
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured_outputs(self) -> dict | None:
        """vLLM's guided_* extensions as structured_outputs (at most one may be given)."""
        given = {name: getattr(self, f"guided_{name}") for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, f"guided_{name}") is not None}
        if len(given) > 1:
            raise ValueError(f"guided_{sorted(given)[1]}: give one of guided_json, guided_regex, guided_choice, "
                             "guided_grammar")
        if not given:
            return None
        (name, value), = given.items()
        return {name: value, "source": f"guided_{name}"}

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, **extra) -> SamplingParams:
        """Raises ValueError naming the field when a value is out of range."""
        if self.context_contrast is not None and not self.documents:
            raise ValueError("context_contrast needs documents: it contrasts the prompt with and without them")
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, logit_bias=self.logit_bias, seed=self.seed,
            max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop, ignore_eos=self.ignore_eos,
            stop_token_ids=self.stop_token_ids, include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            logprobs=logprobs, use_beam_search=self.use_beam_search, length_penalty=self.length_penalty,
            early_stopping=self.early_stopping, contrastive=_as_dict(self.contrastive),
            context_contrast=_as_dict(self.context_contrast), return_decoding_info=self.return_decoding_info,
            structured_outputs=extra.pop("structured_outputs", None) or self.structured_outputs(), **extra,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    best_of: int | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty")
        if len(p) > MAX_PROMPTS:
            raise ValueError(f"prompt: at most {MAX_PROMPTS} prompts per request; got {len(p)}")
        return list(p)

    def to_sampling_params(self) -> SamplingParams:
        if self.suffix:
            raise NotImplementedError("suffix is not supported (no fill-in-the-middle)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be >= 1 unless echo is set")
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self.sampling_params(self.max_tokens, self.logprobs, best_of=self.best_of,
                                    prompt_logprobs=prompt_logprobs)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content):
        """OpenAI's content parts: text parts are joined with newlines (as vLLM does); any other
        kind (images, audio) is refused, since the served models read text alone."""
        if not isinstance(content, list):
            return content
        for part in content:
            if part.get("type") != "text":
                raise ValueError(f"only text content parts are supported; got type {part.get('type')!r}")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text content part needs a string 'text'")
        return "\n".join(part["text"] for part in content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None

    def to_sampling_params(self) -> SamplingParams:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        structured = self._response_format()
        if structured and self.structured_outputs():
            raise ValueError("response_format: give either response_format or a guided_* field, not both")
        schema = call_schema(self.functions, self.tool_choice)
        if schema is not None:
            if structured or self.structured_outputs():
                raise ValueError("tool_choice: a required or named tool call cannot be combined with "
                                 "response_format or guided_*")
            structured = {"json": schema, "source": "tool_choice"}
        return self.sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None,
                                    structured_outputs=structured)

    def _response_format(self) -> dict | None:
        """OpenAI's response_format as structured_outputs: json_object is any JSON object,
        json_schema the schema in json_schema.schema."""
        rf = self.response_format
        kind = rf.get("type") if isinstance(rf, dict) else None
        if rf is None or kind == "text":
            return None
        if kind == "json_object":
            return {"json_object": True, "source": "response_format"}
        if kind == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise ValueError("response_format.json_schema.schema must be a JSON schema object")
            return {"json": spec["schema"], "strict": spec.get("strict") is not False, "source": "response_format"}
        raise ValueError(f"response_format.type must be text, json_object or json_schema; got {kind!r}")

    @property
    def functions(self) -> list[dict]:
        """The offered functions (validated: ValueError naming tools or tool_choice)."""
        return check_tools(self.tools, self.tool_choice)

    @property
    def uses_tools(self) -> bool:
        """Tools reach the prompt and the answer is parsed for calls (tool_choice is not "none")."""
        return bool(self.tools) and self.tool_choice != "none"


    def message_dicts(self) -> list[dict]:
        return [m.model_dump(exclude_none=True) for m in self.messages]


class TokenizeRequest(_Body):
    model: str | None = None  # default: the first served model, as in vLLM
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def _as_dict(body: BaseModel | None) -> dict | None:
    return None if body is None else body.model_dump()
