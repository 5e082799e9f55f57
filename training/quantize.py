"""`quantize`: a GPTQ or round-to-nearest checkpoint in the `gptq` (v1) layout that `serve` loads.

GPTQ runs layer by layer on calibration text (by default the standard library's source files):
the first decoder layer's inputs are captured once, then each layer is run to collect the inputs
of its linear layers, quantized, and run again with its quantized weights to make the next
layer's inputs, so every layer sees the errors of the ones before it. q/k/v share one input and
so one Hessian, as do gate/up. Perplexity is measured before and after on held-out rows of the
same text.
"""

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from counterpoint.serving.quant.gptq import pack_int32
from counterpoint.training.checkpoint import save_tensors, write_provenance
from counterpoint.training.data import default_corpus, pack, read_texts
from counterpoint.training.gptq import Grid, Quantized, gptq, rtn
from counterpoint.training.perplexity import MAX_CORPUS_BYTES, VAL_FRACTION

METHODS = ("gptq", "rtn", "bnb-nf4", "bnb-int8")
# input-sharing groups of each decoder layer's linear layers, in the order the layer runs them
LINEAR_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                 ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


@dataclass(frozen=True)
class QuantizeConfig:
    model: Path
    out: Path
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = False
    files: list[Path] = field(default_factory=list)
    calibration_rows: int = 64
    seq_len: int = 512
    eval_rows: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8; got {self.bits}")
        if self.method.startswith("bnb") and (self.desc_act or self.sym):
            raise ValueError("desc_act and sym are GPTQ / RTN options; bitsandbytes has its own grid")
        if self.desc_act and self.method != "gptq":
            raise ValueError("desc_act (act-order) is a GPTQ option; rtn has no column order")


class StopForward(Exception):
    pass


def quantize(cfg: QuantizeConfig, show_progress: bool = True) -> dict:
    """Write the quantized checkpoint to cfg.out; returns perplexities before and after."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).eval().requires_grad_(False)
    texts = read_texts(cfg.files or default_corpus(), MAX_CORPUS_BYTES)
    train_rows, val_rows = pack(texts, tokenizer, cfg.seq_len, VAL_FRACTION, cfg.seed)
    calibration, held_out = train_rows[: cfg.calibration_rows], val_rows[: cfg.eval_rows]
    metrics = {"perplexity_before": perplexity(model, held_out)}
    if cfg.method.startswith("bnb"):
        del model
        _write_bitsandbytes(cfg, tokenizer, held_out, metrics, texts)
        return metrics
    grid = Grid(cfg.bits, cfg.sym, min_zero=1)
    if cfg.method == "gptq":
        layers = _gptq_layers(model, calibration, grid, cfg, show_progress)
    else:
        layers = {name: rtn(linear.weight, grid, cfg.group_size) for name, linear in _linears(model)}
        _fake_quantize(model, layers)
    metrics["perplexity_after"] = perplexity(model, held_out)
    _write(cfg, model, layers, metrics, texts)
    return metrics


@torch.no_grad()
def perplexity(model, rows: torch.Tensor) -> float:
    total = sum(model(input_ids=rows[i : i + 8], labels=rows[i : i + 8]).loss.item() * len(rows[i : i + 8])
                for i in range(0, len(rows), 8))
    return math.exp(total / len(rows))


def _linears(model):
    for i, layer in enumerate(model.model.layers):
        for group in LINEAR_GROUPS:
            for name in group:
                yield f"model.layers.{i}.{name}", layer.get_submodule(name)


@torch.no_grad()
def _gptq_layers(model, rows: torch.Tensor, grid: Grid, cfg: QuantizeConfig, show_progress: bool) -> dict:
    batches = _first_layer_inputs(model, rows)
    layers = {}
    for i, layer in enumerate(tqdm(model.model.layers, desc="GPTQ", disable=not show_progress)):
        hessians = _hessians(layer, batches)
        for group in LINEAR_GROUPS:
            for name in group:
                linear = layer.get_submodule(name)
                layers[f"model.layers.{i}.{name}"] = q = gptq(linear.weight, hessians[group[0]], grid,
                                                             cfg.group_size, cfg.desc_act)
                linear.weight.copy_(_dequantize(q))
        batches = [(_output(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in batches]
    return layers


def _first_layer_inputs(model, rows: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """The first decoder layer's hidden states and keyword arguments (rotary, mask) per batch of 8."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise StopForward

    hook = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, len(rows), 8):
            try:
                model(input_ids=rows[i : i + 8], use_cache=False)
            except StopForward:
                pass
    finally:
        hook.remove()
    return captured


