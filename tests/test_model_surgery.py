"""chat-vector, upscale and expand against their formulas on tiny random models; expand's output
equals the source model's, and its training leaves the old blocks bit-identical."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from counterpoint.serving.cli import main

PROMPT = [5, 17, 33, 100, 7, 9, 11]


def tensors(path):
    return load_file(path / "model.safetensors")


def logits(path, ids=PROMPT):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_chat_vector_adds_the_scaled_chat_residual(model_factory, tmp_path):
    base, chat, cpt = (model_factory("llama", seed=s) for s in (0, 1, 2))
    out = tmp_path / "cv"
    main(["train", "chat-vector", "--cpt", str(cpt), "--chat", str(chat), "--base", str(base), str(out),
          "--ratio", "0.5"])
    tb, tc, tp, to = tensors(base), tensors(chat), tensors(cpt), tensors(out)
    assert to.keys() == tp.keys()
    for name in tp:
        torch.testing.assert_close(to[name], tp[name] + 0.5 * (tc[name] - tb[name]))


def test_chat_vector_with_a_grown_vocabulary_needs_skip_embed(model_factory, tmp_path):
    base, chat = model_factory("llama", seed=0), model_factory("llama", seed=1)
    cpt = model_factory("llama", seed=3, vocab_size=400)
    from counterpoint.training.chat_vector import chat_vector

    with pytest.raises(ValueError, match=r"(embed_tokens|lm_head)\.weight: shapes differ.*--skip-embed"):
        chat_vector(cpt, chat, base, tmp_path / "no", show_progress=False)
    args = ["train", "chat-vector", "--cpt", str(cpt), "--chat", str(chat), "--base", str(base)]
    main(args + [str(tmp_path / "cv"), "--skip-embed"])
    tb, tc, tp, to = tensors(base), tensors(chat), tensors(cpt), tensors(tmp_path / "cv")
    assert torch.equal(to["model.embed_tokens.weight"], tp["model.embed_tokens.weight"])
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(to[name], tp[name] + tc[name] - tb[name])


def test_upscale_stacks_two_overlapping_copies(model_factory, tmp_path):
    source = model_factory("llama", num_hidden_layers=3)
    out = tmp_path / "up"
    main(["train", "upscale", str(source), str(out), "--overlap", "1", "--dtype", "float32"])
    src, up = tensors(source), tensors(out)
    for out_layer, src_layer in enumerate([0, 1, 1, 2]):  # [0, n-m) then [m, n): n = 3, m = 1
        name = "self_attn.q_proj.weight"
        assert torch.equal(up[f"model.layers.{out_layer}.{name}"], src[f"model.layers.{src_layer}.{name}"])
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    from counterpoint.training.upscale import upscale

    with pytest.raises(ValueError, match=r"overlap must be in \[1, 2\]"):
        upscale(source, tmp_path / "bad", 3)


def test_expand_keeps_the_output_and_trains_only_the_new_blocks(model_factory, tmp_path):
    source = model_factory("llama", num_hidden_layers=4)
    plain = tmp_path / "expanded"
    main(["train", "expand", str(source), str(plain), "--every", "2"])
    expanded = tensors(plain)
    assert AutoModelForCausalLM.from_pretrained(plain).config.num_hidden_layers == 6  # 0 1 1' 2 3 3'
    for new in (2, 5):
        assert not expanded[f"model.layers.{new}.self_attn.o_proj.weight"].any()
        assert not expanded[f"model.layers.{new}.mlp.down_proj.weight"].any()
    torch.testing.assert_close(logits(plain), logits(source), atol=1e-5, rtol=1e-5)
    texts = [tmp_path / f"text{i}.txt" for i in range(5)]
    for i, text in enumerate(texts):
        text.write_text(f"{i} The quick brown fox jumps over the lazy dog. Paris is the capital of France.\n" * 30)
    trained_dir = tmp_path / "trained"
    main(["train", "expand", str(source), str(trained_dir), "--every", "2", "--train", "--files", *map(str, texts),
          "--steps", "4", "--seq-len", "32", "--batch-size", "2", "--lr", "1e-2"])
    trained = tensors(trained_dir)
    for name, tensor in expanded.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if layer in (2, 5):
            continue
        assert torch.equal(trained[name], tensor), name  # old blocks, embeddings, norms: bit for bit
    name = "model.layers.2.mlp.down_proj.weight"
    assert not torch.equal(trained[name], expanded[name])  # the new blocks did train
    out = LLM(str(trained_dir), show_progress=False).generate(
        [PROMPT], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3
