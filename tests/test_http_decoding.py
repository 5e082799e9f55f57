"""Beam search and contrastive decoding over HTTP (real uvicorn, official openai client): the same
tokens as the offline engine, with n > 1, streaming, logprobs and decoding info, and clear 400s."""

import openai
import pytest

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from counterpoint.serving.engine.config import EngineConfig
from counterpoint.serving.engine.engine import Engine
from test_http_server import MODEL, Server

PROMPT = "The quick brown fox"
CD = {"amateur": "amateur", "alpha": 0.2, "beta": 0.8}


@pytest.fixture(scope="module")
def server(llama_dir, amateur_dir):
    engine = Engine(EngineConfig(model=str(llama_dir), served_name=MODEL, extra_models=(("amateur", str(amateur_dir)),),
                                 show_progress=False))
    s = Server(llama_dir, engine=engine, served=(MODEL, "amateur"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline(llama_dir, amateur_dir):
    return LLM(str(llama_dir), amateur=str(amateur_dir), show_progress=False)


def offline_tokens(offline, **params):
    out = offline.generate(PROMPT, SamplingParams(**params), use_tqdm=False)[0]
    return [o.token_ids for o in out.outputs]


def served_tokens(offline, choices):
    tokenizer = offline.get_tokenizer()
    return [[tokenizer.convert_tokens_to_ids(t) for t in c.logprobs.tokens] for c in choices]


def test_models_lists_both(server):
    assert [m.id for m in server.client().models.list().data] == [MODEL, "amateur"]


def test_beam_search_with_stop_strings_matches_offline(server, offline):
    resp = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, n=2, stop=["e", "a"],
                                              extra_body={"use_beam_search": True})
    expected = offline.generate(PROMPT, SamplingParams(max_tokens=12, n=2, use_beam_search=True, stop=["e", "a"]),
                                use_tqdm=False)[0]
    assert [(c.text, c.finish_reason) for c in resp.choices] == [(o.text, o.finish_reason) for o in expected.outputs]


def test_beam_search_completion_matches_offline(server, offline):
    resp = server.client().completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=10, n=2, best_of=3, logprobs=0,
        extra_body={"use_beam_search": True, "ignore_eos": True, "length_penalty": 0.5})
    expected = offline_tokens(offline, max_tokens=10, n=2, best_of=3, use_beam_search=True, ignore_eos=True,
                              length_penalty=0.5)
    tokenizer = offline.get_tokenizer()
    assert [c.text for c in resp.choices] == [tokenizer.decode(t) for t in expected]
    assert [c.index for c in resp.choices] == [0, 1] and resp.usage.completion_tokens == 20
    assert server.pool_is_full()


@pytest.mark.parametrize("stream", [False, True])
def test_contrastive_chat_with_beams_streams_the_offline_text(server, offline, stream):
    tokenizer = offline.get_tokenizer()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    expected = offline.generate(prompt, SamplingParams(max_tokens=8, n=2, use_beam_search=True, contrastive=CD,
                                                       ignore_eos=True), use_tqdm=False)[0]
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, n=2,
                  extra_body={"use_beam_search": True, "contrastive": CD, "ignore_eos": True})
    client = server.client()
    if stream:
        texts = ["", ""]
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
    else:
        texts = [c.message.content for c in client.chat.completions.create(**kwargs).choices]
    assert texts == [o.text for o in expected.outputs]


def test_contrastive_sampling_stream_reports_decoding_info(server, offline):
    params = dict(max_tokens=8, temperature=0.9, seed=3, n=2, ignore_eos=True, contrastive=CD,
                  return_decoding_info=True, logprobs=1)
    expected = offline.generate(PROMPT, SamplingParams(**params), use_tqdm=False)[0]
    chunks = list(server.client().completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0.9, seed=3, n=2, logprobs=1, stream=True,
        extra_body={"ignore_eos": True, "contrastive": CD, "return_decoding_info": True}))
    for o in expected.outputs:
        mine = [c for chunk in chunks for c in chunk.choices if c.index == o.index]
        assert "".join(c.text for c in mine) == o.text
        info = [i for c in mine for i in (c.model_extra.get("decoding_info") or [])]
        assert [i["main_logprob"] for i in info] == pytest.approx([d["main_logprob"] for d in o.decoding_info])
        logprobs = [lp for c in mine for lp in c.logprobs.token_logprobs]
        assert logprobs == pytest.approx([lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)])
    assert server.pool_is_full()


