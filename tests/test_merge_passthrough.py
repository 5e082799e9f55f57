"""`train merge` with passthrough slices: exact tensors and layer count, each output layer equal
to the source layer it came from; the result loads in transformers and in the engine."""

import subprocess
import sys

import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from counterpoint.decoding import SamplingParams
from counterpoint.serving import LLM


def test_passthrough_stacks_the_requested_layers(model_factory, tmp_path):
    source = model_factory("qwen3", num_hidden_layers=3)
    config = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(source), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(source), "layer_range": [1, 3]}]},
    ]}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "counterpoint.serving", "train", "merge", str(tmp_path / "merge.yaml"),
                           str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    src, merged = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    expected_layers = [0, 1, 1, 2]
    layer_names = lambda sd, i: {n.split(".", 3)[3] for n in sd if n.startswith(f"model.layers.{i}.")}  # noqa: E731
    assert {int(n.split(".")[2]) for n in merged if n.startswith("model.layers.")} == {0, 1, 2, 3}
    for out_layer, src_layer in enumerate(expected_layers):
        assert layer_names(merged, out_layer) == layer_names(src, src_layer)
        for suffix in layer_names(src, src_layer):
            assert torch.equal(merged[f"model.layers.{out_layer}.{suffix}"], src[f"model.layers.{src_layer}.{suffix}"])
    outside_layers = lambda names: {n for n in names if not n.startswith("model.layers.")}  # noqa: E731
    assert outside_layers(merged) == outside_layers(src)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert hf.config.num_hidden_layers == 4
    prompt = [5, 17, 33]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None)[0, 3:].tolist()
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    got = LLM(str(out), show_progress=False).generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert got == ref


def test_bad_merge_configs_are_rejected(model_factory):
    import pytest

    from counterpoint.training.merge import MergeConfig

    with pytest.raises(ValueError, match="merge_method must be one of"):
        MergeConfig.from_dict({"merge_method": "magic"})
    with pytest.raises(ValueError, match="layer_range"):
        MergeConfig.from_dict({"merge_method": "passthrough",
                               "slices": [{"sources": [{"model": "x", "layer_range": [3, 1]}]}]})
