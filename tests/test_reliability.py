"""No request, however malformed or large, takes the server down, fails the requests beside it, or
answers 500: each hostile input below is sent next to a valid request, which must be served
exactly as when alone, and the server must be healthy with every KV block free afterwards."""

import asyncio
import json
import threading

import httpx
import openai
import pytest

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from counterpoint.serving.engine.config import EngineConfig
from counterpoint.serving.engine.engine import Engine
from test_http_server import MODEL, Server, wait_until

KEY = "k3y"
VALID = {"model": MODEL, "prompt": [5, 17, 33], "max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(llama_dir, amateur_dir):
    engine = Engine(EngineConfig(model=str(llama_dir), served_name=MODEL, extra_models=(("amateur", str(amateur_dir)),),
                                 show_progress=False))
    s = Server(llama_dir, engine=engine, served=(MODEL, "amateur"), api_key=KEY)
    yield s
    s.stop()


def post(server, path, body=None, content=None, key=KEY, timeout=120.0):
    """POST `body` as JSON with non-ASCII escaped, as most clients send it (so a lone surrogate
    travels as the escape "\\ud800"), or raw `content`."""
    headers = {"content-type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    content = json.dumps(body).encode() if body is not None else content
    return httpx.post(server.url + path, content=content, headers=headers, timeout=timeout)


def healthy_and_clean(server) -> bool:
    return (httpx.get(server.url + "/health").status_code == 200 and server.engine.num_unfinished == 0
            and all(s.kv.pool.num_free_blocks == s.kv.pool.num_blocks for s in server.engine.engine.slots.values()))


def beside_a_valid_request(server, path, body):
    """Send `body` and a valid request at once; returns the hostile one's response after checking
    the valid one was served as when alone."""
    alone = post(server, "/v1/completions", VALID).json()["choices"][0]["text"]
    results = {}

    def send(name, p, b):
        results[name] = post(server, p, b)

    threads = [threading.Thread(target=send, args=("valid", "/v1/completions", VALID)),
               threading.Thread(target=send, args=("hostile", path, body))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["valid"].status_code == 200 and results["valid"].json()["choices"][0]["text"] == alone
    return results["hostile"]


SURROGATES = [
    ("/v1/completions", {"model": MODEL, "prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["fine", "\udfff x"]}, "prompt.1"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}]},
     "messages.0.content"),
    ("/tokenize", {"model": MODEL, "prompt": "a\ud800b"}, "prompt"),
]


@pytest.mark.parametrize("path,body,param", SURROGATES)
def test_a_lone_surrogate_is_a_400_and_the_server_goes_on(server, path, body, param):
    # NOTE: json.dumps writes "\ud800" as the escape a client sends; the server decodes it to a lone surrogate.
    resp = beside_a_valid_request(server, path, body)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param
    assert wait_until(lambda: healthy_and_clean(server))


NUMERIC_EXTREMES = [
    {"temperature": 1e-320, "min_tokens": 1},
    {"temperature": 1e308, "min_tokens": 1},
    {"temperature": 1.5, "top_k": 2**63, "top_p": 0.5},
    {"temperature": 1.5, "top_k": 2**70, "top_p": 0.5},
    {"length_penalty": 1e308},
    {"length_penalty": 1e308, "use_beam_search": True, "n": 2},
    {"length_penalty": -1e308, "use_beam_search": True, "n": 2},
    {"length_penalty": -1e16, "use_beam_search": True, "n": 2},
    {"contrastive": {"amateur": "amateur", "amateur_temperature": 1e-320}, "temperature": 0},
    {"contrastive": {"amateur": "amateur", "amateur_temperature": 1e308, "beta": 1e308}, "temperature": 0.7},
    {"repetition_penalty": 1e-300, "presence_penalty": 2, "frequency_penalty": -2, "temperature": 0.9},
]


@pytest.mark.parametrize("extra", NUMERIC_EXTREMES, ids=lambda e: json.dumps(e))
def test_numeric_extremes_are_served_beside_a_valid_request(server, extra):
    body = {"model": MODEL, "prompt": "Paris is", "max_tokens": 5, "seed": 1, **extra}
    resp = beside_a_valid_request(server, "/v1/completions", body)
    assert resp.status_code == 200, resp.text
    choices = resp.json()["choices"]
    assert len(choices) == extra.get("n", 1) and all(c["finish_reason"] in ("stop", "length") for c in choices)
    assert wait_until(lambda: healthy_and_clean(server))


NON_FINITE = [("temperature", "Infinity"), ("length_penalty", "NaN"), ("length_penalty", "-Infinity"),
              ("top_p", "NaN"), ("contrastive", '{"amateur": "amateur", "alpha": NaN}')]


@pytest.mark.parametrize("field,literal", NON_FINITE)
def test_non_finite_numbers_anywhere_are_a_400(server, field, literal):
    raw = f'{{"model": "{MODEL}", "prompt": "hi", "max_tokens": 2, "{field}": {literal}}}'
    resp = post(server, "/v1/completions", content=raw.encode(), key=KEY)
    assert resp.status_code == 400 and resp.json()["error"]["param"].startswith(field)


NESTED = [({"contrastive": {}}, "contrastive.amateur"),
          ({"contrastive": {"amateur": "amateur", "unknown": 1}}, "contrastive.unknown"),
          ({"contrastive": {"amateur": "amateur", "alpha": "x"}}, "contrastive.alpha"),
          ({"contrastive": {"amateur": "amateur", "alpha": 2}}, "contrastive.alpha"),
          ({"context_contrast": {"method": "nope"}}, "context_contrast.method"),
          ({"logit_bias": {"²": 1}}, "logit_bias"),
          ({"max_tokens": 2**31}, "max_tokens"),
          ({"max_tokens": -1}, "max_tokens")]


@pytest.mark.parametrize("extra,param", NESTED, ids=lambda x: str(x))
def test_bad_fields_are_400s_naming_the_field(server, extra, param):
    resp = post(server, "/v1/completions", {"model": MODEL, "prompt": "hi", **extra})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
    chat = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                 "max_completion_tokens": -1})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "max_completion_tokens"


def test_detokenize_ids_outside_the_vocabulary_are_400s(server):
    for tokens in ([-1], [2**70], [5, 10**6]):
        resp = post(server, "/detokenize", {"model": MODEL, "tokens": tokens})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "tokens"


def test_body_size_limit_while_health_answers(server):
    from counterpoint.serving.api.guard import MAX_BODY_BYTES

    big = json.dumps({"model": MODEL, "prompt": "a" * (MAX_BODY_BYTES + 10)}).encode()
    resp = post(server, "/v1/completions", content=big)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"

    def chunks():  # no content-length: the limit still holds
        for i in range(0, len(big), 2**20):
            yield big[i:i + 2**20]

    resp = post(server, "/v1/completions", content=chunks())
    assert resp.status_code == 413
    assert httpx.get(server.url + "/health").status_code == 200
    assert post(server, "/v1/completions", VALID).status_code == 200


def test_too_many_prompts_is_a_400_and_a_client_that_leaves_cancels_them_all(server):
    from counterpoint.serving.api.protocol import MAX_PROMPTS

    resp = post(server, "/v1/completions", {**VALID, "prompt": [[5, 6]] * (MAX_PROMPTS + 1)})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
    body = {**VALID, "prompt": [[5 + i % 50, 6, 7] for i in range(MAX_PROMPTS)], "max_tokens": 200}
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", body, timeout=1.0)
    assert wait_until(lambda: healthy_and_clean(server), timeout=60)


def test_auth_before_the_body_and_the_scheme_is_case_insensitive(server):
    for key in (None, "wrong"):
        resp = post(server, "/v1/completions", content=b"{not json", key=key)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    resp = httpx.post(server.url + "/v1/completions", json=VALID, headers={"Authorization": f"bearer {KEY}"})
    assert resp.status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200  # open, for orchestrators
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"model": "\xff\xfe"}'):
        resp = post(server, "/v1/completions", content=raw)
        assert resp.status_code == 400 and set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_each_streamed_choice_finishes_exactly_once(server):
    for path, body in (("/v1/completions", {"prompt": "Hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
        body = {**body, "model": MODEL, "max_tokens": 6, "n": 2, "stream": True, "temperature": 1, "seed": 1,
                "stop": [","]}
        with httpx.stream("POST", server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=60) as resp:
            chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
        finishes = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert sorted(finishes) == [0, 1]


def test_queue_limit_counts_only_requests_that_wait_for_room(llama_dir):
    """40 requests at once with room for 64 sequences: none waits, so --max-queue 4 refuses none."""
    server = Server(llama_dir, max_queue=4, max_num_seqs=64)

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                                    http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=50)))
        return await asyncio.gather(*[client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3)
                                      for _ in range(40)], return_exceptions=True)

    try:
        results = asyncio.run(main())
        assert not [r for r in results if isinstance(r, Exception)]
    finally:
        server.stop()