def test_contrastive_errors_are_400s_naming_the_field(server):
    client = server.client()
    cases = [({"amateur": "nope"}, "contrastive.amateur", "'nope' is not served"),
             ({"amateur": MODEL}, "contrastive.amateur", "the request's own model"),
             ({"amateur": "amateur", "alpha": 0}, "contrastive.alpha", "must be in (0, 1]"),
             ({"amateur": "amateur", "beta": -1}, "contrastive.beta", ">= 0"),
             ({"amateur": "amateur", "amateur_temperature": 0}, "contrastive.amateur_temperature", "> 0")]
    for contrastive, param, message in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt=PROMPT, extra_body={"contrastive": contrastive})
        assert err.value.body["param"] == param and message in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, n=2, best_of=1, extra_body={"use_beam_search": True})
    assert err.value.body["param"] == "best_of"
    # The amateur is a served model in its own right.
    assert client.completions.create(model="amateur", prompt=PROMPT, max_tokens=3).choices[0].text is not None


def test_metrics_are_labelled_with_each_request_s_model(server):
    from test_http_server import scrape, wait_until

    before = scrape(server)
    client = server.client()
    greedy = {"ignore_eos": True}
    usage = {"amateur": client.completions.create(model="amateur", prompt=PROMPT, max_tokens=3, temperature=0,
                                                  extra_body=greedy).usage,
             MODEL: client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                              extra_body={**greedy, "contrastive": CD}).usage}
    delta = lambda name, labels: scrape(server).get((name, labels), 0) - before.get((name, labels), 0)  # noqa: E731
    for model, used in usage.items():
        label = (("model_name", model),)
        assert wait_until(lambda: delta("counterpoint:generation_tokens_total", label) == used.completion_tokens)
        assert delta("counterpoint:prompt_tokens_total", label) == used.prompt_tokens
        assert ("counterpoint:kv_cache_usage_perc", label) in scrape(server)
    methods = {"amateur": "greedy", MODEL: "contrastive"}
    for model, method in methods.items():
        assert delta("counterpoint:requests_by_decoding_total", (("method", method), ("model_name", model))) == 1


DOCS = ["Paris is the capital of France.", "Berlin is the capital of Germany."]


@pytest.mark.parametrize("method", ["cad", "acd", "adacad"])
def test_documents_and_context_contrast_match_offline(server, offline, method):
    """Completions and chat, streamed and not: the same tokens and decoding info as offline."""
    contrast = {"documents": DOCS, "context_contrast": {"method": method}, "return_decoding_info": True}
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, return_decoding_info=True,
                            context_contrast={"method": method})
    expected = offline.generate(PROMPT, params, documents=DOCS, use_tqdm=False)[0].outputs[0]
    client = server.client()
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                     extra_body={**contrast, "ignore_eos": True})
    assert resp.choices[0].text == expected.text
    assert resp.choices[0].model_extra["decoding_info"] == pytest.approx(expected.decoding_info)
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                       extra_body={**contrast, "ignore_eos": True})
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    streamed_info = [info for c in chunks for info in c.choices[0].model_extra.get("decoding_info") or []]
    assert streamed_info == pytest.approx(expected.decoding_info)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    tokenizer = offline.get_tokenizer()
    with_docs = [{"role": "user", "content": "Context:\n[1] " + DOCS[0] + "\n[2] " + DOCS[1] + "\n\n"
                  + messages[0]["content"]}]
    prompt = tokenizer.apply_chat_template(with_docs, tokenize=False, add_generation_prompt=True)
    no_context = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                               return_dict=False)
    llm = offline.engine
    request = llm.add_request(f"chat-{method}", prompt, params, no_context=no_context)
    while llm.has_unfinished_requests():
        llm.step()
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                          extra_body={**contrast, "ignore_eos": True})
    assert chat.choices[0].message.content == request.finished[0].text


def test_documents_alone_are_plain_rag_prompting(server, offline):
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = offline.generate(PROMPT, params, documents=DOCS, use_tqdm=False)[0]
    resp = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                              extra_body={"documents": DOCS, "ignore_eos": True})
    assert resp.choices[0].text == "Context:\n[1] " + DOCS[0] + "\n[2] " + DOCS[1] + "\n\n" + PROMPT + \
        expected.outputs[0].text
