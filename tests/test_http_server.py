"""The HTTP server, started for real with uvicorn on 127.0.0.1 and driven by the official openai
client: same text as the offline engine and transformers, streaming, errors, disconnects."""

import asyncio
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from counterpoint.serving.api.async_engine import AsyncEngine
from counterpoint.serving.engine.config import EngineConfig
from counterpoint.serving.engine.engine import Engine
from counterpoint.serving.api.metrics import Metrics
from counterpoint.serving.api.server import build_app
from test_greedy_vs_transformers import hf_greedy

MODEL = "tiny"
KEY = "secret-key"


class Server:
    def __init__(self, model_dir, api_key=None, max_queue=None, engine=None, served=(MODEL,), **engine_args):
        engine = engine or Engine(EngineConfig(model=str(model_dir), served_name=MODEL, show_progress=False,
                                               **engine_args))
        self.engine = AsyncEngine(engine, max_queue, Metrics())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(build_app(self.engine, list(served), api_key, shutdown_timeout=5), host="127.0.0.1",
                                port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key="none", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def pool_is_full(self) -> bool:
        pool = self.engine.engine.main.kv.pool
        return pool.num_free_blocks == pool.num_blocks

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(llama_dir):
    s = Server(llama_dir)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline(llama_dir):
    return LLM(str(llama_dir), show_progress=False)


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def test_completions_match_offline_and_transformers(server, offline, llama_dir):
    prompt = "The quick brown fox"
    client = server.client()
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    ids = offline.get_tokenizer().encode(prompt)
    ref = offline.generate(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert ref.outputs[0].token_ids == hf_greedy(llama_dir, ids, 12)
    assert resp.choices[0].text == ref.outputs[0].text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 12
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.outputs[0].text
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_sync_async_and_stream_agree(server, offline):
    client = server.client()
    messages = [{"role": "user", "content": "Paris is the capital of"}]
    sync = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                          logprobs=True, top_logprobs=2)

    async def run_async():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        return await aclient.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)

    asynchronous = asyncio.run(run_async())
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    prompt = offline.get_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = offline.generate(prompt, SamplingParams(max_tokens=10, temperature=0), use_tqdm=False)[0].outputs[0]
    assert sync.choices[0].message.content == asynchronous.choices[0].message.content == streamed == ref.text
    assert len(sync.choices[0].logprobs.content) == len(ref.token_ids)
    assert all(len(t.top_logprobs) == 2 for t in sync.choices[0].logprobs.content)


def test_n_logprobs_echo_and_stop(server, offline):
    client = server.client()
    resp = client.completions.create(model=MODEL, prompt=[[5, 17, 33], [9, 9, 9, 9]], max_tokens=6, n=2,
                                     temperature=1.0, seed=3, logprobs=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in resp.choices) == [0, 1, 2, 3]
    assert all(len(c.logprobs.tokens) == 6 and len(c.logprobs.top_logprobs[0]) >= 3 for c in resp.choices)
    echo = client.completions.create(model=MODEL, prompt="Paris is", max_tokens=0, echo=True, logprobs=1)
    assert echo.choices[0].text == "Paris is"
    assert echo.choices[0].logprobs.token_logprobs[0] is None and echo.choices[0].logprobs.token_logprobs[1] < 0
    full = client.completions.create(model=MODEL, prompt="Paris is", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[4:7]
    for stream in (False, True):
        resp = client.completions.create(model=MODEL, prompt="Paris is", max_tokens=16, temperature=0, stop=[stop],
                                         stream=stream, extra_body={"ignore_eos": True})
        text = "".join(c.choices[0].text for c in resp if c.choices) if stream else resp.choices[0].text
        assert text == full[: full.index(stop)]
    greedy = dict(max_tokens=16, temperature=0, ignore_eos=True)
    ids = offline.generate("Paris is", SamplingParams(**greedy), use_tqdm=False)[0].outputs[0].token_ids
    ref = offline.generate("Paris is", SamplingParams(**greedy, stop_token_ids=[ids[3]]), use_tqdm=False)[0].outputs[0]
    assert len(ref.token_ids) == ids.index(ids[3]) + 1 and ref.finish_reason == "stop"
    resp = client.completions.create(model=MODEL, prompt="Paris is", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True, "stop_token_ids": [ids[3]]}).choices[0]
    assert (resp.text, resp.finish_reason) == (ref.text, "stop")


