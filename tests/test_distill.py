"""`train distill`: the KL to the teacher falls; a slice-initialised student starts as the
teacher's first layers; the projection is dropped on save; --resume is exact; outputs load."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM

LOOP = ["--max-corpus-bytes", "300000", "--seq-len", "64", "--eval-every", "20", "--save-every", "20"]


def run(*args):
    proc = subprocess.run([sys.executable, "-m", "counterpoint.serving", "train", *args], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    run("pretrain", str(out), "--vocab-size", "512", "--steps", "120", *LOOP)
    return out


def metrics(path):
    return json.loads((path / "counterpoint.json").read_text())["metrics"]


def test_distill_lowers_kl_and_drops_the_projection(teacher, tmp_path):
    out = tmp_path / "student"
    run("distill", str(teacher), str(out), "--steps", "60", "--w-hidden", "0.1", *LOOP)
    m = metrics(out)
    assert m["val_kl"] < 0.7 * m["val_kl_before"]
    assert not any("projection" in name for name in load_file(out / "model.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = hf.generate(torch.tensor([[5, 17, 33]]), max_new_tokens=5, do_sample=False, eos_token_id=None)[0, 3:]
    got = LLM(str(out), show_progress=False).generate(
        [[5, 17, 33]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False)
    assert got[0].outputs[0].token_ids == ref.tolist()


def test_slice_initialised_student_starts_from_the_teacher(teacher, tmp_path):
    out = tmp_path / "sliced"
    run("distill", str(teacher), str(out), "--init-layers", "1", "--steps", "20", *LOOP)
    init, source = load_file(out / "init" / "model.safetensors"), load_file(teacher / "model.safetensors")
    assert {n for n in init if n.startswith("model.layers.")} == {n for n in source if n.startswith("model.layers.0.")}
    for name, tensor in init.items():
        assert torch.equal(tensor, source[name])
    assert metrics(out)["val_kl"] < metrics(out)["val_kl_before"]


def test_distill_resume_is_exact(teacher, tmp_path):
    run("distill", str(teacher), str(tmp_path / "a"), "--steps", "40", *LOOP)
    run("distill", str(teacher), str(tmp_path / "b"), "--steps", "40", "--stop-at", "20", *LOOP)
    run("distill", str(teacher), str(tmp_path / "b"), "--steps", "40", "--resume", *LOOP)
    assert metrics(tmp_path / "b")["steps"] == 40
    assert abs(metrics(tmp_path / "a")["val_kl"] - metrics(tmp_path / "b")["val_kl"]) < 1e-4
    assert metrics(tmp_path / "a")["val_kl_before"] == pytest.approx(metrics(tmp_path / "b")["val_kl_before"])
