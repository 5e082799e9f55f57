"""Prometheus metrics with vLLM's names under the `counterpoint:` prefix (serving/api/README.md).

Updated from the engine thread: once per step for gauges and cache counters, once per output
for token counts and latencies. Every series carries `model_name`.
"""

import time
from collections import Counter as PyCounter
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def decoding_method(params) -> str:
    if params.contrastive is not None:
        return "contrastive"
    if params.context_contrast is not None:
        return params.context_contrast.method
    if params.use_beam_search:
        return "beam_search"
    return "greedy" if params.is_greedy else "sampling"


class Metrics:
    """Request series are labelled with the request's model; the per-step gauges and the block
    pool counters are reported for every served model, each with its own pool."""

    def __init__(self):
        self.registry = CollectorRegistry()
        m, r = ["model_name"], self.registry
        self.running = Gauge("counterpoint:num_requests_running", "Requests running", m, registry=r)
        self.waiting = Gauge("counterpoint:num_requests_waiting", "Requests waiting", m, registry=r)
        self.kv_usage = Gauge("counterpoint:kv_cache_usage_perc", "KV cache usage (0-1)", m, registry=r)
        self.prompt_tokens = Counter("counterpoint:prompt_tokens", "Prompt tokens", m, registry=r)
        self.generation_tokens = Counter("counterpoint:generation_tokens", "Generated tokens", m, registry=r)
        self.success = Counter("counterpoint:request_success", "Finished requests", m + ["finished_reason"], registry=r)
        self.preemptions = Counter("counterpoint:num_preemptions", "Preemptions", m, registry=r)
        self.cache_queries = Counter("counterpoint:prefix_cache_queries", "Prefix cache block queries", m, registry=r)
        self.cache_hits = Counter("counterpoint:prefix_cache_hits", "Prefix cache block hits", m, registry=r)
        self.by_method = Counter("counterpoint:requests_by_decoding", "Requests by decoding method", m + ["method"],
                                 registry=r)
        hist = lambda name, doc: Histogram(name, doc, m, buckets=LATENCY_BUCKETS, registry=r)  # noqa: E731
        self.ttft = hist("counterpoint:time_to_first_token_seconds", "Time to first token")
        self.itl = hist("counterpoint:inter_token_latency_seconds", "Time between output tokens")
        self.e2e = hist("counterpoint:e2e_request_latency_seconds", "Request latency, arrival to finish")
        self.queue_time = hist("counterpoint:request_queue_time_seconds", "Time waiting before first scheduled")
        self._seen: dict[tuple[str, str], int] = {}  # (counter, model) -> engine total last reported
        self._open: dict[str, _Progress] = {}

    def on_add(self, request) -> None:
        self._open[request.request_id] = _Progress(request.model)
        self.prompt_tokens.labels(request.model).inc(request.num_prompt_tokens)
        self.by_method.labels(request.model, decoding_method(request.params)).inc()

    def on_step(self, engine) -> None:
        sched = engine.scheduler
        running = PyCounter(r.model for r in sched.running)
        waiting = PyCounter(r.model for r in sched.waiting)
        for name, slot in engine.slots.items():
            pool = slot.kv.pool
            self.running.labels(name).set(running[name])
            self.waiting.labels(name).set(waiting[name])
            self.kv_usage.labels(name).set(pool.usage)
            for key, counter, value in (("queries", self.cache_queries, pool.num_queries),
                                        ("hits", self.cache_hits, pool.num_hits),
                                        ("preemptions", self.preemptions, sched.preemptions[name])):
                counter.labels(name).inc(value - self._seen.get((key, name), 0))
                self._seen[key, name] = value

    def on_output(self, out) -> None:
        progress = self._open.get(out.request_id)
        if progress is None:
            return
        now = time.monotonic()
        num_tokens = sum(len(o.token_ids) for o in out.outputs)
        new, model = num_tokens - progress.tokens, progress.model
        if new > 0:
            self.generation_tokens.labels(model).inc(new)
            if progress.last_time is None:
                self.ttft.labels(model).observe(now - out.metrics.arrival_time)
            else:
                self.itl.labels(model).observe((now - progress.last_time) / new)
            progress.tokens, progress.last_time = num_tokens, now
        if out.finished:
            self._finish(out, model, now)

    def _finish(self, out, model: str, now: float) -> None:
        del self._open[out.request_id]
        reasons = {o.finish_reason for o in out.outputs}
        reason = next((r for r in ("abort", "error", "stop") if r in reasons), "length")
        self.success.labels(model, reason).inc()
        self.e2e.labels(model).observe(now - out.metrics.arrival_time)
        if out.metrics.first_scheduled_time is not None:
            self.queue_time.labels(model).observe(out.metrics.first_scheduled_time - out.metrics.arrival_time)


@dataclass(slots=True)
class _Progress:
    """An open request's model, output tokens counted so far and when the last came."""

    model: str
    tokens: int = 0
    last_time: float | None = None
