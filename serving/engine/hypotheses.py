"""Apply a step's token choices to a request's hypotheses: extend, fork, prune, finish.

A hypothesis chosen more than once forks: the child shares every KV block of the parent (the
last, partial block is copied on write when it next grows). A hypothesis not chosen is pruned
and its blocks are freed at once.
"""

from counterpoint.decoding.selection import TokenChoice
from counterpoint.serving.engine.detokenizer import find_stop
from counterpoint.serving.engine.kv_manager import KVManager
from counterpoint.serving.engine.output_builder import record_choice, record_token
from counterpoint.serving.engine.request import Hypothesis, Request


def free(hyp: Hypothesis, kv: dict[str, KVManager]) -> None:
    for seq in hyp.seqs.values():
        kv[seq.model].free(seq)


def extend(request: Request, choices: list[TokenChoice],
           kv: dict[str, KVManager]) -> list[tuple[Hypothesis, TokenChoice]]:
    """Pair each choice with its hypothesis (forking repeated parents); prune the rest."""
    parents, taken, pairs = request.hypotheses, set(), []
    for choice in choices:
        # NOTE: forks copy the parent before any choice of this step is recorded on it.
        hyp = parents[choice.parent]
        if choice.parent in taken:
            hyp = hyp.fork(len(pairs))
            for seq in hyp.seqs.values():
                kv[seq.model].fork(seq)
        taken.add(choice.parent)
        pairs.append((hyp, choice))
    for i, parent in enumerate(parents):
        if i not in taken:
            free(parent, kv)
    return pairs


def apply_sampled(request: Request, choices: list[TokenChoice], kv, tokenizer, max_model_len: int) -> None:
    """Greedy and sampling: record each token, then move finished hypotheses out."""
    pairs = extend(request, choices, kv)
    request.hypotheses = []
    for hyp, choice in pairs:
        record_choice(request, hyp, choice, tokenizer, max_model_len)
        if hyp.is_finished:
            free(hyp, kv)
            request.finished.append(hyp)
        else:
            request.hypotheses.append(hyp)


def apply_beams(request: Request, choices: list[TokenChoice], kv, tokenizer, done: bool) -> None:
    """Beam search: the choices are the next running beams; the finished slots were filled by
    `finished_beam` during the step. When the search is done every running beam is freed."""
    pairs = extend(request, choices, kv)
    request.hypotheses = [hyp for hyp, _ in pairs]
    for hyp, choice in pairs:
        record_token(request, hyp, choice, tokenizer)
    if done:
        for hyp in request.hypotheses:
            free(hyp, kv)
        request.hypotheses = []
        request.finished = request.beam.results()
        for i, hyp in enumerate(request.finished):
            hyp.index = i


def finished_beam(request: Request, choice: TokenChoice, tokenizer, max_model_len: int) -> Hypothesis:
    """A copy of the parent beam, ended with the chosen token; it holds no KV blocks."""
    hyp = request.hypotheses[choice.parent].fork(-1, with_seqs=False)
    record_choice(request, hyp, choice, tokenizer, max_model_len)
    # NOTE: the beam search only finishes candidates that hit a stop condition; this is a guard.
    hyp.finish_reason = hyp.finish_reason or "length"
    return hyp


def ends_in_stop_string(request: Request, parent: int, token: int) -> bool:
    """Would appending `token` to running beam `parent` complete one of the request's stop strings?"""
    hyp = request.hypotheses[parent]
    new_text = hyp.detok.fork().add(token)
    return bool(new_text) and find_stop(hyp.text + new_text, len(new_text), request.params.stop_strings) is not None
