"""Benchmarks of the decoding methods that live inside the engine.

`bench beam`: beam search against transformers' beam search on the same model and prompts, in one
run, with the KV blocks beam search holds against a copy-everything baseline.
`bench contrastive`: tokens/s of contrastive decoding divided by greedy tokens/s on the same expert.
`bench context-contrast`: tokens/s of ACD (or CAD, AdaCAD) divided by plain RAG greedy tokens/s on
the same model, documents and questions.
`bench structured`: tokens/s of greedy decoding under a JSON schema divided by unconstrained
greedy tokens/s: the cost of the grammar mask.
"""

import dataclasses
import itertools
import time

import torch
from tqdm import tqdm

from counterpoint.decoding import SamplingParams
from counterpoint.serving.bench.workload import random_workload
from counterpoint.serving.flags import engine_kwargs


def _drive(engine, prompts, params, desc: str, no_contexts=None, in_flight: int | None = None) -> tuple:
    """Run requests to the end, at most `in_flight` at a time (default: all); returns (seconds, peak
    blocks held, peak blocks a copy-everything cache would hold: every live sequence owning all of
    its blocks). `no_contexts`: each prompt without its documents, for context contrast."""
    pending = iter(enumerate(prompts))

    def submit(count: int) -> None:
        for i, prompt in itertools.islice(pending, count):
            engine.add_request(f"{desc}-{i}", prompt, params, no_context=no_contexts[i] if no_contexts else None)

    submit(in_flight or len(prompts))
    bs, peak_used, peak_copy = engine.config.block_size, 0, 0
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc=desc, leave=False) as bar:
        while engine.has_unfinished_requests():
            finished = sum(out.finished for out in engine.step())
            bar.update(finished)
            submit(finished)
            used = sum(s.kv.pool.num_blocks - s.kv.pool.num_free_blocks for s in engine.all_slots.values())
            copy = sum(-(-seq.num_computed_tokens // bs) for r in engine.scheduler.running for seq in r.sequences())
            peak_used, peak_copy = max(peak_used, used), max(peak_copy, copy)
    return time.perf_counter() - start, peak_used, peak_copy


def against_greedy(engine, prompts, concurrency: int, output_len: int, greedy: SamplingParams,
                   other: SamplingParams, name: str) -> dict:
    """Tokens/s of greedy and of `other` on the same prompts and engine, one after the other, and
    their ratio; both warmed up first at the timed concurrency."""
    tokens = len(prompts) * output_len
    for warm in (greedy, other):  # the timed batch shapes allocate and compile here, out of both timings
        _drive(engine, prompts[:concurrency], dataclasses.replace(warm, max_tokens=2), "warm-up")
    greedy_s = _drive(engine, prompts, greedy, f"greedy c={concurrency}")[0]
    other_s = _drive(engine, prompts, other, f"{name} c={concurrency}")[0]
    row = {"concurrency": concurrency, "num_prompts": len(prompts), "greedy_tok_s": tokens / greedy_s,
           f"{name}_tok_s": tokens / other_s, "ratio": greedy_s / other_s}
    print(f"concurrency {concurrency}: greedy {row['greedy_tok_s']:.1f} tok/s | {name} "
          f"{row[f'{name}_tok_s']:.1f} tok/s | ratio {row['ratio']:.2f}", flush=True)
    return row


def _transformers_beams(model, prompts, width: int, output_len: int) -> float:
    model.generation_config.eos_token_id = None  # every beam runs to output_len, as with ignore_eos
    start = time.perf_counter()
    with torch.inference_mode():
        ids = torch.tensor(prompts, device=model.device)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                       num_beams=width, do_sample=False, early_stopping=False,
                       pad_token_id=model.generation_config.pad_token_id or 0)
    return time.perf_counter() - start


def beam(args) -> dict:
    from transformers import AutoModelForCausalLM

    from counterpoint.serving.llm import LLM
    from counterpoint.serving.engine.config import EngineConfig
    from counterpoint.serving.models.loader import DTYPES

    device = EngineConfig(args.model, device=args.device).torch_device
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES.get(args.dtype, "auto")).to(device).eval()
    results = []
    for width in args.widths:
        llm = LLM(args.model, max_num_seqs=args.concurrency * width, show_progress=False, **engine_kwargs(args))
        work = random_workload(args.concurrency, args.input_len, args.output_len, 0.0, llm.engine.main.vocab_size,
                               args.seed)
        params = SamplingParams(max_tokens=args.output_len, use_beam_search=True, n=1, best_of=width,
                                ignore_eos=True)
        ours, used, copy = _drive(llm.engine, work.prompts, params, f"counterpoint beams={width}")
        theirs = _transformers_beams(hf, work.prompts, width, args.output_len)
        tokens = args.concurrency * args.output_len
        row = dict(width=width, concurrency=args.concurrency, counterpoint_s=ours, transformers_s=theirs,
                   counterpoint_tok_s=tokens / ours, transformers_tok_s=tokens / theirs, ratio=theirs / ours,
                   peak_blocks=used, peak_blocks_copy_everything=copy, blocks_saved=1 - used / copy)
        print(f"beams {width}: counterpoint {row['counterpoint_tok_s']:.1f} tok/s | transformers "
              f"{row['transformers_tok_s']:.1f} tok/s | ratio {row['ratio']:.2f}x | peak blocks {used} vs "
              f"{copy} copy-everything ({100 * row['blocks_saved']:.0f}% saved)", flush=True)
        results.append(row)
        del llm
    return dict(benchmark="beam", model=args.model, dtype=args.dtype, input_len=args.input_len,
                output_len=args.output_len, threads=torch.get_num_threads(), results=results)


