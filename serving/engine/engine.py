"""The engine: add requests, step the scheduler, run the models, decode, detokenize."""

import logging
import time

import torch

from counterpoint.decoding import SamplingParams
from counterpoint.decoding import step as decoding_step
from counterpoint.decoding.combine import acd, adacad, contrastive
from counterpoint.decoding.processing import Row
from counterpoint.serving.engine.admission import InvalidRequest, admit
from counterpoint.serving.engine import cpu_combine
from counterpoint.serving.engine.config import EngineConfig
from counterpoint.serving.engine.detokenizer import IncrementalDetokenizer
from counterpoint.serving.engine.model_slot import ModelSlot, load_slots, tail_slot
from counterpoint.serving.engine.hypotheses import apply_beams, apply_sampled, ends_in_stop_string, finished_beam, free
from counterpoint.serving.engine.output_builder import build_output, record_prompt_logprobs
from counterpoint.serving.engine.request import Request, Sequence
from counterpoint.serving.engine.model_runner import ModelRunner
from counterpoint.serving.engine.scheduler import ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput
from counterpoint.serving.engine.outputs import RequestOutput
from counterpoint.serving.engine.trunks import tail_name

logger = logging.getLogger("counterpoint")

# The combine stage's C loops on the CPU (each declines where it cannot run): contrastive decoding's
# combination, ACD's entropies, AdaCAD's divergences.
contrastive.FUSED["cpu"] = cpu_combine.contrastive
acd.FUSED["cpu"] = cpu_combine.entropy
adacad.FUSED["cpu"] = cpu_combine.jsd