def test_error_statuses(llama_dir):
    server = Server(llama_dir, api_key=KEY, max_model_len=64)
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        assert httpx.get(server.url + "/health").status_code == 200
        client = server.client(KEY)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other", prompt="hi")
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt="hi", temperature=-1)
        assert err.value.body["param"] == "temperature"
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt=[5] * 80, max_tokens=4)
        assert err.value.body["code"] == "context_length_exceeded" and err.value.body["param"] == "prompt"
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi " * 80}])
        assert err.value.body["code"] == "context_length_exceeded" and err.value.body["param"] == "messages"
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt=[], max_tokens=4)
        assert err.value.body["param"] == "prompt"
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt="hi", extra_body={"contrastive": {"amateur": "nope"}})
        assert err.value.body["param"] == "contrastive.amateur" and "'nope' is not served" in err.value.body["message"]
        with pytest.raises(openai.BadRequestError, match="cannot be combined") as err:
            client.completions.create(model=MODEL, prompt="hi", extra_body={
                "documents": ["Paris is in France."], "context_contrast": {"method": "cad"},
                "contrastive": {"amateur": MODEL}})
        assert err.value.body["param"] == "contrastive"
        with pytest.raises(openai.BadRequestError, match="context_contrast.alpha") as err:
            client.completions.create(model=MODEL, prompt="hi", extra_body={
                "documents": ["Paris is in France."], "context_contrast": {"method": "cad", "alpha": -1}})
        assert err.value.body["param"] == "context_contrast.alpha"
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=4, extra_body={
                "documents": ["Paris is in France. " * 40], "context_contrast": {"method": "acd"}})
        assert err.value.body["code"] == "context_length_exceeded" and err.value.body["param"] == "prompt"
        with pytest.raises(openai.BadRequestError, match="context_contrast needs documents"):
            client.completions.create(model=MODEL, prompt="hi", extra_body={"context_contrast": {"method": "acd"}})
        with pytest.raises(openai.BadRequestError, match="messages"):
            client.chat.completions.create(model=MODEL, messages=[])
        # Token ids past the vocabulary used to fail inside the engine's step and take the server down.
        vocab = server.engine.engine.main.vocab_size
        bad_ids = [(dict(prompt=[vocab]), "prompt"), (dict(logit_bias={str(vocab): 5}), "logit_bias"),
                   (dict(logit_bias={"abc": 5}), "logit_bias"),
                   (dict(extra_body={"stop_token_ids": [vocab], "min_tokens": 2}), "stop_token_ids")]
        for kwargs, param in bad_ids:
            with pytest.raises(openai.BadRequestError) as err:
                client.completions.create(**{"model": MODEL, "prompt": "hi", "max_tokens": 3, **kwargs})
            assert err.value.body["param"] == param
        assert client.completions.create(model=MODEL, prompt="hi", max_tokens=3).choices[0].finish_reason
        bad_json = httpx.post(server.url + "/v1/completions", content=b"{not json",
                              headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
        assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
        models = client.models.list()
        assert models.data[0].id == MODEL and models.data[0].max_model_len == 64
        assert client.models.retrieve(MODEL).id == MODEL
        with pytest.raises(openai.NotFoundError) as err:
            client.models.retrieve("nope")
        assert err.value.body["code"] == "model_not_found"
        tokens = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": "Paris is"},
                            headers={"Authorization": f"Bearer {KEY}"}).json()
        text = httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]},
                          headers={"Authorization": f"Bearer {KEY}"}).json()
        assert tokens["count"] == len(tokens["tokens"]) and text["prompt"] == "Paris is"
    finally:
        server.stop()


