"""SamplingParams: every per-request decoding choice, validated on construction.

Field names follow vLLM's, and the HTTP body's extensions use the same names (serving/api/README.md).
"""

import math
from dataclasses import MISSING, dataclass, field, fields

MAX_LOGPROBS = 20


def _check(ok: bool, name: str, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}; got {got!r}")


def _check_reals(obj, names: tuple[str, ...], prefix: str = "") -> None:
    """Each named field is a finite real number (NOTE: an inf, a NaN or a string would fail later,
    inside an engine step, for the whole batch)."""
    for name in names:
        value = getattr(obj, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        _check(ok, prefix + name, "a finite number", value)


def _is_token_id(key) -> bool:
    """An int, or its decimal string as JSON object keys carry it."""
    return (isinstance(key, int) and not isinstance(key, bool) and key >= 0) or \
        (isinstance(key, str) and key.isascii() and key.isdecimal())


@dataclass(slots=True)
class ContrastiveParams:
    """Contrastive decoding against an amateur model (Li et al. 2023); see decoding/README.md."""

    amateur: str
    # NOTE: chosen for the bundled pair (the expert and its anti-expert) by `counterpoint eval
    # decoding` (README): Li et al.'s α = 0.1, β = 1 cost it almost half of its factual answers.
    alpha: float = 0.25
    beta: float = 0.5
    amateur_temperature: float = 1.0

    def __post_init__(self):
        _check(isinstance(self.amateur, str) and bool(self.amateur), "contrastive.amateur", "a served model id",
               self.amateur)
        _check_reals(self, ("alpha", "beta", "amateur_temperature"), "contrastive.")
        _check(0 < self.alpha <= 1, "contrastive.alpha", "in (0, 1]", self.alpha)
        _check(self.beta >= 0, "contrastive.beta", ">= 0", self.beta)
        _check(self.amateur_temperature > 0, "contrastive.amateur_temperature", "> 0", self.amateur_temperature)


STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(slots=True)
class StructuredOutputsParams:
    """Constrain the output to a language (vLLM's `structured_outputs`): a JSON schema, any JSON
    object, a regular expression, one of a list of strings, or an EBNF grammar. Exactly one.
    `source` is the request field it came from, named in errors (`response_format`, say)."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    strict: bool = True  # JSON schemas: no properties beyond those the schema lists (OpenAI's `strict`)
    source: str = "structured_outputs"

    def __post_init__(self):
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        _check(len(given) == 1, self.source, f"exactly one of {', '.join(STRUCTURED_KINDS)}", given or None)
        if self.json is not None:
            _check(isinstance(self.json, (dict, str)), self.source, "a JSON schema (an object)", self.json)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, str) and value), self.source, "a non-empty string", value)
        if self.choice is not None:
            ok = isinstance(self.choice, list) and self.choice and all(isinstance(c, str) for c in self.choice)
            _check(ok, self.source, "a non-empty list of strings", self.choice)

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))


CONTEXT_CONTRAST_METHODS = ("acd", "cad", "adacad")


@dataclass(slots=True)
class ContextContrastParams:
    """Contrast of the prompt with and without retrieved documents: CAD, ACD or AdaCAD."""

    method: str
    alpha: float = 0.5
    min_alpha: float = 0.0

    def __post_init__(self):
        _check_reals(self, ("alpha", "min_alpha"), "context_contrast.")
        _check(self.method in CONTEXT_CONTRAST_METHODS, "context_contrast.method",
               f"one of {', '.join(CONTEXT_CONTRAST_METHODS)}", self.method)
        _check(self.alpha >= 0, "context_contrast.alpha", ">= 0", self.alpha)
        _check(self.min_alpha >= 0, "context_contrast.min_alpha", ">= 0", self.min_alpha)


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    contrastive: ContrastiveParams | dict | None = None
    context_contrast: ContextContrastParams | dict | None = None
    structured_outputs: StructuredOutputsParams | dict | None = None
    return_decoding_info: bool = False
    stop_strings: list[str] = field(init=False, default_factory=list)

    def __post_init__(self):
        _check_reals(self, ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                            "frequency_penalty", "length_penalty"))
        self._check_counts()
        self._check_sampling()
        self._check_penalties()
        self._check_outputs()
        self._check_beam_search()
        self.contrastive = _nested(ContrastiveParams, self.contrastive, "contrastive")
        self.context_contrast = _nested(ContextContrastParams, self.context_contrast, "context_contrast")
        self.structured_outputs = _nested(StructuredOutputsParams, self.structured_outputs, "structured_outputs")
        if self.contrastive is not None and self.context_contrast is not None:
            raise ValueError("contrastive and context_contrast cannot be combined in one request")

    def _check_counts(self):
        _check(isinstance(self.n, int) and self.n >= 1, "n", "an integer >= 1", self.n)
        if self.best_of is not None:
            _check(isinstance(self.best_of, int) and self.best_of >= self.n, "best_of",
                   f"an integer >= n ({self.n})", self.best_of)
        if self.max_tokens is not None:
            _check(isinstance(self.max_tokens, int) and self.max_tokens >= 0, "max_tokens", "an integer >= 0",
                   self.max_tokens)
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "an integer >= 0",
               self.min_tokens)
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", f"<= max_tokens ({self.max_tokens})",
                   self.min_tokens)

    def _check_sampling(self):
        _check(self.temperature >= 0, "temperature", ">= 0", self.temperature)
        _check(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(isinstance(self.top_k, int) and (self.top_k >= 0 or self.top_k == -1), "top_k",
               "-1, 0 (off) or a positive integer", self.top_k)
        _check(0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        if self.seed is not None:
            _check(isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64, "seed",
                   "an integer in [-2**63, 2**64)", self.seed)

    def _check_penalties(self):
        _check(self.repetition_penalty > 0, "repetition_penalty", "> 0", self.repetition_penalty)
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]", self.presence_penalty)
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        if self.logit_bias:
            keys = list(self.logit_bias)
            _check(all(_is_token_id(k) for k in keys), "logit_bias", "keyed by token ids (integers >= 0)",
                   next((k for k in keys if not _is_token_id(k)), None))
            _check(all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.logit_bias.values()),
                   "logit_bias", "numbers as values", list(self.logit_bias.values())[:1])
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            bad = [v for v in self.logit_bias.values() if not -100 <= v <= 100]
            _check(not bad, "logit_bias", "values in [-100, 100]", bad[:1])

    def _check_outputs(self):
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check(isinstance(value, int) and 0 <= value <= MAX_LOGPROBS, name,
                       f"an integer in [0, {MAX_LOGPROBS}]", value)
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        _check(all(isinstance(s, str) and s for s in stops), "stop", "a non-empty string or a list of them", self.stop)
        self.stop_strings = stops
        ids = self.stop_token_ids or []
        _check(all(isinstance(t, int) and t >= 0 for t in ids), "stop_token_ids", "a list of token ids",
               self.stop_token_ids)

    def _check_beam_search(self):
        _check(self.early_stopping in (True, False, "never"), "early_stopping", 'true, false or "never"',
               self.early_stopping)

    @property
    def combine_method(self) -> str | None:
        """The registered combine method of decoding/combine, or None for a single stream."""
        if self.contrastive is not None:
            return "contrastive"
        return self.context_contrast.method if self.context_contrast is not None else None

    @property
    def combine_params(self):
        return self.contrastive if self.contrastive is not None else self.context_contrast

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def beam_width(self) -> int:
        return self.best_of or self.n

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _nested(cls, value, name: str):
    """A dict becomes `cls`; unknown or missing keys are errors that name `name.<key>`."""
    if value is None or isinstance(value, cls):
        return value
    _check(isinstance(value, dict), name, "an object", value)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    _check(not unknown, f"{name}.{unknown[0] if unknown else ''}", f"one of the fields {', '.join(sorted(known))}",
           value.get(unknown[0]) if unknown else None)
    required = [f.name for f in fields(cls) if f.default is MISSING and f.name not in value]
    _check(not required, f"{name}.{required[0] if required else ''}", "given (it is required)", None)
    return cls(**value)
