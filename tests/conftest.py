"""Shared fixtures: a locally trained tokenizer and tiny random Llama-family checkpoints."""

import os
from pathlib import Path

import pytest
import torch

# NOTE: must precede the first `import triton`: without CUDA, kernels run in Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import build_model, train_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    """Everything the suite builds once (the bundled models, GGUF metadata) goes to a cache of its
    own, shared by the session, never the user's."""
    cache = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("COUNTERPOINT_CACHE")
    os.environ["COUNTERPOINT_CACHE"] = str(cache)
    yield cache
    if previous is None:
        del os.environ["COUNTERPOINT_CACHE"]
    else:
        os.environ["COUNTERPOINT_CACHE"] = previous


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory, tokenizer_dir):
    cache = {}

    def make(arch: str = "llama", **overrides) -> Path:
        key = (arch, repr(sorted(overrides.items(), key=str)))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"model-{arch}")
            cache[key] = build_model(out, tokenizer_dir, arch, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llama_dir(model_factory) -> Path:
    return model_factory("llama")


@pytest.fixture(scope="session")
def amateur_dir(model_factory) -> Path:
    """An amateur for llama_dir: same tokenizer, one layer, embedding table padded to 400 rows."""
    return model_factory("llama", seed=1, num_hidden_layers=1, vocab_size=400)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module: tiny models gain nothing from a second one, and on a
    busy 2-core machine OpenMP's barriers between two threads make each step many times slower
    (measured at load 4: a tiny training step 1.9 s with two threads, 0.05 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
