"""bitsandbytes: checkpoints transformers writes (nf4/fp4, double quant, int8) and quantize-on-load,
against transformers' own bitsandbytes models on the same weights."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from counterpoint.serving.quant import matmul
from counterpoint.serving.quant.linear import QuantLinear

PROMPT = [5, 17, 33, 100, 7, 9, 11]
CONFIGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


def bnb_model(model_dir, name):
    config = BitsAndBytesConfig(**CONFIGS[name], bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, device_map="cpu",
                                                dtype=torch.float32)


def engine_logprobs(llm, tokens):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=len(tokens), temperature=0, ignore_eos=True, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    return out.token_ids, torch.tensor([lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)])


def reference_logprobs(model, tokens):
    with torch.no_grad():
        logq = torch.log_softmax(model(torch.tensor([PROMPT + tokens])).logits[0].float(), -1)[len(PROMPT) - 1:-1]
    return logq.gather(1, torch.tensor(tokens)[:, None]).squeeze(1)


def dequantized(model):
    """transformers' bitsandbytes model with every quantized weight replaced by its float32 value:
    CB·SCB/127 for int8, bitsandbytes' own `dequantize_4bit` for 4-bit.

    NOTE: the reference runs these weights in float because bitsandbytes' own layers are not exact
    matmuls of them: LLM.int8 also quantizes activations, and on CPUs with AVX-512 bf16 Linear4bit
    repacks its weight into a CPU format whose products were off by up to 2e-3 (measured on one
    64x64 layer), where `matmul_4bit` on the stored weight, as the engine runs it, is off by 1e-7."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, bnb.nn.Linear8bitLt):
                weight = child.weight.data.float() * child.weight.SCB.float()[:, None] / 127
            elif isinstance(child, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
            else:
                continue
            linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            linear.weight.data = weight
            if child.bias is not None:
                linear.bias.data = child.bias.data.float()
            setattr(parent, name, linear)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_checkpoint_written_by_transformers_gives_its_logits(model_factory, tmp_path, monkeypatch, name):
    monkeypatch.setattr(matmul, "KERNEL_DTYPES", (torch.float32, torch.bfloat16))
    model_dir = model_factory("llama")
    saved = tmp_path / name
    bnb_model(model_dir, name).save_pretrained(saved)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(saved)
    llm = LLM(str(saved), dtype="float32", show_progress=False)
    kinds = {m.kind for m in llm.engine.main.model.modules() if isinstance(m, QuantLinear)}
    assert kinds == {"int8 (torch CPU kernel)" if name == "int8" else f"bitsandbytes {name[:3]}" +
                     (" (double quant)" if "double" in name else "")}
    tokens, got = engine_logprobs(llm, list(range(12)))
    reference = dequantized(bnb_model(model_dir, name))
    torch.testing.assert_close(got, reference_logprobs(reference, tokens), atol=1e-3, rtol=0)


@pytest.mark.parametrize("method,name", [("bnb-nf4", "nf4"), ("bnb-int8", "int8")])
def test_quantize_on_load_matches_transformers_quantizing_the_same_checkpoint(model_factory, monkeypatch, method,
                                                                              name):
    monkeypatch.setattr(matmul, "KERNEL_DTYPES", (torch.float32, torch.bfloat16))
    model_dir = model_factory("qwen2")
    llm = LLM(str(model_dir), dtype="float32", quantization=method, show_progress=False)
    assert sum(isinstance(m, QuantLinear) for m in llm.engine.main.model.modules()) == 4 * 2
    tokens, got = engine_logprobs(llm, list(range(12)))
    reference = dequantized(bnb_model(model_dir, name))
    torch.testing.assert_close(got, reference_logprobs(reference, tokens), atol=1e-3, rtol=0)


def test_quantization_flag_errors(model_factory, tmp_path):
    from gptq_writer import write_gptq

    with pytest.raises(ValueError, match="quantization must be one of none, gguf, bnb-nf4, bnb-int8"):
        LLM(str(model_factory("llama")), quantization="awq", show_progress=False)
    with pytest.raises(ValueError, match="quantization 'gguf' serves .gguf files"):
        LLM(str(model_factory("llama")), quantization="gguf", show_progress=False)
    gptq = write_gptq(model_factory("llama"), tmp_path / "gptq", tmp_path / "dequant")
    with pytest.raises(ValueError, match=r"already quantized \(gptq 4-bit"):
        LLM(str(gptq), quantization="bnb-nf4", show_progress=False)