class Engine:
    def __init__(self, config: EngineConfig):
        torch.manual_seed(config.seed)
        self.config = config
        self.device = config.torch_device
        self.slots, self.shared_layers = load_slots(config)
        self.tails: dict[str, ModelSlot] = {}  # internal models: an amateur's layers past its expert's trunk
        self.default_model = next(iter(self.slots))
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.num_batched_tokens),
            {name: slot.kv for name, slot in self.slots.items()},
        )
        self.requests: dict[str, Request] = {}
        self._same_vocab: dict[tuple[str, str], bool] = {}

    @property
    def main(self) -> ModelSlot:
        """The default model's slot."""
        return self.slots[self.default_model]

    @property
    def tokenizer(self):
        return self.main.tokenizer

    @property
    def all_slots(self) -> dict[str, ModelSlot]:
        """The served models and the internal tails, each with its own KV pool."""
        return {**self.slots, **self.tails}

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    model: str | None = None, prompt_token_ids: list[int] | None = None,
                    no_context: str | list[int] | None = None) -> Request:
        """Queue a request on `model` (a served name; default: the first model). A text prompt is
        tokenized here unless its `prompt_token_ids` are given (the server tokenizes off this thread).
        With context contrast, `prompt` holds the documents and `no_context` is the same prompt
        without them (text or token ids)."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if model is not None and model not in self.slots:
            raise InvalidRequest(f"model {model!r} is not served; served: {', '.join(self.slots)}", "model")
        slot = self.slots[model or self.default_model]
        streams = self._streams(slot, params, no_context is not None)
        text, ids = (None, list(prompt)) if not isinstance(prompt, str) else \
            (prompt, list(prompt_token_ids) if prompt_token_ids is not None else slot.tokenizer.encode(prompt))
        stream_prompts = {}
        if "no_context" in streams:
            stream_prompts["no_context"] = slot.tokenizer.encode(no_context) if isinstance(no_context, str) \
                else list(no_context)
        prompts = {stream: stream_prompts.get(stream, ids) for stream in streams}
        max_tokens = admit(prompts, {s: self.all_slots[m] for s, m in streams.items()}, params, self.config)
        request = Request(request_id, text, ids, params, slot.eos_ids, max_tokens, streams,
                          stream_prompts=stream_prompts)
        if params.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        request.hypotheses[0].detok = IncrementalDetokenizer.for_prompt(slot.tokenizer, ids, params.skip_special_tokens)
        if params.structured_outputs is not None:
            request.hypotheses[0].grammar = self._matcher(slot, params)
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.finish(request)
        self._finish_all(request, "abort")
        return build_output(request, self._tokenizer(request))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def abort_all(self) -> bool:
        """Abort every request; True if that leaves the engine clean: no request anywhere and
        every block of every pool free (what a failed step must leave to go on serving)."""
        for request_id in list(self.requests):
            self.abort_request(request_id)
        pools_full = all(s.kv.pool.num_free_blocks == s.kv.pool.num_blocks for s in self.all_slots.values())
        return pools_full and not self.has_unfinished_requests()

    @staticmethod
    def _matcher(slot: ModelSlot, params: SamplingParams):
        from counterpoint.decoding.grammar import new_matcher

        try:
            return new_matcher(slot.compile_grammar(params.structured_outputs))
        except ValueError as err:
            raise InvalidRequest(str(err), params.structured_outputs.source) from None

    def _streams(self, slot: ModelSlot, params: SamplingParams, has_no_context: bool) -> dict[str, str]:
        """Stream name -> model slot for a request on `slot`."""
        if params.context_contrast is not None:
            if not has_no_context:
                raise InvalidRequest("context_contrast needs documents: it contrasts the prompt with and "
                                     "without them", "context_contrast")
            return {"main": slot.name, "no_context": slot.name}
        if params.contrastive is None:
            return {"main": slot.name}
        amateur = params.contrastive.amateur
        if amateur not in self.slots:
            raise InvalidRequest(f"contrastive.amateur: model {amateur!r} is not served; served: "
                                 f"{', '.join(self.slots)}", "contrastive.amateur")
        if amateur == slot.name:
            raise InvalidRequest(f"contrastive.amateur: {amateur!r} is the request's own model; the amateur must "
                                 "be another model", "contrastive.amateur")
        if not self.shares_vocab(slot.name, amateur):
            raise InvalidRequest(f"contrastive.amateur: {amateur!r} has a different tokenizer from {slot.name!r}; "
                                 "contrasted models must share the vocabulary", "contrastive.amateur")
        if (slot.name, amateur) in self.shared_layers:
            return {"main": slot.name, "amateur": self._tail(slot.name, amateur)}
        return {"main": slot.name, "amateur": amateur}

    def _tail(self, expert: str, amateur: str) -> str:
        """The internal model that runs `amateur` past the layers it shares with `expert` (made on
        first use: it holds a KV pool)."""
        name = tail_name(expert, amateur)
        if name not in self.tails:
            k = self.shared_layers[expert, amateur]
            self.tails[name] = tail_slot(name, self.slots[amateur], k, self.config)
            self.scheduler.kv[name] = self.tails[name].kv
            self.scheduler.lockstep.add(name)
            logger.info(f"contrastive decoding of {expert} against {amateur} runs their {k} shared layers once")
        return name

    def shares_vocab(self, a: str, b: str) -> bool:
        """Can models a and b be contrasted: identical vocabularies (table padding may differ)."""
        key = tuple(sorted((a, b)))
        if key not in self._same_vocab:
            self._same_vocab[key] = self.slots[a].tokenizer.get_vocab() == self.slots[b].tokenizer.get_vocab()
        return self._same_vocab[key]

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
                record_prompt_logprobs(request, logits, self._tokenizer(request))
        self._decode(sched.ready, logits)
        outputs = []
        for request in sched.ready:
            if request.first_token_time is None:
                request.first_token_time = now
            if not request.hypotheses:
                self.scheduler.finish(request)
                self.requests.pop(request.request_id, None)
            outputs.append(build_output(request, self._tokenizer(request)))
        return outputs

    def _run_models(self, sched: SchedulerOutput) -> dict[int, torch.Tensor]:
        """Logits rows keyed by seq_id; advances each sequence's computed tokens. The served
        models run first: they capture the trunks the tails go on from. Models whose lm_head
        reads the same weight (an expert and its anti-expert) get their logits in one pass: a
        few rows cost what one does, the weight read once."""
        trunks, heads = {}, {}
        mains, capture = self._trunk_plan(sched)
        for name, slot in self.all_slots.items():
            items = [s for s in sched.scheduled if s.seq.model == name]
            if not items:
                continue
            given = [trunks[mains[s.seq.seq_id].seq_id] for s in items] if name in self.tails else None
            rows, captured = slot.runner.execute(items, sched.block_copies.get(name, []), given, capture.get(name))
            trunks.update(captured)
            for item in items:
                item.seq.num_computed_tokens += item.num_new_tokens
            heads.setdefault(slot.runner.lm_head_key(), []).append((slot.runner, items, rows))
        return {seq_id: row for group in heads.values() for seq_id, row in _logits(group).items()}

    def _trunk_plan(self, sched: SchedulerOutput) -> tuple[dict[int, Sequence], dict[str, dict[int, int]]]:
        """The main sequence of each scheduled tail sequence (by seq_id), and per served model the
        trunks its step must capture: {main seq_id: layers}."""
        mains, capture = {}, {}
        for item in sched.scheduled:
            if item.seq.model in self.tails:
                hyp = next(h for h in item.request.hypotheses if h.seqs.get("amateur") is item.seq)
                main = mains[item.seq.seq_id] = hyp.seqs["main"]
                capture.setdefault(main.model, {})[main.seq_id] = self.tails[item.seq.model].runner.first_layer
        return mains, capture

    def _decode(self, ready: list[Request], logits: dict[int, torch.Tensor]) -> None:
        for request in [r for r in ready if r.max_tokens == 0]:
            self._finish_all(request, "length")
        ready = [r for r in ready if r.hypotheses]
        if not ready:
            return
        groups = [self._group(r, logits) for r in ready]
        rows = decoding_step.cat_rows([logits[h.seqs["main"].seq_id][-1:] for r in ready for h in r.hypotheses])
        for request, group, choices in zip(ready, groups, decoding_step.step(rows, groups)):
            try:
                if isinstance(choices, Exception):
                    raise choices
                self._apply(request, group, choices)
            except Exception as err:  # noqa: BLE001  (fails this request alone; the batch goes on)
                logger.exception(f"decoding request {request.request_id} failed; it ends with an error")
                self._finish_all(request, "error")
                request.error = f"decoding this request failed ({type(err).__name__}: {err})"

    def _apply(self, request: Request, group: decoding_step.DecodeGroup, choices) -> None:
        kv = self.scheduler.kv
        if request.beam is not None:
            apply_beams(request, choices, kv, self._tokenizer(request), group.beam_done)
        else:
            apply_sampled(request, choices, kv, self._tokenizer(request), self._max_model_len(request))

    def _group(self, request: Request, logits: dict[int, torch.Tensor]) -> decoding_step.DecodeGroup:
        hyps, tokenizer = request.hypotheses, self._tokenizer(request)
        rows = [Row(request.params, request.prompt_token_ids, h.output_ids, request.eos_ids, grammar=h.grammar)
                for h in hyps]
        is_first = not hyps[0].output_ids and len(hyps) == 1 and request.beam is None
        second = next((name for name in ("amateur", "no_context") if name in request.streams), None)
        other = decoding_step.cat_rows([logits[h.seqs[second].seq_id][-1:] for h in hyps]) if second else None
        ends_text = (lambda parent, token: ends_in_stop_string(request, parent, token)) \
            if request.beam is not None and request.params.stop_strings else None
        return decoding_step.DecodeGroup(
            request.params, rows, request.num_children if is_first else 1, request.generator, other,
            request.beam, lambda choice: finished_beam(request, choice, tokenizer, self._max_model_len(request)),
            ends_text)

    def _tokenizer(self, request: Request):
        return self.slots[request.model].tokenizer

    def _max_model_len(self, request: Request) -> int:
        return min(self.all_slots[m].max_model_len for m in request.streams.values())

    def _finish_all(self, request: Request, reason: str) -> None:
        for hyp in request.hypotheses:
            hyp.finish_reason = reason
            free(hyp, self.scheduler.kv)
        request.finished += request.hypotheses
        request.hypotheses = []


def _logits(group: list[tuple[ModelRunner, list[ScheduledSeq], list[torch.Tensor]]]) -> dict[int, torch.Tensor]:
    """{seq_id: logits rows} of runners sharing one lm_head, from their hidden rows in one pass."""
    hidden = [row for _, _, rows in group for row in rows]
    logits = group[0][0].logits(torch.cat(hidden))
    out, start = {}, 0
    for _, items, rows in group:
        for item, row in zip(items, rows):
            out[item.seq.seq_id] = logits[start : start + row.shape[0]]
            start += row.shape[0]
    return out
