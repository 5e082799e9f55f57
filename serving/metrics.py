"""Prometheus metrics with vLLM's names under the `counterpoint:` prefix (API.md).

Updated from the engine thread: once per step for gauges and cache counters, once per output
for token counts and latencies. Every series carries `model_name`.
"""

import time

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
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
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
        self._seen = {"queries": 0, "hits": 0, "preemptions": 0}
        self._progress: dict[str, tuple[int, float]] = {}  # request id -> (tokens reported, time)

    def on_add(self, request) -> None:
        self.prompt_tokens.labels(self.model_name).inc(request.num_prompt_tokens)
        self.by_method.labels(self.model_name, decoding_method(request.params)).inc()

    def on_step(self, engine) -> None:
        sched, pool = engine.scheduler, engine.main.kv.pool
        self.running.labels(self.model_name).set(len(sched.running))
        self.waiting.labels(self.model_name).set(len(sched.waiting))
        self.kv_usage.labels(self.model_name).set(pool.usage)
        for key, counter, value in (("queries", self.cache_queries, pool.num_queries),
                                    ("hits", self.cache_hits, pool.num_hits),
                                    ("preemptions", self.preemptions, sched.num_preemptions)):
            counter.labels(self.model_name).inc(value - self._seen[key])
            self._seen[key] = value

    def on_output(self, out) -> None:
        now = time.monotonic()
        num_tokens = sum(len(o.token_ids) for o in out.outputs)
        reported, last_time = self._progress.get(out.request_id, (0, None))
        new = num_tokens - reported
        if new > 0:
            self.generation_tokens.labels(self.model_name).inc(new)
            if last_time is None:
                self.ttft.labels(self.model_name).observe(now - out.metrics.arrival_time)
            else:
                self.itl.labels(self.model_name).observe((now - last_time) / new)
            self._progress[out.request_id] = (num_tokens, now)
        if out.finished:
            self._finish(out, now)

    def _finish(self, out, now: float) -> None:
        self._progress.pop(out.request_id, None)
        reasons = {o.finish_reason for o in out.outputs}
        reason = "abort" if "abort" in reasons else ("stop" if "stop" in reasons else "length")
        self.success.labels(self.model_name, reason).inc()
        self.e2e.labels(self.model_name).observe(now - out.metrics.arrival_time)
        if out.metrics.first_scheduled_time is not None:
            self.queue_time.labels(self.model_name).observe(out.metrics.first_scheduled_time - out.metrics.arrival_time)