def faulty(process):
    """`process` that raises for the rows of a request with seed 13: an injected fault."""
    def wrapped(logits, rows):
        if any(row.params.seed == 13 for row in rows):
            raise RuntimeError("injected fault")
        return process(logits, rows)

    return wrapped


def test_a_request_whose_decoding_fails_fails_alone(llama_dir, monkeypatch):
    """A fault injected into one request's decoding (its rows raise in processing) ends that request
    with an error; the requests decoded in the same steps give exactly their solo outputs."""
    import counterpoint.decoding.step as step_module

    llm = LLM(str(llama_dir), show_progress=False)
    prompts = [[5, 17, 33], [9, 9, 9], [40, 41]]
    params = [SamplingParams(max_tokens=8, temperature=0.8, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0.8, seed=13, ignore_eos=True),
              SamplingParams(max_tokens=8, n=2, use_beam_search=True, ignore_eos=True)]
    solo = [llm.generate([p], [sp], use_tqdm=False)[0] for p, sp in zip(prompts[::2], params[::2])]
    monkeypatch.setattr(step_module, "process", faulty(step_module.process))
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert outs[1].error and "injected fault" in outs[1].error and outs[1].outputs[0].finish_reason == "error"
    for got, ref in zip(outs[::2], solo):
        assert got.error is None and [o.token_ids for o in got.outputs] == [o.token_ids for o in ref.outputs]
    pool = llm.engine.main.kv.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_a_failed_decoding_over_http_is_a_500_for_that_request_alone(server, monkeypatch):
    import counterpoint.decoding.step as step_module

    monkeypatch.setattr(step_module, "process", faulty(step_module.process))
    resp = beside_a_valid_request(server, "/v1/completions", {**VALID, "temperature": 0.8, "seed": 13})
    assert resp.status_code == 500 and "decoding this request failed" in resp.json()["error"]["message"]
    assert wait_until(lambda: healthy_and_clean(server))