def test_every_error_is_openai_json_and_tokenize_defaults_the_model(server):
    headers = {"content-type": "application/json"}
    for method, path, status in (("GET", "/v1/nothing", 404), ("POST", "/nothing", 404),
                                 ("GET", "/v1/completions", 405), ("DELETE", "/v1/models", 405)):
        resp = httpx.request(method, server.url + path, headers=headers)
        assert resp.status_code == status
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and path in error["message"]
    for path in ("/tokenize", "/v1/tokenize"):
        tokens = httpx.post(server.url + path, json={"prompt": "Paris is"}).json()
        assert tokens["tokens"] == httpx.post(server.url + "/tokenize", json={"model": MODEL,
                                                                              "prompt": "Paris is"}).json()["tokens"]
    assert httpx.post(server.url + "/v1/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == "Paris is"


def test_top_logprobs_always_hold_the_chosen_token(server):
    """As in OpenAI and vLLM: a sampled token outside the top k is listed too (k + 1 entries)."""
    client = server.client()
    resp = client.completions.create(model=MODEL, prompt=[5, 17, 33], max_tokens=12, temperature=1.5, seed=0,
                                     logprobs=1, echo=True, extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    outside = 0
    for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert len(top) <= 2 and token in top
        if "\ufffd" not in token:  # NOTE: partial UTF-8 pieces share a text, so their entries collapse
            assert top[token] == logprob
        outside += len(top) == 2
    assert outside > 0  # at temperature 1.5 on a random model, some sampled tokens are not the argmax
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                          temperature=1.5, seed=0, logprobs=True, top_logprobs=1)
    for entry in chat.choices[0].logprobs.content:
        assert entry.token in [t.token for t in entry.top_logprobs] and len(entry.top_logprobs) <= 2


def test_chat_content_parts_and_unsupported_openai_features(server, offline):
    """Text content parts read as their texts joined by newlines (as in vLLM); images and the
    OpenAI features this server lacks are 400s that name the field, never silently ignored."""
    client = server.client()
    parts = [{"type": "text", "text": "Paris is"}, {"type": "text", "text": "the capital of"}]
    got = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=6,
                                         temperature=0).choices[0].message.content
    joined = [{"role": "user", "content": "Paris is\nthe capital of"}]
    prompt = offline.get_tokenizer().apply_chat_template(joined, tokenize=False, add_generation_prompt=True)
    ref = offline.generate(prompt, SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)[0].outputs[0]
    assert got == ref.text
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    refused = [
        (dict(messages=[{"role": "user", "content": [image]}]), "messages.0.content", "only text content parts"),
    ]
    for kwargs, param, message in refused:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**{"model": MODEL, "messages": joined, "max_tokens": 2, **kwargs})
        assert err.value.body["param"] == param and message in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="def f(", suffix="return x", max_tokens=2)
    assert err.value.body["param"] == "suffix" and err.value.body["code"] == "not_supported"


def test_a_failed_step_drops_its_requests_and_the_server_goes_on(llama_dir):
    """A step that raises (injected here: valid input no longer makes one fail) answers the requests
    in flight with a 500, or an error event mid-stream, frees their blocks, and the next request is
    served as usual."""
    server = Server(llama_dir)
    try:
        runner, fail_at = server.engine.engine.main.runner, [2]
        real_execute = runner.execute

        def execute(*args):
            fail_at[0] -= 1
            if fail_at[0] == 0:
                raise RuntimeError("injected fault")
            return real_execute(*args)

        runner.execute = execute  # the second model run: the first decode, after the prefill
        client = server.client()
        ask = dict(model=MODEL, prompt=[5, 17, 33], max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(**ask)
        assert "an engine step failed" in err.value.body["message"]
        fail_at[0] = 2
        with pytest.raises(openai.APIError, match="an engine step failed"):
            list(client.completions.create(**ask, stream=True))
        assert wait_until(server.pool_is_full) and httpx.get(server.url + "/health").status_code == 200
        served = client.completions.create(**ask).choices[0]
        assert served.finish_reason == "length" and served.text == client.completions.create(**ask).choices[0].text
    finally:
        server.stop()


def test_queue_limit_answers_429(llama_dir):
    server = Server(llama_dir, max_queue=1, max_num_seqs=1, max_num_batched_tokens=8)

    async def one(client):
        try:
            await client.completions.create(model=MODEL, prompt=[5] * 20, max_tokens=30,
                                            extra_body={"ignore_eos": True})
            return 200
        except openai.RateLimitError:
            return 429

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        return await asyncio.gather(*[one(client) for _ in range(8)])

    try:
        codes = asyncio.run(main())
        assert 429 in codes and 200 in codes
        assert wait_until(server.pool_is_full)
    finally:
        server.stop()


def test_fifty_streaming_clients_with_disconnects(server):
    async def client_task(i, client):
        stream = await client.completions.create(model=MODEL, prompt=[5 + i, 17, 33], max_tokens=24, temperature=0.8,
                                                 seed=i, stream=True, extra_body={"ignore_eos": True})
        received = 0
        async for chunk in stream:
            received += 1
            if i % 5 == 0 and received == 3:
                await stream.close()  # a fifth of the clients walk away midway
                return "cancelled"
            if chunk.choices and chunk.choices[0].finish_reason:
                return chunk.choices[0].finish_reason
        return "incomplete"

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                                    http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=60)))
        return await asyncio.gather(*[client_task(i, client) for i in range(50)])

    results = asyncio.run(main())
    assert results.count("cancelled") == 10 and results.count("length") == 40
    assert wait_until(lambda: server.engine.num_unfinished == 0 and server.pool_is_full())


