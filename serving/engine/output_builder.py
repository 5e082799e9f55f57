"""Record each step's choices on hypotheses (tokens, logprobs, text, stop checks) and build
the RequestOutput a client sees."""

import time

import torch

from counterpoint.decoding.selection import TokenChoice, describe
from counterpoint.serving.engine.detokenizer import find_stop
from counterpoint.serving.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from counterpoint.serving.engine.request import Hypothesis, Request


def record_choice(request: Request, hyp: Hypothesis, choice: TokenChoice, tokenizer, max_model_len: int) -> None:
    new_text = record_token(request, hyp, choice, tokenizer)
    _check_stop(request, hyp, choice.token_id, new_text, max_model_len)
    if hyp.is_finished and not isinstance(hyp.stop_reason, str):
        hyp.text += hyp.detok.flush()


def record_token(request: Request, hyp: Hypothesis, choice: TokenChoice, tokenizer) -> str:
    """Append the token with what the client asked to see of it; returns the new text."""
    token, params = choice.token_id, request.params
    hyp.output_ids.append(token)
    if hyp.grammar is not None:
        from counterpoint.decoding.grammar import advance

        advance(hyp.grammar, token)
    for seq in hyp.seqs.values():
        seq.token_ids.append(token)
    if choice.logprob is not None:
        hyp.cumulative_logprob += choice.logprob
    if params.logprobs is not None:
        hyp.logprobs.append(_logprob_entry(token, choice.logprob, choice.rank, choice.top_logprobs, tokenizer))
    if params.return_decoding_info:
        info = {"main_logprob": choice.raw_logprob}
        if choice.context_weight is not None:
            info["context_weight"] = choice.context_weight
        hyp.decoding_info.append(info)
    new_text = hyp.detok.add(token)
    hyp.text += new_text
    return new_text


def _check_stop(request: Request, hyp: Hypothesis, token: int, new_text: str, max_model_len: int) -> None:
    params = request.params
    if token in (params.stop_token_ids or ()) and len(hyp.output_ids) >= params.min_tokens:
        hyp.finish_reason, hyp.stop_reason = "stop", token
    elif token in request.eos_ids and not params.ignore_eos and len(hyp.output_ids) >= params.min_tokens:
        hyp.finish_reason = "stop"
    elif _stop_at_string(hyp, params, new_text):
        return
    elif len(hyp.output_ids) >= request.max_tokens or request.num_prompt_tokens + len(hyp.output_ids) >= max_model_len:
        hyp.finish_reason = "length"


def _stop_at_string(hyp: Hypothesis, params, new_text: str) -> bool:
    """If the new text completes a stop string, cut the text there and finish the hypothesis."""
    found = find_stop(hyp.text, len(new_text), params.stop_strings) if params.stop_strings and new_text else None
    if found is None:
        return False
    idx, stop = found
    hyp.text = hyp.text[: idx + len(stop)] if params.include_stop_str_in_output else hyp.text[:idx]
    hyp.finish_reason, hyp.stop_reason = "stop", stop
    return True


def _logprob_entry(token, logprob, rank, top, tokenizer) -> dict[int, Logprob]:
    entry = {token: Logprob(logprob, rank, tokenizer.decode([token]))}
    for i, (alt, lp) in enumerate(top):
        if alt not in entry:
            entry[alt] = Logprob(lp, i + 1, tokenizer.decode([alt]))
    return entry


def record_prompt_logprobs(request: Request, logits: dict[int, torch.Tensor], tokenizer) -> None:
    """Append the raw log_softmax of each newly computed prompt position (decoding/README.md, "Logprobs")."""
    seq = request.hypotheses[0].seqs["main"] if request.hypotheses else None
    if seq is None or seq.seq_id not in logits:
        return
    if not request.prompt_logprobs:
        request.prompt_logprobs.append(None)
    rows = logits[seq.seq_id]
    num_needed = request.num_prompt_tokens - len(request.prompt_logprobs)
    rows = rows[: max(0, num_needed)]
    if not len(rows):
        return
    logq = torch.log_softmax(rows.float(), dim=-1)
    done = len(request.prompt_logprobs)
    targets = request.prompt_token_ids[done : done + len(rows)]
    info = describe(logq, torch.tensor(targets, device=logq.device), [request.params.prompt_logprobs] * len(targets))
    for token, (logprob, rank, top) in zip(targets, info):
        request.prompt_logprobs.append(_logprob_entry(token, logprob, rank, top, tokenizer))


def build_output(request: Request, tokenizer) -> RequestOutput:
    done = not request.hypotheses
    hyps = request.finished + request.hypotheses
    if request.beam is not None:  # beams reorder every step: show only the n best, at the end
        hyps = [h for h in request.finished[: request.params.n]] if done else []
    elif done and request.params.best_of and request.params.best_of > request.params.n:
        hyps = sorted(hyps, key=lambda h: h.cumulative_logprob, reverse=True)[: request.params.n]
    else:
        hyps = sorted(hyps, key=lambda h: h.index)
    want_cumulative = request.params.logprobs is not None or bool(request.params.best_of) or request.beam is not None
    outputs = [
        CompletionOutput(
            index=i, text=h.text, token_ids=h.output_ids,
            cumulative_logprob=h.cumulative_logprob if want_cumulative else None,
            logprobs=h.logprobs if request.params.logprobs is not None else None,
            finish_reason=h.finish_reason, stop_reason=h.stop_reason,
            decoding_info=h.decoding_info if request.params.return_decoding_info else None,
        )
        for i, h in enumerate(hyps)
    ]
    metrics = RequestMetrics(request.arrival_time, request.first_scheduled_time, request.first_token_time,
                             time.monotonic() if done else None, request.num_preemptions)
    return RequestOutput(
        request.request_id, request.prompt, request.prompt_token_ids,
        request.prompt_logprobs if request.params.prompt_logprobs is not None else None,
        outputs, done, metrics, request.error,
    )
