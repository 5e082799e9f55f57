"""The offline Python API: `LLM(path).generate(prompts, SamplingParams(...))`."""

import itertools
from dataclasses import fields

from tqdm import tqdm

from counterpoint.decoding import SamplingParams
from counterpoint.serving.engine.config import EngineConfig
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

        `prompts` is a string, a list of token ids, or a list of either.
        """
        if documents is not None:
            raise NotImplementedError("documents are not supported yet (context contrast lands with its issue)")
        prompts = [prompts] if isinstance(prompts, str) or _is_token_list(prompts) else list(prompts)
        params = params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        order = [str(next(self._ids)) for _ in prompts]
        for request_id, prompt, p in zip(order, prompts, params):
            self.engine.add_request(request_id, prompt, p)
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
