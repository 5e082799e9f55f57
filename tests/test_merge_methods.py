"""Every tensor-by-tensor merge method against a slow formula written here from its paper (and
mergekit's conventions), on tiny random models; gradients and filters; laziness; errors."""

import math
import weakref
from functools import partial

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from counterpoint.training.merge import MergeConfig, run_merge
from counterpoint.training.merge.base import LazyModel
from counterpoint.training.merge.task_arithmetic import combine_deltas


@pytest.fixture(scope="module")
def models(model_factory):
    """A base and two fine-tunes of it: the base plus small random task vectors."""
    return [model_factory("llama", seed=s) for s in (0, 1, 2)]


def tensors(path):
    return load_file(path / "model.safetensors")


def merge(tmp_path, config: dict):
    return tensors(run_merge(MergeConfig.from_dict({"dtype": "float32", **config}), tmp_path / "out",
                             show_progress=False))


def t_of(name: str, num_layers: int = 2) -> float:
    """Gradient position, from mergekit's convention: layers evenly in [0, 1], embeddings 0, the rest 1."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) / (num_layers - 1)
    return 0.0 if "embed" in name else 1.0


def gradient(values, t):
    x = t * (len(values) - 1)
    i = min(int(x), len(values) - 1)
    j = min(i + 1, len(values) - 1)
    return values[i] * (1 - (x - i)) + values[j] * (x - i)


def test_linear_with_gradient_and_filtered_weights(models, tmp_path):
    a, b = models[1], models[2]
    out = merge(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": [1.0, 0.25]}},
        {"model": str(b), "parameters": {"weight": [{"filter": "mlp", "value": 3.0}, {"value": 1.0}]}}]})
    ta, tb = tensors(a), tensors(b)
    for name, got in out.items():
        wa = gradient([1.0, 0.25], t_of(name))
        wb = 3.0 if "mlp" in name else 1.0
        torch.testing.assert_close(got, (wa * ta[name] + wb * tb[name]) / (wa + wb))


def test_slerp_follows_the_arc_and_falls_back_to_lerp(models, tmp_path, model_factory):
    base, other = models[0], models[1]
    out = merge(tmp_path, {"merge_method": "slerp", "base_model": str(base), "models": [str(base), str(other)],
                           "parameters": {"t": [0.0, 0.3, 1.0]}})
    t0, t1 = tensors(base), tensors(other)
    for name, got in out.items():
        t = gradient([0.0, 0.3, 1.0], t_of(name))
        v0, v1 = t0[name].double(), t1[name].double()
        cos = (v0.flatten() @ v1.flatten() / (v0.norm() * v1.norm())).item()
        if abs(cos) > 0.9995:
            expected = (1 - t) * v0 + t * v1
        else:
            omega = math.acos(cos)
            expected = (math.sin((1 - t) * omega) * v0 + math.sin(t * omega) * v1) / math.sin(omega)
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    norms = [n for n in out if "norm" in n]  # all-ones norms are parallel: the lerp branch ran
    assert norms and all(torch.equal(t0[n], t1[n]) for n in norms)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: the int(density · n) largest-magnitude entries kept, the rest 0."""
    flat = delta.flatten()
    keep = flat.abs().argsort(descending=True)[: int(density * flat.numel())]
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(delta)


def test_ties_trims_elects_signs_and_takes_the_disjoint_mean(models, tmp_path):
    base, a, b = models
    out = merge(tmp_path, {"merge_method": "ties", "base_model": str(base), "parameters": {"lambda": 0.8},
                           "models": [{"model": str(a), "parameters": {"weight": 1.0, "density": 0.5}},
                                      {"model": str(b), "parameters": {"weight": 0.5, "density": 0.3}}]})
    tb, ta, tt = tensors(base), tensors(a), tensors(b)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.norm.weight"):
        trimmed = [trim(ta[name] - tb[name], 0.5), trim(tt[name] - tb[name], 0.3)]
        torch.testing.assert_close(out[name], ties_from_trimmed(tb[name], trimmed, [1.0, 0.5], 0.8),
                                   atol=1e-5, rtol=0)


def ties_from_trimmed(base, trimmed, weights, lam):
    out = torch.zeros(base.numel())
    flat = [t.flatten() for t in trimmed]
    for i in range(base.numel()):
        weighted = [w * f[i].item() for w, f in zip(weights, flat)]
        s = sum(weighted)
        sign = 0 if s == 0 else math.copysign(1, s)
        agree = [j for j, v in enumerate(weighted) if v != 0 and math.copysign(1, v) == sign]
        divisor = sum(weights[j] for j in agree)
        out[i] = sum(weighted[j] for j in agree) / (divisor if abs(divisor) >= 1e-8 else 1.0)
    return base + lam * out.view_as(base)


