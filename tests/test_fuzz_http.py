"""Property-based fuzzing of the HTTP API with hypothesis (fixed seed, a few hundred bodies): any
mix of valid values, wrong types, extremes, broken text and unknown fields, against a real
uvicorn server. No body may get a 5xx or hang; every 4xx is OpenAI's error JSON; afterwards the
server is healthy, serves a normal request, and every KV block is free."""

import json
import math
import os
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from counterpoint.serving.engine.config import EngineConfig
from counterpoint.serving.engine.engine import Engine
from test_http_server import MODEL, Server, wait_until

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, -1, 2**31, 2**63, 1e-320, 1e308, -1e308]),
    st.text(max_size=12), st.sampled_from(["\ud800", "a\udfffb", "", "²", "never", "acd", "amateur", MODEL]),
)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=3), max_leaves=6)
SMALL_INT = st.integers(min_value=-2, max_value=6)


def field(sensible):
    """Mostly (7 in 8) a value of the right kind, sometimes anything at all."""
    return st.one_of(*[sensible] * 7, JSON)


COMMON = {
    "temperature": field(st.floats(min_value=0, max_value=3)), "top_p": field(st.floats(min_value=0, max_value=1)),
    "n": field(SMALL_INT), "seed": field(st.integers()), "stop": field(st.lists(st.text(max_size=3), max_size=2)),
    "stream": field(st.booleans()), "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "presence_penalty": field(st.floats(-3, 3)), "frequency_penalty": field(st.floats(-3, 3)),
    "logit_bias": field(st.dictionaries(st.sampled_from(["5", "17", "99999", "-1", "x"]), st.floats(-120, 120),
                                        max_size=2)),
    "top_k": field(st.integers(-2, 2**64)), "min_p": field(st.floats(0, 1)),
    "repetition_penalty": field(st.floats(0, 3)), "min_tokens": field(SMALL_INT),
    "ignore_eos": field(st.booleans()), "stop_token_ids": field(st.lists(st.integers(-1, 500), max_size=2)),
    "use_beam_search": field(st.booleans()), "length_penalty": field(st.floats(allow_nan=True)),
    "early_stopping": field(st.sampled_from([True, False, "never"])),
    "contrastive": field(st.fixed_dictionaries({"amateur": st.sampled_from(["amateur", MODEL, "none"])},
                                               optional={"alpha": st.floats(0, 1), "beta": st.floats(0, 3),
                                                         "amateur_temperature": st.floats(0, 3)})),
    "context_contrast": field(st.fixed_dictionaries({"method": st.sampled_from(["acd", "cad", "x"])})),
    "documents": field(st.lists(st.text(max_size=8), max_size=2)),
    "return_decoding_info": field(st.booleans()), "max_tokens": field(SMALL_INT),
    "unknown_field": JSON,
}
PROMPT = field(st.one_of(st.text(max_size=20), st.lists(st.integers(-1, 400), max_size=6),
                         st.lists(st.text(max_size=8), max_size=3)))
COMPLETION = st.fixed_dictionaries({"model": st.sampled_from([MODEL, MODEL, "other"]), "prompt": PROMPT},
                                   optional={**COMMON, "best_of": field(SMALL_INT), "echo": field(st.booleans()),
                                             "logprobs": field(SMALL_INT), "suffix": field(st.text(max_size=3))})
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                 "content": field(st.text(max_size=20))})
CHAT = st.fixed_dictionaries({"model": st.just(MODEL), "messages": field(st.lists(MESSAGE, max_size=3))},
                             optional={**COMMON, "logprobs": field(st.booleans()), "top_logprobs": field(SMALL_INT),
                                       "max_completion_tokens": field(SMALL_INT),
                                       "response_format": field(st.just({"type": "text"}))})
