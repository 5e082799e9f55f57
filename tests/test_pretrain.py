"""`train pretrain`: validation loss falls clearly; --resume continues exactly where it stopped;
the output loads in transformers and in the engine."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from counterpoint.training import pretrain as pretrain_module
from counterpoint.training.cli import add_train_parser, run_train

pytestmark = pytest.mark.usefixtures("one_thread")

# Sized for a loaded 2-core CI runner: 32-token rows of 8 from ~100 kB of the default corpus. With a
# 288-token vocabulary (30 merges) 40 steps reach about the unigram level, ~1.2 nats below the start.
ARGS = ["--vocab-size", "288", "--max-corpus-bytes", "100000", "--seq-len", "32", "--batch-size", "8",
        "--warmup", "10"]


def train_cli(out, *extra):
    """Through the command users run, in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-m", "counterpoint.serving", "train", "pretrain", str(out), *ARGS, *extra],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def train(out, *extra):
    """The same flags parsed by the same parser, in this process (no interpreter and import start-up)."""
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    run_train(parser.parse_args(["train", "pretrain", str(out), *ARGS, *extra]))


def metrics(path):
    return json.loads((path / "counterpoint.json").read_text())["metrics"]


def test_pretrain_lowers_validation_loss_and_loads_everywhere(tmp_path):
    assert "val loss" in train_cli(tmp_path / "run", "--steps", "40")
    m = metrics(tmp_path / "run")
    assert m["val_loss"] < m["initial_val_loss"] - 1.0  # perplexity falls by over e (2.7x)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run", dtype=torch.float32)
    prompt = [5, 17, 33]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None)[0, 3:].tolist()
    out = LLM(str(tmp_path / "run"), show_progress=False).generate(
        [prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == ref


def test_resume_continues_from_the_same_step(tmp_path, monkeypatch):
    # Warm-up ends at step 2, so the resumed half runs on the cosine part of the schedule.
    schedule = ["--steps", "8", "--save-every", "4", "--warmup", "2"]
    train(tmp_path / "straight", *schedule)
    train(tmp_path / "resumed", *schedule, "--stop-at", "4")
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 4
    steps_run = count_training_steps(monkeypatch)
    train(tmp_path / "resumed", *schedule, "--resume")
    assert len(steps_run) == 4  # continued from step 4; starting over would also end equal, in 8 steps
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert b["steps"] == 8 and abs(a["val_loss"] - b["val_loss"]) < 1e-4
    wa, wb = (load_file(tmp_path / run / "model.safetensors") for run in ("straight", "resumed"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-4)


def count_training_steps(monkeypatch) -> list:
    """One entry per training step from now on (evaluation does not go through lm_loss)."""
    steps, loss = [], pretrain_module.lm_loss

    def counted(model, batch):
        steps.append(1)
        return loss(model, batch)

    monkeypatch.setattr(pretrain_module, "lm_loss", counted)
    return steps


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