def test_task_arithmetic_and_dare(models, tmp_path):
    base, a, b = models
    tb, ta, tt = tensors(base), tensors(a), tensors(b)
    entries = [{"model": str(a), "parameters": {"weight": 0.7}}, {"model": str(b), "parameters": {"weight": 0.4}}]
    plain = merge(tmp_path / "ta", {"merge_method": "task_arithmetic", "base_model": str(base), "models": entries,
                                    "parameters": {"lambda": 1.5}})
    for name, got in plain.items():
        torch.testing.assert_close(got, tb[name] + 1.5 * (0.7 * (ta[name] - tb[name]) + 0.4 * (tt[name] - tb[name])))
    # DARE with one model: every entry is dropped (the base) or kept and rescaled by 1/density
    one = {"merge_method": "dare_linear", "base_model": str(base), "seed": 3,
           "models": [{"model": str(a), "parameters": {"weight": 1.0, "density": 0.4}}]}
    dare = merge(tmp_path / "dare", one)
    assert dare.keys() == merge(tmp_path / "dare-again", one).keys()
    name = "model.layers.0.mlp.gate_proj.weight"
    delta, got = ta[name] - tb[name], dare[name] - tb[name]
    kept = got.abs() > 1e-7
    torch.testing.assert_close(got[kept], delta[kept] / 0.4)
    assert 0.3 < kept.float().mean() < 0.5
    assert torch.equal(dare[name], merge(tmp_path / "dare-again2", one)[name])  # the seed fixes the masks
    # dare_ties at density 1: no drop, TIES's sign election, no normalisation (mergekit's default)
    full = merge(tmp_path / "dt", {"merge_method": "dare_ties", "base_model": str(base), "models": entries})
    trimmed = [ta[name] - tb[name], tt[name] - tb[name]]
    weighted = torch.stack([0.7 * trimmed[0], 0.4 * trimmed[1]])
    agree = weighted.sign() == weighted.sum(0).sign()
    torch.testing.assert_close(full[name], tb[name] + (weighted * agree).sum(0))


def test_merge_reads_lazily_and_writes_shards_as_it_goes(models, tmp_path, monkeypatch):
    """At any time at most two tensors per input model are alive (this name's, and the last
    one's until it is replaced), and every shard is written before the next tensor is read."""
    live, peak = [0], [0]
    get = LazyModel.get

    def tracked(self, name):
        tensor = get(self, name)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(tensor, lambda: live.__setitem__(0, live[0] - 1))
        return tensor

    monkeypatch.setattr(LazyModel, "get", tracked)
    from counterpoint.training.merge import tensorwise

    sizes = []
    save = tensorwise.save_file
    monkeypatch.setattr(tensorwise, "save_file", lambda t, path, metadata: (sizes.append(
        sum(x.numel() * x.element_size() for x in t.values())), save(t, path, metadata=metadata)))
    config = MergeConfig.from_dict({"merge_method": "ties", "base_model": str(models[0]), "dtype": "float32",
                                    "models": [{"model": str(m), "parameters": {"density": 0.5}} for m in models[1:]]})
    method = partial(combine_deltas, variant="ties", seed=0)
    out = tensorwise.merge_tensorwise(config, tmp_path / "out", method, needs_base=True, show_progress=False,
                                      shard_bytes=64 * 1024)
    assert peak[0] <= 2 * 3
    largest = max(t.numel() * t.element_size() for t in tensors(models[0]).values())
    assert len(sizes) > 1 and max(sizes) <= 64 * 1024 + largest
    assert (out / "model.safetensors.index.json").is_file()
    AutoModelForCausalLM.from_pretrained(out)  # the shards and index load


def test_merged_model_loads_in_transformers_and_generates(models, tmp_path, capsys):
    from counterpoint.serving.cli import main

    config = {"merge_method": "ties", "base_model": str(models[0]), "dtype": "float32", "out_dtype": "bfloat16",
              "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.7}} for m in models[1:]]}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "merged"
    main(["train", "merge", str(tmp_path / "merge.yaml"), str(out)])
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    capsys.readouterr()
    main(["generate", "--model", str(out), "--prompt", "The quick", "--max-tokens", "4", "--temperature", "0"])
    assert capsys.readouterr().out.strip()


def test_mismatched_shapes_name_the_tensor(model_factory, models, tmp_path):
    other = model_factory("llama", seed=5, vocab_size=400)
    with pytest.raises(ValueError, match=r"(lm_head|model\.embed_tokens)\.weight: .* has shape \(400, 64\)"):
        merge(tmp_path, {"merge_method": "linear", "models": [str(models[1]), str(other)]})
    with pytest.raises(ValueError, match="ties needs base_model"):
        merge(tmp_path, {"merge_method": "ties", "models": [str(models[1])]})