def scrape(server) -> dict:
    """/metrics parsed by prometheus_client's own parser: {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_parse_and_move(server):
    label = (("model_name", MODEL),)
    before = scrape(server)
    client = server.client()
    client.completions.create(model=MODEL, prompt=[5, 17, 33], max_tokens=7, temperature=0,
                              extra_body={"ignore_eos": True})
    client.completions.create(model=MODEL, prompt=[5, 17, 33, 40], max_tokens=3, temperature=0.7, seed=1,
                              extra_body={"ignore_eos": True})
    assert wait_until(lambda: scrape(server)[("counterpoint:generation_tokens_total", label)]
                      - before.get(("counterpoint:generation_tokens_total", label), 0) == 10)
    after = scrape(server)
    delta = lambda key: after[key] - before.get(key, 0)  # noqa: E731
    assert delta(("counterpoint:prompt_tokens_total", label)) == 7
    assert delta(("counterpoint:request_success_total", (("finished_reason", "length"), ("model_name", MODEL)))) == 2
    assert delta(("counterpoint:requests_by_decoding_total", (("method", "greedy"), ("model_name", MODEL)))) == 1
    assert delta(("counterpoint:requests_by_decoding_total", (("method", "sampling"), ("model_name", MODEL)))) == 1
    assert delta(("counterpoint:time_to_first_token_seconds_count", label)) == 2
    assert delta(("counterpoint:e2e_request_latency_seconds_count", label)) == 2
    assert delta(("counterpoint:inter_token_latency_seconds_count", label)) >= 2
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert (f"counterpoint:{gauge}", label) in after
    for counter in ("num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total"):
        assert (f"counterpoint:{counter}", label) in after


def test_bench_serve_reports_latencies(server, tmp_path):
    from argparse import Namespace

    from counterpoint.serving.bench.serve import serve_benchmark

    args = Namespace(base_url=server.url, model=MODEL, api_key=None, num_prompts=6, dataset=None, input_len=None,
                     max_token_id=None, output_len=5, request_rate=None, max_concurrency=3, seed=0, plot=str(tmp_path / "plot.png"),
                     json=None)
    summary = serve_benchmark(args)
    assert summary["num_failed"] == 0 and summary["num_requests"] == 6
    assert summary["output_token_throughput"] > 0 and (tmp_path / "plot.png").is_file()
    assert summary["ttft_s"]["p50"] <= summary["e2e_latency_s"]["p50"]


def test_bench_serve_sends_prompts_of_exactly_input_len_tokens(server):
    from argparse import Namespace

    from counterpoint.serving.bench.serve import serve_benchmark

    label = (("model_name", MODEL),)
    before = scrape(server)
    args = Namespace(base_url=server.url, model=MODEL, api_key=None, num_prompts=3, dataset=None, input_len=13,
                     max_token_id=300, output_len=2, request_rate=None, max_concurrency=2, seed=0, plot=None, json=None)
    assert serve_benchmark(args)["num_failed"] == 0
    assert wait_until(lambda: scrape(server)[("counterpoint:prompt_tokens_total", label)]
                      - before.get(("counterpoint:prompt_tokens_total", label), 0) == 3 * 13)


def test_bench_serve_beam_search_counts_every_beam(server):
    """Beam search as vLLM serves it (one response, n beams): each of 2 requests returns 3 beams of
    4 tokens (EOS ignored), as the server's own generation-token counter also says."""
    from argparse import Namespace

    from counterpoint.serving.bench.serve import serve_benchmark

    label = (("model_name", MODEL),)
    before = scrape(server).get(("counterpoint:generation_tokens_total", label), 0)
    args = Namespace(base_url=server.url, model=MODEL, api_key=None, num_prompts=2, dataset=None, input_len=6,
                     max_token_id=300, output_len=4, request_rate=None, max_concurrency=2, seed=0, plot=None, json=None,
                     beam_width=3)
    summary = serve_benchmark(args)
    assert summary["num_failed"] == 0 and summary["itl_s"] == {}
    assert round(summary["output_token_throughput"] * summary["duration_s"]) == 2 * 3 * 4
    assert wait_until(lambda: scrape(server)[("counterpoint:generation_tokens_total", label)] - before == 2 * 3 * 4)