def _hessians(layer: nn.Module, batches) -> dict[str, torch.Tensor]:
    """H = 2XXᵀ/n over the calibration tokens, for the first linear of each input-sharing group."""
    sums, counts = {}, {}

    def accumulate(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + len(x)
        return hook

    hooks = [layer.get_submodule(g[0]).register_forward_pre_hook(accumulate(g[0])) for g in LINEAR_GROUPS]
    try:
        for hidden, kwargs in batches:
            layer(hidden, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: 2 * sums[name] / counts[name] for name in sums}


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _dequantize(q: Quantized) -> torch.Tensor:
    """The weight the checkpoint encodes: with its scales rounded to float16 as stored."""
    return Quantized(q.codes, q.scales.half().float(), q.zeros, q.g_idx).dequantize()


@torch.no_grad()
def _fake_quantize(model, layers: dict[str, Quantized]) -> None:
    for name, linear in _linears(model):
        linear.weight.copy_(_dequantize(layers[name]))


def _write(cfg: QuantizeConfig, model, layers: dict[str, Quantized], metrics: dict, texts: list[str]) -> None:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    original = _checkpoint_dtype(cfg.model)
    tensors = {name: t.to(original) for name, t in model.state_dict().items()
               if name.rsplit(".", 1)[0] not in layers and "rotary_emb" not in name}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    for name, q in layers.items():
        tensors.update({f"{name}.{key}": value for key, value in gptq_tensors(q, cfg.bits).items()})
    save_tensors(tensors, out)
    for item in Path(cfg.model).iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name not in (
                "model.safetensors.index.json", "counterpoint.json"):
            shutil.copy2(item, out / item.name)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": cfg.bits, "group_size": cfg.group_size,
                                     "desc_act": cfg.desc_act, "sym": cfg.sym, "checkpoint_format": "gptq",
                                     "damp_percent": 0.01, "true_sequential": False,
                                     "static_groups": False, "lm_head": False}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("model", "out", "files", "seed")}
    write_provenance(out, "quantize", [Path(cfg.model), *cfg.files], seed=cfg.seed, metrics=metrics,
                     num_texts=len(texts), **settings)


def _write_bitsandbytes(cfg: QuantizeConfig, tokenizer, held_out: torch.Tensor, metrics: dict,
                        texts: list[str]) -> None:
    """A pre-quantized bitsandbytes checkpoint, as transformers' integration writes it."""
    from transformers import BitsAndBytesConfig

    if cfg.method == "bnb-nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, quantization_config=config, device_map="cpu",
                                                 dtype=_checkpoint_dtype(cfg.model))
    metrics["perplexity_after"] = perplexity(model, held_out)
    out = Path(cfg.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    settings = {k: v for k, v in asdict(cfg).items() if k in ("method", "seq_len", "eval_rows")}
    write_provenance(out, "quantize", [Path(cfg.model)], seed=cfg.seed, metrics=metrics, num_texts=len(texts),
                     **settings)


def _checkpoint_dtype(model_dir: Path) -> torch.dtype:
    dtype = AutoConfig.from_pretrained(model_dir).dtype or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def gptq_tensors(q: Quantized, bits: int) -> dict[str, torch.Tensor]:
    """qweight / qzeros / scales / g_idx in the gptq v1 layout (zeros stored minus one)."""
    return {"qweight": pack_int32(q.codes.T.long(), bits, 0),
            "qzeros": pack_int32((q.zeros - 1).long(), bits, 1),
            "scales": q.scales.half(),
            "g_idx": q.g_idx.int()}
