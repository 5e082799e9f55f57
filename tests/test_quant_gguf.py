"""GGUF files served directly: Q4_0/Q4_1/Q8_0 linear layers as 4-/8-bit weights, against
transformers' own gguf_file= loader (which dequantizes them)."""

import pytest
import torch
from gguf import GGMLQuantizationType
from transformers import AutoModelForCausalLM

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from counterpoint.serving.quant import matmul
from counterpoint.serving.quant.linear import QuantLinear
from gguf_writer import write_gguf

PROMPT = [5, 17, 33, 100, 7, 9, 11]
Q = GGMLQuantizationType


@pytest.mark.parametrize("qtype,kind", [(Q.Q4_0, "int4"), (Q.Q4_1, "int4"), (Q.Q8_0, "dequantized"),
                                        (Q.F16, None)])
def test_gguf_served_directly_matches_transformers_gguf_loader(model_factory, tmp_path, monkeypatch, qtype, kind):
    monkeypatch.setattr(matmul, "KERNEL_DTYPES", (torch.float32, torch.bfloat16))
    source = model_factory("llama", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    gguf_file = write_gguf(source, tmp_path / "tiny.gguf", qtype)
    llm = LLM(str(gguf_file), dtype="float32", show_progress=False)
    kinds = {m.kind.split(" ")[0] for m in llm.engine.main.model.modules() if isinstance(m, QuantLinear)}
    assert kinds == ({kind} if kind else set())
    ref = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    expected = ref.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False,
                            eos_token_id=None)[0, len(PROMPT):].tolist()
    assert out.token_ids == expected
    with torch.no_grad():
        logq = torch.log_softmax(ref(torch.tensor([PROMPT + expected])).logits[0], -1)[len(PROMPT) - 1:-1]
    got = torch.tensor([lp[t].logprob for lp, t in zip(out.logprobs, expected)])
    torch.testing.assert_close(got, logq.gather(1, torch.tensor(expected)[:, None]).squeeze(1), atol=1e-4, rtol=0)
