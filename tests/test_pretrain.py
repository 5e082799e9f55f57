"""`train pretrain`: validation loss falls clearly; --resume continues exactly where it stopped;
the output loads in transformers and in the engine."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM

ARGS = ["--vocab-size", "512", "--max-corpus-bytes", "400000", "--seq-len", "64", "--eval-every", "50"]


def train(out, *extra):
    proc = subprocess.run([sys.executable, "-m", "counterpoint.serving", "train", "pretrain", str(out), *ARGS, *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_pretrain_lowers_validation_loss_and_loads_everywhere(tmp_path):
    import json

    train(tmp_path / "run", "--steps", "200")
    metrics = json.loads((tmp_path / "run" / "counterpoint.json").read_text())["metrics"]
    assert metrics["val_loss"] < metrics["initial_val_loss"] - 1.0  # perplexity falls by over e (2.7x)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run", dtype=torch.float32)
    prompt = [5, 17, 33]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None)[0, 3:].tolist()
    out = LLM(str(tmp_path / "run"), show_progress=False).generate(
        [prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == ref


def test_resume_continues_from_the_same_step(tmp_path):
    import json

    train(tmp_path / "straight", "--steps", "40", "--save-every", "20")
    train(tmp_path / "resumed", "--steps", "40", "--save-every", "20", "--stop-at", "20")
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 20
    train(tmp_path / "resumed", "--steps", "40", "--save-every", "20", "--resume")
    a = json.loads((tmp_path / "straight" / "counterpoint.json").read_text())["metrics"]
    b = json.loads((tmp_path / "resumed" / "counterpoint.json").read_text())["metrics"]
    assert b["steps"] == 40 and abs(a["val_loss"] - b["val_loss"]) < 1e-4
    wa, wb = (load_file(tmp_path / run / "model.safetensors") for run in ("straight", "resumed"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-4)


def test_perplexity_is_exp_of_the_mean_token_nll(llama_dir, tmp_path):
    import math

    from counterpoint.training.data import pack
    from counterpoint.training.perplexity import perplexity
    from transformers import AutoTokenizer

    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 8 for i in range(40)]
    got = perplexity(llama_dir, texts, seq_len=32, max_rows=16, seed=0)
    _, rows = pack(texts, AutoTokenizer.from_pretrained(llama_dir), 32, 0.2, 0)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    nll, count = 0.0, 0
    for row in rows[:16, :-1]:
        with torch.no_grad():
            logq = torch.log_softmax(model(row[None]).logits[0].float(), -1)
        for pos in range(len(row) - 1):
            nll -= logq[pos, row[pos + 1]].item()
            count += 1
    assert got == pytest.approx(math.exp(nll / count), rel=0.02)  # bf16 autocast where the CPU has it
