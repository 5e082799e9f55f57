"""LoRA: the adapter loads in peft and gives our merged model's logits, the merge is W + (α/r)·B·A,
chat data trains on assistant turns only, and intruder dimensions are counted as defined."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM
from counterpoint.serving.cli import main
from counterpoint.training.chat_data import IGNORE, assistant_labels
from counterpoint.training.intruders import intruder_dimensions

PROMPT = [5, 17, 33, 100, 7, 9, 11]


def texts(tmp_path):
    files = [tmp_path / f"text{i}.txt" for i in range(5)]
    for i, f in enumerate(files):
        f.write_text(f"{i} The quick brown fox jumps over the lazy dog. Paris is the capital of France.\n" * 30)
    return [str(f) for f in files]


def test_lora_adapter_loads_in_peft_and_merges_as_w_plus_scaled_ba(llama_dir, tmp_path):
    from peft import PeftModel

    out = tmp_path / "lora"
    main(["train", "lora", str(llama_dir), str(out), "--files", *texts(tmp_path), "--rank", "4", "--alpha", "8",
          "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--lr", "1e-2", "--warmup", "1", "--merge"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    adapter = load_file(out / "adapter_model.safetensors")
    base, merged = load_file(llama_dir / "model.safetensors"), load_file(out / "merged" / "model.safetensors")
    name = "model.layers.1.self_attn.v_proj"
    a, b = adapter[f"base_model.model.{name}.lora_A.weight"], adapter[f"base_model.model.{name}.lora_B.weight"]
    assert b.abs().max() > 0  # trained: B starts at zero
    torch.testing.assert_close(merged[f"{name}.weight"], base[f"{name}.weight"] + (8 / 4) * b @ a)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32), out)
    ours = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    with torch.no_grad():
        ids = torch.tensor([PROMPT])
        torch.testing.assert_close(ours(ids).logits, peft_model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    record = json.loads((out / "counterpoint.json").read_text())
    assert record["metrics"]["matrices"] == 2 * 7 and record["metrics"]["intruder_dimensions"] >= 0
    served = LLM(str(out / "merged"), show_progress=False).generate(
        [PROMPT], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert len(served.outputs[0].token_ids) == 3


def test_chat_labels_keep_only_the_assistant_turns(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And Germany?"}, {"role": "assistant", "content": "Berlin."}]
    ids, labels = assistant_labels(messages, tokenizer)
    assert len(ids) == len(labels)
    assert ids == tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    kept = [t for t, label in zip(ids, labels) if label != IGNORE]
    assert all(label in (IGNORE, t) for t, label in zip(ids, labels))
    # the test template closes each message with a newline, which belongs to the assistant's turn
    assert tokenizer.decode(kept) == "Paris.\nBerlin.\n"


def test_lora_on_chat_data_and_a_full_fine_tune(llama_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    common = ["--chat-data", str(data), "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--warmup", "1"]
    main(["train", "lora", str(llama_dir), str(tmp_path / "lora"), *common])
    main(["train", "lora", str(llama_dir), str(tmp_path / "full"), "--full", *common])
    for name in ("lora", "full"):
        metrics = json.loads((tmp_path / name / "counterpoint.json").read_text())["metrics"]
        assert metrics["steps"] == 3 and metrics["val_loss"] > 0
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "full").config.num_hidden_layers == 2


def test_intruder_dimensions_count_new_directions_only():
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))
    base = u @ torch.diag(torch.linspace(10, 1, 64, dtype=torch.float64)) @ v.T  # full rank, distinct values
    assert intruder_dimensions(base, 2 * base) == 0  # a rescale keeps every direction
    assert intruder_dimensions(base, base + 0.01 * torch.randn(64, 64, generator=gen, dtype=torch.float64)) == 0
    new = torch.randn(64, 1, generator=gen, dtype=torch.float64)
    new = new / new.norm()
    assert (u.T @ new).abs().max() < 0.5  # a random direction is far from every one of the base's
    tuned = base + 30 * new @ v[:, :1].T  # a strong rank-1 update along it, as LoRA makes
    assert intruder_dimensions(base, tuned, top_k=10, threshold=0.5) == 1