# Valid bodies with values anywhere in their allowed ranges, extremes included.
VALID = st.fixed_dictionaries(
    {"model": st.just(MODEL), "prompt": st.one_of(st.text(min_size=1, max_size=20), st.lists(st.integers(0, 300),
                                                                                                  min_size=1, max_size=6)),
     "max_tokens": st.integers(1, 6)},
    optional={"temperature": st.floats(0, 1e308), "top_p": st.floats(1e-30, 1), "top_k": st.integers(-1, 2**70),
              "min_p": st.floats(0, 1), "seed": st.integers(-(2**63), 2**64 - 1), "n": st.integers(1, 3),
              "repetition_penalty": st.floats(1e-300, 1e300), "presence_penalty": st.floats(-2, 2),
              "frequency_penalty": st.floats(-2, 2), "logprobs": st.integers(0, 5), "stream": st.booleans(),
              "use_beam_search": st.booleans(), "length_penalty": st.floats(-1e308, 1e308),
              "early_stopping": st.sampled_from([True, False, "never"]), "ignore_eos": st.booleans(),
              "logit_bias": st.dictionaries(st.sampled_from(["5", "17", "200"]), st.floats(-100, 100), max_size=2),
              "contrastive": st.fixed_dictionaries({"amateur": st.just("amateur")},
                                                   optional={"alpha": st.floats(1e-30, 1), "beta": st.floats(0, 1e30),
                                                             "amateur_temperature": st.floats(1e-300, 1e300)}),
              "return_decoding_info": st.booleans(), "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2)})
ROUTES = st.one_of(st.tuples(st.just("/v1/completions"), VALID),
                   st.tuples(st.just("/v1/completions"), COMPLETION), st.tuples(st.just("/v1/chat/completions"), CHAT),
                   st.tuples(st.just("/tokenize"), st.fixed_dictionaries({}, optional={"model": field(st.just(MODEL)),
                                                                                        "prompt": PROMPT})),
                   st.tuples(st.just("/detokenize"), st.fixed_dictionaries({"tokens": field(
                       st.lists(st.integers(-(2**70), 2**70), max_size=3))})))


@pytest.fixture(scope="module")
def server(llama_dir, amateur_dir):
    engine = Engine(EngineConfig(model=str(llama_dir), served_name=MODEL, extra_models=(("amateur", str(amateur_dir)),),
                                 max_num_seqs=8, max_model_len=48, show_progress=False))
    s = Server(llama_dir, engine=engine, served=(MODEL, "amateur"))
    yield s
    s.stop()


def encode(body) -> bytes:
    """JSON as a client would write it; NaN and Infinity as Python's json writes them."""
    return json.dumps(body).encode()


# A longer run by hand: COUNTERPOINT_FUZZ_EXAMPLES=1500 python -m pytest -s tests/test_fuzz_http.py
EXAMPLES = int(os.environ.get("COUNTERPOINT_FUZZ_EXAMPLES", "200"))


def test_fuzzed_bodies_never_get_a_5xx(server):
    statuses: Counter = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(ROUTES)
    def one(route):
        path, body = route
        resp = httpx.post(server.url + path, content=encode(body), timeout=60,
                          headers={"content-type": "application/json"})
        statuses[resp.status_code] += 1
        assert resp.status_code < 500, f"{path} {json.dumps(body)} -> {resp.text}"
        if resp.status_code >= 400:
            error = resp.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]

    one()
    print(f"fuzzed statuses: {dict(sorted(statuses.items()))}")
    assert statuses[200] >= EXAMPLES // 6 and sum(statuses.values()) == EXAMPLES  # valid and invalid bodies
    assert wait_until(lambda: server.engine.num_unfinished == 0, timeout=60)
    assert httpx.get(server.url + "/health").status_code == 200
    ok = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"]
    assert all(s.kv.pool.num_free_blocks == s.kv.pool.num_blocks for s in server.engine.engine.slots.values())


def test_the_fuzzer_sends_what_it_claims():
    """Non-finite numbers and lone surrogates reach the wire as a client sends them."""
    assert encode({"x": math.inf, "y": "\ud800"}) == b'{"x": Infinity, "y": "\\ud800"}'
