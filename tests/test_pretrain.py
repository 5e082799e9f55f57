"""`train pretrain`: validation loss falls clearly; --resume continues exactly where it stopped;
the output loads in transformers and in the engine."""

import subprocess
import sys

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
    wa, wb = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-4)
