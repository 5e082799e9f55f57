"""Model size presets for pretrain and distill (Llama dimensions; the vocabulary comes from the
tokenizer). Kept apart from the training code so the CLI can list them without importing torch."""

PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4),
    # The synthetic world's reader (training/world.py): four layers, since copying a name out of a
    # passage takes an induction circuit, and narrow, since the recipe has minutes on one core.
    "world": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
    "base": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8,
                 num_key_value_heads=4),
}
