"""`bench serve`: load any OpenAI-compatible server and report TTFT, ITL, latency, throughput."""

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from counterpoint.serving.bench.prompts import PROMPTS


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


def load_prompts(path: str | None, num: int, seed: int, input_len: int | None = None,
                 max_token_id: int = 9999) -> list[str] | list[list[int]]:
    """`num` prompts: from a JSONL file, the bundled set, or (`input_len`) lists of random token
    ids up to `max_token_id` (from a tenth of it, past special and byte tokens), which every
    OpenAI-compatible server takes as they are, so each prompt is exactly that long."""
    if input_len:
        rng = random.Random(seed)
        return [[rng.randint(max_token_id // 10, max_token_id) for _ in range(input_len)] for _ in range(num)]
    if path:
        with open(path) as f:
            prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    else:
        prompts = list(PROMPTS)
    rng = random.Random(seed)
    return [prompts[rng.randrange(len(prompts))] for _ in range(num)]


def request_body(args, prompt: str | list[int]) -> dict:
    """Greedy, EOS ignored, streamed; with `beam_width`, beam search of that width in one response
    (vLLM does not stream beams), all beams returned."""
    body = {"model": args.model, "prompt": prompt, "max_tokens": args.output_len, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    if getattr(args, "beam_width", None):
        del body["stream_options"]
        body.update(stream=False, use_beam_search=True, n=args.beam_width)
    return body


async def one_request(client: httpx.AsyncClient, args, prompt: str | list[int]) -> RequestResult:
    body = request_body(args, prompt)
    if not body["stream"]:
        return await _one_response(client, body)
    start = last = time.perf_counter()
    result = RequestResult(ok=False)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                return RequestResult(ok=False, error=f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
        result.ok, result.latency = True, time.perf_counter() - start
    except httpx.HTTPError as err:
        result.error = repr(err)
    return result


async def _one_response(client: httpx.AsyncClient, body: dict) -> RequestResult:
    """A request answered in one piece: its first token arrives with its last."""
    start = time.perf_counter()
    try:
        resp = await client.post("/v1/completions", json=body)
    except httpx.HTTPError as err:
        return RequestResult(ok=False, error=repr(err))
    if resp.status_code != 200:
        return RequestResult(ok=False, error=f"HTTP {resp.status_code}: {resp.content[:200]!r}")
    latency = time.perf_counter() - start
    tokens = resp.json()["usage"]["completion_tokens"]
    return RequestResult(ok=True, ttft=latency, latency=latency, output_tokens=tokens)


async def run_load(args) -> tuple[list[RequestResult], float]:
    prompts = load_prompts(args.dataset, args.num_prompts, args.seed, args.input_len, args.max_token_id)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # NOTE: a connection per request, as vLLM's benchmark opens: a kept-alive one that the server closes
    # while idle fails the next request sent on it (llama.cpp's server did, once)
    limits = httpx.Limits(max_connections=max(args.max_concurrency or 0, 256), max_keepalive_connections=0)
    semaphore = asyncio.Semaphore(args.max_concurrency or len(prompts))
    rng = random.Random(args.seed)
    bar = tqdm(total=len(prompts), desc="requests")

    async def limited(client, prompt):
        async with semaphore:
            result = await one_request(client, args, prompt)
        bar.update(1)
        return result

    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=600, limits=limits) as client:
        start, tasks = time.perf_counter(), []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(client, prompt)))
            if args.request_rate:
                await asyncio.sleep(rng.expovariate(args.request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    bar.close()
    return results, elapsed


def summarize(results: list[RequestResult], elapsed: float) -> dict:
    ok = [r for r in results if r.ok]
    stats = lambda xs: {"mean": statistics.mean(xs), "p50": percentile(xs, 50), "p90": percentile(xs, 90),  # noqa: E731
                        "p99": percentile(xs, 99)} if xs else {}
    tokens = sum(r.output_tokens for r in ok)
    return {
        "num_requests": len(results), "num_failed": len(results) - len(ok), "duration_s": elapsed,
        "request_throughput": len(ok) / elapsed, "output_token_throughput": tokens / elapsed,
        "ttft_s": stats([r.ttft for r in ok]), "itl_s": stats([x for r in ok for x in r.itls]),
        "e2e_latency_s": stats([r.latency for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def print_table(summary: dict) -> None:
    print(f"requests {summary['num_requests']} (failed {summary['num_failed']}) in {summary['duration_s']:.1f} s")
    print(f"throughput: {summary['request_throughput']:.2f} req/s, "
          f"{summary['output_token_throughput']:.1f} output tok/s")
    print(f"{'metric':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}  (ms)")
    for key in ("ttft_s", "itl_s", "e2e_latency_s"):
        row = summary[key]
        if row:
            print(f"{key[:-2]:<14}" + "".join(f"{1000 * row[k]:>10.1f}" for k in ("mean", "p50", "p90", "p99")))


def plot(results: list[RequestResult], summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, (title, values) in zip(axes, [("TTFT (ms)", [1000 * r.ttft for r in ok]),
                                          ("ITL (ms)", [1000 * x for r in ok for x in r.itls]),
                                          ("end-to-end (s)", [r.latency for r in ok])]):
        ax.hist(values, bins=30)
        ax.set_title(title)
    axes[3].bar(["output tok/s"], [summary["output_token_throughput"]])
    axes[3].set_title("throughput")
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def serve_benchmark(args) -> dict:
    results, elapsed = asyncio.run(run_load(args))
    summary = summarize(results, elapsed)
    summary.update(base_url=args.base_url, model=args.model, max_concurrency=args.max_concurrency,
                   request_rate=args.request_rate, input_len=args.input_len, output_len=args.output_len)
    print_table(summary)
    if args.plot:
        plot(results, summary, args.plot)
    return summary

