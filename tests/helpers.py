"""Builders for tests: a locally trained tokenizer and tiny random Llama-family checkpoints."""

from pathlib import Path

import torch

VOCAB_SIZE = 384
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Paris is the capital of France. Berlin is the capital of Germany. ",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Counterpoint serves language models with paged attention and continuous batching. ",
    "Héllo wörld, naïve café — ünïcödé 日本語 テキスト 🙂 emoji. ",
    "one two three four five six seven eight nine ten eleven twelve. ",
]

ARCHS = {
    "llama": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}),
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=1, sliding_window=None),
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}


def train_tokenizer(out: Path, vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>")
    fast.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}" \
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, tokenizer_dir: Path, arch: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """Save a tiny random HF checkpoint of `arch` (with the test tokenizer) to `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = dict(ARCHS[arch])
    model_type = spec.pop("model_type")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    kwargs = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    kwargs.update(spec)
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_eos_likely(model_dir: Path, out: Path, strength: float = 2.0) -> Path:
    """A copy of a (untied) checkpoint whose EOS logit is raised along the mean hidden direction,
    so EOS is often among the top candidates (beam search hypotheses then end early)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    eos = model.generation_config.eos_token_id
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state.reshape(-1, model.config.hidden_size)
        direction = hidden.mean(0) / hidden.mean(0).norm()
        model.lm_head.weight[eos] += strength * direction
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def depart_after(model_dir: Path, out: Path, first: int, num_layers: int | None = None, seed: int = 0) -> Path:
    """A copy of a checkpoint that keeps its first `first` layers bit for bit and perturbs every
    later one and the final norm (as tuning the last layers would), cut to `num_layers` layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if num_layers is not None:
        model.model.layers = model.model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers[first:]:
            for param in layer.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        model.model.norm.weight.add_(0.1 * torch.randn(model.model.norm.weight.shape, generator=generator))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out