def contrastive(args) -> dict:
    from counterpoint.serving.llm import LLM
    from counterpoint.serving.llm import AMATEUR

    results = []
    for concurrency in args.concurrency:
        # NOTE: no prefix cache: the second run must not reuse the first one's prompts
        llm = LLM(args.model, amateur=args.amateur, max_num_seqs=concurrency, show_progress=False,
                  enable_prefix_caching=False, **engine_kwargs(args))
        engine = llm.engine
        work = random_workload(args.num_prompts or max(4, 2 * concurrency), args.input_len, args.output_len, 0.0,
                               engine.main.vocab_size, args.seed)
        greedy = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
        cd = dataclasses.replace(greedy, contrastive={"amateur": AMATEUR, "alpha": args.alpha, "beta": args.beta})
        row = against_greedy(engine, work.prompts, concurrency, args.output_len, greedy, cd, "contrastive")
        results.append(row)
        del llm, engine
    return dict(benchmark="contrastive", model=args.model, amateur=args.amateur, dtype=args.dtype,
                input_len=args.input_len, output_len=args.output_len, threads=torch.get_num_threads(),
                results=results)


def context_contrast(args) -> dict:
    """Every prompt is a documents block followed by a question (random tokens of the two
    lengths); plain RAG greedy reads only the whole prompt, the contrast also the question alone."""
    from counterpoint.serving.llm import LLM

    results = []
    for concurrency in args.concurrency:
        # NOTE: a contrasted request runs two sequences (with and without the documents)
        llm = LLM(args.model, max_num_seqs=2 * concurrency, show_progress=False, enable_prefix_caching=False,
                  **engine_kwargs(args))
        engine = llm.engine
        num = args.num_prompts or max(4, 2 * concurrency)
        vocab = engine.main.vocab_size
        docs = random_workload(num, args.document_len, 1, 0.0, vocab, args.seed).prompts
        questions = random_workload(num, args.question_len, 1, 0.0, vocab, args.seed + 1).prompts
        prompts = [d + q for d, q in zip(docs, questions)]
        rag = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
        contrast = dataclasses.replace(rag, context_contrast={"method": args.method, "alpha": args.alpha})
        # NOTE: the warm-up runs the timed batch shapes (prefill of `concurrency` prompts, then
        # decodes): on the GPU each new shape compiles kernels, which must not land in one timing.
        for warm, no_context in ((rag, None), (contrast, questions[:concurrency])):
            _drive(engine, prompts[:concurrency], dataclasses.replace(warm, max_tokens=2), "warm-up", no_context,
                   concurrency)
        tokens = num * args.output_len
        rag_s = _drive(engine, prompts, rag, f"rag c={concurrency}", in_flight=concurrency)[0]
        contrast_s = _drive(engine, prompts, contrast, f"{args.method} c={concurrency}", questions, concurrency)[0]
        row = dict(concurrency=concurrency, num_prompts=num, rag_tok_s=tokens / rag_s,
                   contrast_tok_s=tokens / contrast_s, ratio=rag_s / contrast_s)
        print(f"concurrency {concurrency}: plain RAG {row['rag_tok_s']:.1f} tok/s | {args.method} "
              f"{row['contrast_tok_s']:.1f} tok/s | ratio {row['ratio']:.2f}", flush=True)
        results.append(row)
        del llm, engine
    return dict(benchmark="context-contrast", method=args.method, model=args.model, dtype=args.dtype,
                document_len=args.document_len, question_len=args.question_len, output_len=args.output_len,
                threads=torch.get_num_threads(), results=results)


# A schema the answer cannot finish early by its structure: a list of strings as long as it likes.
OPEN_SCHEMA = {"type": "object", "required": ["items"], "additionalProperties": False,
               "properties": {"items": {"type": "array", "items": {"type": "string"}}}}


def structured(args) -> dict:
    from counterpoint.serving.llm import LLM

    results = []
    for concurrency in args.concurrency:
        llm = LLM(args.model, max_num_seqs=concurrency, show_progress=False, enable_prefix_caching=False,
                  **engine_kwargs(args))
        engine = llm.engine
        work = random_workload(args.num_prompts or max(4, 2 * concurrency), args.input_len, args.output_len, 0.0,
                               engine.main.vocab_size, args.seed)
        plain = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
        constrained = dataclasses.replace(plain, structured_outputs={"json": OPEN_SCHEMA})
        row = against_greedy(engine, work.prompts, concurrency, args.output_len, plain, constrained, "json_schema")
        results.append(row)
        del llm, engine
    return dict(benchmark="structured", model=args.model, dtype=args.dtype, schema=OPEN_SCHEMA,
                input_len=args.input_len, output_len=args.output_len, threads=torch.get_num_threads(),
                results=results)
