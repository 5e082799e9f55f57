"""GPTQ checkpoints: every layout against the format's definition, and a quantized tiny model
against transformers on the same dequantized weights."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from counterpoint.serving.quant import matmul, weight_format
from counterpoint.serving.quant.linear import QuantLinear
from gptq_writer import quantize_layer, write_gptq

LAYOUTS = [  # bits, group_size, sym, act-order, checkpoint format
    (4, 32, True, False, "gptq"),
    (4, 64, False, True, "gptq"),
    (4, 128, False, False, "gptq_v2"),
    (4, -1, True, False, "gptq"),
    (4, 32, True, True, "gptq_v2"),
    (8, -1, True, False, "gptq"),
    (8, -1, False, False, "gptq_v2"),
    (8, 32, True, True, "gptq"),
]


def read_layer(w, bits, group_size, sym, act_order, checkpoint_format, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tensors, dequant = quantize_layer(w, bits, group_size, sym, act_order, checkpoint_format, gen)
    fmt = weight_format({"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym,
                         "desc_act": act_order, "checkpoint_format": checkpoint_format})
    return fmt.read("layer", tensors), dequant


@pytest.mark.parametrize("bits,group_size,sym,act_order,checkpoint_format", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_equals_dequantized_matmul(bits, group_size, sym, act_order, checkpoint_format, dtype,
                                                monkeypatch):
    # float32 runs the int kernels too (they are only slow with it): the kernels are what is tested
    monkeypatch.setattr(matmul, "KERNEL_DTYPES", (torch.float32, torch.bfloat16))
    torch.manual_seed(0)
    k = 320  # groups of 128 and 64 leave a shorter last group, as on SmolLM2's 576 inputs
    w = torch.randn(96, k)
    weight, dequant = read_layer(w, bits, group_size, sym, act_order, checkpoint_format)
    torch.testing.assert_close(weight.dequantize(), dequant, atol=1e-5, rtol=0)
    layer = QuantLinear(k, 96, bias=False)
    kind = layer.install([weight], dtype, torch.device("cpu"))
    assert "dequantized" not in kind or (bits == 8 and group_size != -1)
    x = torch.randn(5, k)
    ref = x @ dequant.T
    got = layer(x.to(dtype)).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (got - ref).abs().max() <= tol * ref.abs().max()


def test_stacked_parts_with_different_act_order_run_apart():
    torch.manual_seed(1)
    parts = [read_layer(torch.randn(32, 64), 4, 32, True, True, "gptq", seed=s) for s in (0, 1)]
    layer = QuantLinear(64, 64, bias=True)
    layer.bias.data = torch.randn(64)
    layer.install([p[0] for p in parts], torch.float32, torch.device("cpu"))
    assert len(layer.parts) == 2
    x = torch.randn(3, 64)
    ref = x @ torch.cat([p[1] for p in parts]).T + layer.bias
    torch.testing.assert_close(layer(x), ref, atol=1e-4, rtol=0)


def greedy_hf(model_dir, prompt, n):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch,bits,desc_act", [("llama", 4, True), ("qwen2", 8, False)])
def test_gptq_model_matches_transformers_on_dequantized_weights(model_factory, tmp_path, monkeypatch, arch,
                                                                bits, desc_act):
    monkeypatch.setattr(matmul, "KERNEL_DTYPES", (torch.float32, torch.bfloat16))
    out = write_gptq(model_factory(arch), tmp_path / "gptq", tmp_path / "dequant", bits=bits,
                     group_size=32 if bits == 4 else -1, desc_act=desc_act, sym=bits == 8)
    prompt = [5, 17, 33, 100, 7, 9, 11]
    llm = LLM(str(out), dtype="float32", show_progress=False)
    kinds = {m.kind for m in llm.engine.main.model.modules() if isinstance(m, QuantLinear)}
    assert kinds == {f"int{bits} (torch CPU kernel)"}
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert got == greedy_hf(tmp_path / "dequant", prompt, 16)


def test_gptq_model_through_the_triton_kernel_matches_transformers(model_factory, tmp_path):
    out = write_gptq(model_factory("llama"), tmp_path / "gptq", tmp_path / "dequant", bits=4, group_size=32,
                     desc_act=True)
    prompt = [5, 17, 33, 100, 7, 9, 11]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs Triton's interpreter
    llm = LLM(str(out), dtype="float32", device=device, attention_backend="triton", block_size=8,
              show_progress=False)
    kinds = {m.kind for m in llm.engine.main.model.modules() if isinstance(m, QuantLinear)}
    assert kinds == {"Triton int matmul"}
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert got == greedy_hf(tmp_path / "dequant", prompt, 5)


def test_gptq_bfloat16_logprobs_close_to_transformers(model_factory, tmp_path):
    out = write_gptq(model_factory("llama"), tmp_path / "gptq", tmp_path / "dequant", bits=4, group_size=64)
    llm = LLM(str(out), show_progress=False)  # auto: bfloat16 on the CPU for quantized checkpoints
    assert llm.engine.main.model.embed_tokens.weight.dtype == torch.bfloat16
    prompt = [5, 17, 33, 100, 7, 9, 11]
    res = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dequant", dtype=torch.float32)
    with torch.no_grad():
        logq = torch.log_softmax(model(torch.tensor([prompt + res.token_ids])).logits[0], -1)[len(prompt) - 1:-1]
    ref = logq.gather(1, torch.tensor(res.token_ids)[:, None]).squeeze(1)
    got = torch.tensor([lp[t].logprob for lp, t in zip(res.logprobs, res.token_ids)])
    torch.testing.assert_close(got, ref, atol=0.1, rtol=0)


def test_unsupported_gptq_settings_name_what_is_supported(model_factory, tmp_path):
    with pytest.raises(ValueError, match="bits 3 .* supported: 4, 8"):
        weight_format({"quant_method": "gptq", "bits": 3})
    with pytest.raises(ValueError, match="quant_method 'awq' .* supported: .*gptq"):
        weight_format({"quant_method": "awq"})
    out = write_gptq(model_factory("llama"), tmp_path / "gptq", tmp_path / "dequant", bits=4, group_size=32)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["bits"] = 8  # the tensors hold 4-bit codes
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.[\w.]+_proj: qweight"):
        LLM(str(out), show_progress=False)
