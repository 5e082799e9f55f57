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


def test_kv_cache_is_sized_from_what_the_config_can_use_and_logged(llama_dir, caplog):
    """Auto: every sequence at full length (max_num_seqs x max_model_len) unless memory is short;
    a size in GiB is divided by the bytes of one block, from the model's config."""
    import logging

    from transformers import AutoConfig

    with caplog.at_level(logging.INFO, logger="counterpoint"):
        llm = LLM(str(llama_dir), show_progress=False, max_num_seqs=3, max_model_len=40)
    assert llm.engine.main.kv.pool.num_blocks == 3 * 3  # ceil(40 / 16) blocks per sequence
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded "))
    assert "9 KV blocks of 16 tokens" in line and "float32" in line and "capped at max_num_seqs" in line
    cfg = AutoConfig.from_pretrained(llama_dir)
    kv_heads, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    block_bytes = 2 * cfg.num_hidden_layers * kv_heads * head_dim * 16 * 4  # K and V, float32
    llm = LLM(str(llama_dir), show_progress=False, kv_cache_memory_gib=20 * block_bytes / 2**30 + 1e-9)
    assert llm.engine.main.kv.pool.num_blocks == 20


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
