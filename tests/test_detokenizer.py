"""Incremental detokenization never emits broken UTF-8 and ends equal to a full decode; stop
strings are trimmed and may span tokens."""

import pytest
from transformers import AutoTokenizer

from counterpoint.decoding import SamplingParams
from counterpoint.serving.engine.detokenizer import IncrementalDetokenizer, find_stop

TEXTS = ["Héllo wörld, naïve café — ünïcödé 日本語 テキスト 🙂 emoji.", "def add(a, b):\n    return a + b\n",
         "   spaced   out  "]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_equals_full_decode_without_broken_characters(tokenizer_dir, text):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompt = tok.encode("Paris is")
    ids = tok.encode(text)
    detok = IncrementalDetokenizer.for_prompt(tok, prompt, skip_special_tokens=True)
    pieces = [detok.add(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == tok.decode(ids)
    # Bytes of a multi-byte character arrive over several tokens: some steps emit nothing.
    assert any(p == "" for p in pieces) or all(ord(c) < 128 for c in text)


def test_find_stop_spans_tokens_and_picks_the_earliest():
    assert find_stop("abc STOP", 3, ["STOP"]) == (4, "STOP")
    assert find_stop("abc STOP and more", 3, ["STOP"]) is None  # ended before the new text
    assert find_stop("xx##yy!!", 4, ["!!", "##yy"]) == (2, "##yy")


def test_stop_strings_are_trimmed(llama_dir):
    from counterpoint.serving import LLM

    llm = LLM(str(llama_dir), show_progress=False)
    base = llm.generate([[5, 17, 33]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    stop = base.text[5:8]
    assert len(stop) == 3
    cut = base.text.index(stop)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    out = llm.generate([[5, 17, 33]], params, use_tqdm=False)[0].outputs[0]
    assert out.text == base.text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=stop, include_stop_str_in_output=True)
    out = llm.generate([[5, 17, 33]], params, use_tqdm=False)[0].outputs[0]
    assert out.text == base.text[: cut + 3]
