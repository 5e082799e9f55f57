"""Structured outputs through xgrammar (Dong et al. 2024, "XGrammar"), the grammar engine vLLM and
SGLang use: a request's JSON schema, regular expression, choice list or EBNF grammar is compiled
once per tokenizer, each hypothesis keeps its own matcher (forked with the hypothesis, advanced
with every token it appends), and each step masks the tokens the matcher forbids.

JSON is generated compact (no free whitespace between tokens): with free whitespace allowed, a
small model can fill its whole budget with spaces and never close the object.
"""

import json

import torch
import xgrammar as xgr

from counterpoint.decoding.params import StructuredOutputsParams


class GrammarCompiler:
    """Compiles StructuredOutputsParams for one tokenizer and vocabulary width (the model's
    embedding rows, which may exceed the tokenizer's). xgrammar caches compiled grammars, so
    requests with the same schema compile once."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]):
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_token_ids) or None)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.vocab_size = vocab_size

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """Raises ValueError naming the request field when the schema, regex or grammar is invalid."""
        try:
            return self._compile(params)
        except (RuntimeError, ValueError, TypeError) as err:
            raise ValueError(f"{params.source}: invalid {params.kind.replace('_', ' ')}: {err}") from None

    def _compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        kind = params.kind
        if kind == "json":
            schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
            return self.compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=params.strict)
        if kind == "json_object":
            return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return self.compiler.compile_regex(params.regex)
        if kind == "choice":
            literals = " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
            return self.compiler.compile_grammar(f"root ::= {literals}")
        return self.compiler.compile_grammar(params.grammar)


def new_matcher(compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
    return xgr.GrammarMatcher(compiled)


def allowed_tokens(matchers: list[xgr.GrammarMatcher], eos_ids: list[tuple[int, ...]], vocab_size: int,
                   device: torch.device) -> torch.Tensor:
    """(len(matchers), vocab_size) bool: the tokens each matcher allows next. A matcher that has
    accepted its stop token allows EOS alone: beam search can keep such a beam running (scored
    down), as transformers does when too few candidates are left."""
    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)
    for i, matcher in enumerate(matchers):
        if not matcher.is_terminated():
            matcher.fill_next_token_bitmask(bitmask, i)
    bits = (bitmask.to(device)[:, :, None] >> torch.arange(32, device=device, dtype=torch.int32)) & 1
    allowed = bits.view(len(matchers), -1)[:, :vocab_size].bool()
    for i, matcher in enumerate(matchers):
        if matcher.is_terminated():
            allowed[i] = False
            allowed[i, list(eos_ids[i])] = True
    return allowed


def advance(matcher: xgr.GrammarMatcher, token: int) -> None:
    """The matcher after `token` (a terminated matcher stays as it is)."""
    if not matcher.is_terminated():
        matcher.accept_token(token)
