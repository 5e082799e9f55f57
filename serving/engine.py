"""The engine: add requests, step the scheduler, run the models, decode, detokenize."""

import time

import torch

from counterpoint.decoding import SamplingParams
from counterpoint.decoding import step as decoding_step
from counterpoint.decoding.processing import Row
from counterpoint.serving.config import EngineConfig
from counterpoint.serving.detokenizer import IncrementalDetokenizer
from counterpoint.serving.model_slot import ModelSlot, load_slot
from counterpoint.serving.output_builder import build_output, record_choice, record_prompt_logprobs
from counterpoint.serving.request import Request
from counterpoint.serving.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from counterpoint.serving.outputs import RequestOutput


class ContextLengthExceeded(ValueError):
    """The prompt (plus max_tokens) does not fit the model's context."""


class Engine:
    def __init__(self, config: EngineConfig):
        torch.manual_seed(config.seed)
        self.config = config
        self.device = config.torch_device
        self.main: ModelSlot = load_slot("main", config.model, config)
        self.slots = {"main": self.main}
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.num_batched_tokens),
            {name: slot.kv for name, slot in self.slots.items()},
        )
        self.requests: dict[str, Request] = {}

    @property
    def tokenizer(self):
        return self.main.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.main.max_model_len

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = (prompt, self.tokenizer.encode(prompt)) if isinstance(prompt, str) else (None, list(prompt))
        max_tokens = self._validate(ids, params)
        request = Request(request_id, text, ids, params, self.main.eos_ids, max_tokens)
        if params.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        request.hypotheses[0].detok = IncrementalDetokenizer.for_prompt(self.tokenizer, ids, params.skip_special_tokens)
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.finish(request)
        self._finish_all(request, "abort")
        return build_output(request, self.tokenizer)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def _validate(self, ids: list[int], params: SamplingParams) -> int:
        """Checks the request fits; returns its effective max_tokens."""
        unsupported = [name for name, on in (("use_beam_search", params.use_beam_search),
                                             ("contrastive", params.contrastive is not None),
                                             ("context_contrast", params.context_contrast is not None)) if on]
        if unsupported:
            raise NotImplementedError(f"{unsupported[0]} is not supported yet")
        if not ids:
            raise ValueError("prompt must not be empty")
        vocab = self.main.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {min(ids)}..{max(ids)}")
        room = self.max_model_len - len(ids)
        if room <= 0 or (params.max_tokens is not None and params.max_tokens > room):
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.max_model_len} tokens; the request has "
                f"{len(ids)} prompt tokens and asks for {params.max_tokens} more"
            )
        max_tokens = room if params.max_tokens is None else params.max_tokens
        self._check_fits_pool(len(ids), max_tokens, params)
        return max_tokens

    def _check_fits_pool(self, num_prompt: int, max_tokens: int, params: SamplingParams) -> None:
        # NOTE: a request that cannot fit the whole pool alone would wait forever; refuse it now.
        bs, pool = self.config.block_size, self.main.kv.pool
        num_children = params.beam_width  # best_of or n: the hypotheses that run at once
        need = -(-(num_prompt + max_tokens) // bs)
        if num_children > 1:  # children share the prompt's full blocks, each owns the rest
            need = num_prompt // bs + num_children * (-(-(num_prompt % bs + max_tokens) // bs))
        if need > pool.num_blocks:
            raise ValueError(
                f"the request needs up to {need} KV blocks ({num_children} sequence(s) of up to "
                f"{num_prompt + max_tokens} tokens) but the cache holds {pool.num_blocks}; lower max_tokens or n"
            )

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run each model once, decode the ready requests; returns their outputs."""
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        logits = self._run_models(sched)
        now = time.monotonic()
        for request in {id(s.request): s.request for s in sched.scheduled}.values():
            if request.params.prompt_logprobs is not None:
                record_prompt_logprobs(request, logits, self.tokenizer)
        self._decode(sched.ready, logits)
        outputs = []
        for request in sched.ready:
            if request.first_token_time is None:
                request.first_token_time = now
            if not request.hypotheses:
                self.scheduler.finish(request)
                self.requests.pop(request.request_id, None)
            outputs.append(build_output(request, self.tokenizer))
        return outputs

    def _run_models(self, sched: SchedulerOutput) -> dict[int, torch.Tensor]:
        """Logits rows keyed by seq_id; advances each sequence's computed tokens."""
        logits = {}
        for name, slot in self.slots.items():
            items = [s for s in sched.scheduled if s.seq.model == name]
            if not items:
                continue
            rows = slot.runner.execute(items, sched.block_copies.get(name, []))
            for item, row in zip(items, rows):
                item.seq.num_computed_tokens += item.num_new_tokens
                logits[item.seq.seq_id] = row
        return logits

    def _decode(self, ready: list[Request], logits: dict[int, torch.Tensor]) -> None:
        for request in [r for r in ready if r.max_tokens == 0]:
            self._finish_all(request, "length")
        ready = [r for r in ready if r.hypotheses]
        if not ready:
            return
        groups = [self._group(r) for r in ready]
        rows = torch.cat([logits[h.seqs["main"].seq_id][-1:] for r in ready for h in r.hypotheses])
        for request, choices in zip(ready, decoding_step.step(rows, groups)):
            self._apply(request, choices)

    def _group(self, request: Request) -> decoding_step.DecodeGroup:
        rows = [Row(request.params, request.prompt_token_ids, h.output_ids, request.eos_ids) for h in request.hypotheses]
        is_first = not request.hypotheses[0].output_ids and len(request.hypotheses) == 1
        fanout = request.num_children if is_first else 1
        return decoding_step.DecodeGroup(request.params, rows, fanout, request.generator)

    def _apply(self, request: Request, choices) -> None:
        """Extend, fork or drop hypotheses as the decoding chose, then check stop conditions."""
        parents, taken, survivors = request.hypotheses, set(), []
        for choice in choices:
            # NOTE: forks copy the parent before any choice of this step is recorded on it.
            hyp = parents[choice.parent]
            if choice.parent in taken:
                hyp = hyp.fork(len(survivors))
                for seq in hyp.seqs.values():
                    self.slots[seq.model].kv.fork(seq)
            taken.add(choice.parent)
            survivors.append((hyp, choice))
        for i, parent in enumerate(parents):
            if i not in taken:
                self.scheduler.free_hypothesis_seqs(list(parent.seqs.values()))
        request.hypotheses = []
        for hyp, choice in survivors:
            record_choice(request, hyp, choice, self.tokenizer, self.max_model_len)
            if hyp.is_finished:
                self.scheduler.free_hypothesis_seqs(list(hyp.seqs.values()))
                request.finished.append(hyp)
            else:
                request.hypotheses.append(hyp)

    def _finish_all(self, request: Request, reason: str) -> None:
        for hyp in request.hypotheses:
            hyp.finish_reason = reason
            self.scheduler.free_hypothesis_seqs(list(hyp.seqs.values()))
        request.finished += request.hypotheses
        request.hypotheses = []