def test_health_is_503_while_loading(llama_dir):
    import threading as th

    release = th.Event()

    def slow_factory():
        release.wait(30)
        return Engine(EngineConfig(model=str(llama_dir), served_name=MODEL, show_progress=False))

    server = Server(llama_dir, engine=slow_factory)
    try:
        assert httpx.get(server.url + "/health").status_code == 503
        resp = httpx.get(server.url + "/v1/models")
        assert resp.status_code == 503 and "loading" in resp.json()["error"]["message"]
        release.set()
        assert wait_until(lambda: httpx.get(server.url + "/health").status_code == 200)
        assert server.client().models.list().data[0].id == MODEL
    finally:
        release.set()
        server.stop()


def test_sigterm_drains_in_flight_requests(llama_dir):
    import json
    import signal

    proc, url = start_serve(llama_dir, "--shutdown-timeout", "20")
    try:
        assert wait_until(lambda: _healthy(url), timeout=60)
        body = {"model": MODEL, "prompt": [5, 17, 33], "max_tokens": 120, "stream": True, "ignore_eos": True}
        finish = None
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
            for i, line in enumerate(resp.iter_lines()):
                if i == 2:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
                if line.startswith("data: {"):
                    finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
        assert finish == "length"
        # uvicorn re-raises the signal once its graceful shutdown is done, so -SIGTERM is a clean exit.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        log = proc.stdout.read()
        assert "Finished server process" in log
        assert f"ready: serving {MODEL} on {url}" in log  # after the model loaded and the socket listens
        assert f"loaded {MODEL} from {llama_dir}: float32" in log and "KV blocks of 16 tokens" in log
    finally:
        proc.kill()


def test_sigterm_past_the_drain_timeout_ends_every_stream_cleanly(llama_dir):
    """With a drain timeout of 0, SIGTERM ends every open stream at once with an error event and
    [DONE] (no connection cut mid-stream), and the process exits promptly."""
    import json
    import signal

    proc, url = start_serve(llama_dir, "--shutdown-timeout", "0")
    started = threading.Barrier(5)
    results = [None] * 4

    def stream(i):
        body = {"model": MODEL, "prompt": [5 + i, 17, 33], "max_tokens": 400, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
            lines = []
            for line in resp.iter_lines():
                lines.append(line)
                if len(lines) == 3:
                    started.wait(60)
            results[i] = [line for line in lines if line]

    try:
        assert wait_until(lambda: _healthy(url), timeout=60)
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        started.wait(60)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        for lines in results:
            assert lines[-1] == "data: [DONE]"
            last = json.loads(lines[-2][6:])
            assert last["error"]["type"] == "service_unavailable" and "shut down" in last["error"]["message"]
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        proc.kill()


def start_serve(llama_dir, *flags):
    """`counterpoint serve` in its own process on a free port: (process, base URL)."""
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "counterpoint.serving", "serve", "--model", f"{MODEL}={llama_dir}",
                             "--port", str(port), *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, f"http://127.0.0.1:{port}"


def _healthy(url) -> bool:
    try:
        return httpx.get(url + "/health").status_code == 200
    except httpx.HTTPError:
        return False
