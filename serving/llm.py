"""The offline Python API: `LLM(path).generate(prompts, SamplingParams(...))`."""

import itertools
from dataclasses import fields

from tqdm import tqdm

from counterpoint.decoding import SamplingParams
from counterpoint.serving.engine.config import EngineConfig
from counterpoint.serving.engine.documents import chat_with_documents, prompt_with_documents
from counterpoint.serving.engine.engine import Engine
from counterpoint.serving.engine.outputs import RequestOutput

_ENGINE_FIELDS = {f.name for f in fields(EngineConfig)}


AMATEUR = "amateur"


class LLM:
    def __init__(self, model: str, amateur: str | None = None, **engine_args):
        """`amateur` loads a second model, served as "amateur", for contrastive decoding:
        SamplingParams(contrastive={"amateur": "amateur", ...})."""
        unknown = set(engine_args) - _ENGINE_FIELDS
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(sorted(unknown))}")
        if amateur is not None:
            engine_args["extra_models"] = tuple(engine_args.get("extra_models", ())) + ((AMATEUR, str(amateur)),)
        self.engine = Engine(EngineConfig(model=str(model), **engine_args))
        if amateur is not None and not self.engine.shares_vocab(self.engine.default_model, AMATEUR):
            raise ValueError(f"amateur {amateur} has a different tokenizer from {model}; contrasted models must "
                             "share the vocabulary")
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 documents=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        `prompts` is a string, a list of token ids, or a list of either. `documents` (retrieved
        passages) is one list of strings for every prompt, or a list of such lists, one per prompt;
        they are rendered before each prompt as a numbered context block, and context contrast
        (`SamplingParams(context_contrast=...)`) contrasts the prompt with and without them.
        """
        prompts = [prompts] if isinstance(prompts, str) or _is_token_list(prompts) else list(prompts)
        params = _params_for(params, len(prompts))
        tokenizer = self.get_tokenizer()
        rendered = [(prompt, None) if not docs else
                    (prompt_with_documents(prompt, docs, tokenizer), prompt if p.context_contrast is not None else None)
                    for prompt, p, docs in zip(prompts, params, _per_prompt(documents, len(prompts)))]
        return self._submit_and_run(rendered, params, use_tqdm)

    def chat(self, messages, params: SamplingParams | list[SamplingParams] | None = None, documents=None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Like generate, for conversations rendered through the model's chat template: `messages`
        is one conversation (a list of {"role", "content"} dicts) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params = _params_for(params, len(conversations))
        tokenizer = self.get_tokenizer()
        render = lambda conv, **kw: tokenizer.apply_chat_template(  # noqa: E731
            conv, tokenize=False, add_generation_prompt=True, **kw)
        rendered = []
        for conv, p, docs in zip(conversations, params, _per_prompt(documents, len(conversations))):
            if not docs:
                rendered.append((render(conv), None))
                continue
            with_docs, extra = chat_with_documents(conv, docs, tokenizer)
            rendered.append((render(with_docs, **extra), render(conv) if p.context_contrast is not None else None))
        return self._submit_and_run(rendered, params, use_tqdm)

    def _submit_and_run(self, rendered: list[tuple], params: list[SamplingParams], use_tqdm: bool):
        """`rendered`: per request, (the prompt, the prompt without its documents or None)."""
        order = [str(next(self._ids)) for _ in rendered]
        for request_id, (prompt, no_context), p in zip(order, rendered, params):
            self.engine.add_request(request_id, prompt, p, no_context=no_context)
        return self._run(order, use_tqdm)

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(order), desc="generating", disable=not use_tqdm, leave=False) as bar:
            while len(done) < len(order):
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError("the engine stopped with requests unanswered")
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[request_id] for request_id in order]


def _is_token_list(prompts) -> bool:
    return isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int)


def _params_for(params, num_prompts: int) -> list[SamplingParams]:
    params = params or SamplingParams()
    params = params if isinstance(params, list) else [params] * num_prompts
    if len(params) != num_prompts:
        raise ValueError(f"got {len(params)} SamplingParams for {num_prompts} prompts")
    return params


def _per_prompt(documents, num_prompts: int) -> list:
    """One documents list (or None) per prompt."""
    if documents is None:
        return [None] * num_prompts
    if all(isinstance(d, str) for d in documents):
        return [list(documents)] * num_prompts
    if len(documents) != num_prompts or not all(isinstance(d, list) for d in documents):
        raise ValueError(f"documents must be a list of strings or one list per prompt ({num_prompts})")
    return [list(d) for d in documents]
