"""`train quantize`: GPTQ against a slow reference from the paper and against round-to-nearest,
and the checkpoint it writes served by the engine."""

import json

import pytest
import torch

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from counterpoint.serving.quant.linear import QuantLinear
from counterpoint.training.gptq import Grid, gptq, rtn


def calibration(k: int, n: int, seed: int = 0) -> torch.Tensor:
    """(n, K) inputs with correlated features of very different scales, as activations have."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    scales = torch.logspace(-1, 1, k)[torch.randperm(k, generator=gen)]
    return (torch.randn(n, k, generator=gen) @ mix) * scales


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.double().T @ x.double() / len(x)


def slow_gptq(w, h, bits, group_size, act_order):
    """The paper's OBQ-style update, one column at a time with the explicit inverse Hessian of the
    remaining columns (no Cholesky, no lazy batches)."""
    w = w.double().clone()
    k = w.shape[1]
    top = 2**bits - 1
    h = h.clone() + 0.01 * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    hinv = torch.linalg.inv(h)
    codes = torch.zeros_like(w)
    for position, j in enumerate(order.tolist()):
        if position % group_size == 0:  # scale and zero of the next group_size columns in order
            cols = w[:, order[position : position + group_size]]
            lo, hi = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
            scale = (hi - lo) / top
            zero = torch.round(-lo / scale).clamp(1, top)
        codes[:, j] = torch.clamp(torch.round(w[:, j] / scale) + zero, 0, top)
        error = (w[:, j] - (codes[:, j] - zero) * scale) / hinv[j, j]
        w -= error[:, None] * hinv[j][None, :]
        hinv -= hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return codes


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_the_papers_column_by_column_update(act_order):
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    h = hessian(calibration(64, 512))
    got = gptq(w, h, Grid(4, sym=False, min_zero=1), group_size=16, act_order=act_order)
    ref = slow_gptq(w, h, 4, 16, act_order)
    assert (got.codes != ref.float()).float().mean() < 0.005  # float rounding may flip a tie


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, -1), (8, -1)])
def test_gptq_reconstructs_layer_outputs_better_than_rtn(bits, group_size):
    torch.manual_seed(1)
    w = torch.randn(48, 128) * 0.05
    x = calibration(128, 1024, seed=1)
    grid = Grid(bits, sym=False, min_zero=1)
    err = lambda q: (x @ w.T - x @ q.dequantize().T).norm().item()  # noqa: E731
    gptq_err = err(gptq(w, hessian(x), grid, group_size, act_order=True))
    rtn_err = err(rtn(w, grid, group_size))
    assert gptq_err < 0.8 * rtn_err


@pytest.mark.parametrize("bits,sym", [(4, False), (8, True)])
def test_written_layer_reads_back_as_the_quantized_weight(bits, sym):
    from counterpoint.serving.quant import weight_format
    from counterpoint.training.quantize import gptq_tensors

    torch.manual_seed(2)
    w = torch.randn(32, 64)
    q = gptq(w, hessian(calibration(64, 256)), Grid(bits, sym, min_zero=1), group_size=16, act_order=True)
    fmt = weight_format({"quant_method": "gptq", "bits": bits, "group_size": 16, "desc_act": True, "sym": sym})
    read = fmt.read("layer", gptq_tensors(q, bits))
    expected = (q.codes - q.zeros[q.g_idx].T) * q.scales.half().float()[q.g_idx].T
    torch.testing.assert_close(read.dequantize(), expected, atol=1e-6, rtol=0)


def test_train_quantize_writes_a_checkpoint_the_engine_serves(llama_dir, tmp_path):
    from counterpoint.serving.cli import main

    texts = [tmp_path / f"text{i}.txt" for i in range(6)]  # documents split into calibration and held-out
    for i, text in enumerate(texts):
        text.write_text(f"{i} The quick brown fox jumps over the lazy dog. Paris is the capital of France.\n" * 60)
    out = tmp_path / "gptq"
    main(["train", "quantize", str(llama_dir), str(out), "--method", "gptq", "--bits", "4", "--group-size", "32",
          "--desc-act", "--files", *map(str, texts), "--calibration-rows", "8", "--seq-len", "64", "--eval-rows", "4"])
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"], config["desc_act"]) == ("gptq", 4, 32, True)
    record = json.loads((out / "counterpoint.json").read_text())
    assert record["command"] == "quantize" and record["metrics"]["perplexity_after"] > 0
    llm = LLM(str(out), show_progress=False)
    assert any(isinstance(m, QuantLinear) for m in llm.engine.main.model.modules())
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    out = llm.generate(["The quick brown"], params, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4


def test_train_quantize_bitsandbytes_writes_what_transformers_writes(llama_dir, tmp_path):
    from counterpoint.training.quantize import QuantizeConfig, quantize

    texts = [tmp_path / f"text{i}.txt" for i in range(6)]
    for i, text in enumerate(texts):
        text.write_text(f"{i} The quick brown fox jumps over the lazy dog.\n" * 60)
    out = tmp_path / "nf4"
    metrics = quantize(QuantizeConfig(model=llama_dir, out=out, method="bnb-nf4", files=texts, seq_len=64,
                                      eval_rows=2), show_progress=False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_quant_type"] == "nf4"
    assert metrics["perplexity_after"] > 0
    llm = LLM(str(out), show_progress=False)
    assert {m.kind for m in llm.engine.main.model.modules() if isinstance(m, QuantLinear)} == {"bitsandbytes nf4"}
