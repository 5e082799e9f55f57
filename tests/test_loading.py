"""Checkpoint loading: sharded safetensors, dtypes, clear errors; and the wheel's package layout."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from helpers import build_model
from test_greedy_vs_transformers import PROMPTS, hf_greedy

REPO = Path(__file__).resolve().parents[1]


def test_sharded_checkpoint_loads(tmp_path, llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((llama_dir / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file()
    llm = LLM(str(sharded), show_progress=False)
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(llama_dir, PROMPTS[0], 10)


def test_float16_runs_and_auto_upcasts_on_cpu(tmp_path, tokenizer_dir):
    model_dir = build_model(tmp_path / "fp16", tokenizer_dir, "qwen2", dtype=torch.float16)
    auto = LLM(str(model_dir), show_progress=False)
    assert auto.engine.main.model.embed_tokens.weight.dtype == torch.float32
    half = LLM(str(model_dir), show_progress=False, dtype="float16")
    assert half.engine.main.model.embed_tokens.weight.dtype == torch.float16
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert len(half.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0].token_ids) == 6


def test_unsupported_architecture_names_the_supported_ones(tmp_path, tokenizer_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=384)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        LLM(str(tmp_path), show_progress=False)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        LLM(str(tmp_path / "nothing"), show_progress=False)


def test_wheel_contains_every_subpackage_under_counterpoint(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("counterpoint-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"counterpoint"}
    # Every package of the source tree, found on disk, so a package missing from pyproject fails here.
    packages = [p.parent.relative_to(REPO).as_posix() for folder in ("serving", "decoding", "kernels", "training")
                for p in (REPO / folder).rglob("__init__.py")]
    assert len(packages) >= 9
    for pkg in packages:
        assert f"counterpoint/{pkg}/__init__.py" in names
    assert not any(n.startswith("counterpoint/tests/") for n in names)
