"""A loaded model under a served name, with its tokenizer, KV block pool and runner."""

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from counterpoint.serving.attention.base import KVCache
from counterpoint.serving.engine.block_pool import BlockPool
from counterpoint.serving.engine.config import EngineConfig
from counterpoint.serving.attention.cuda_graphs import default_batch_sizes
from counterpoint.serving.engine.kv_manager import KVManager
from counterpoint.serving.engine.model_runner import ModelRunner
from counterpoint.serving.engine.trunks import tie_trunks
from counterpoint.serving.models import cpu_step
from counterpoint.serving.models.cpu_linear import pack_linears, packing_available
from counterpoint.serving.models.gguf_file import config_dir
from counterpoint.serving.models.loader import load_model, read_hf_config, resolve_dtype
from counterpoint.serving.models.llama import LlamaForCausalLM
from counterpoint.serving.models.shape import LlamaShape

logger = logging.getLogger("counterpoint")
CPU_KV_SHARE = 0.05  # of physical memory, per model, when the KV cache size is not given


@dataclass
class ModelSlot:
    name: str
    path: Path
    model: LlamaForCausalLM
    tokenizer: object
    eos_ids: tuple[int, ...]
    max_model_len: int
    kv: KVManager
    runner: ModelRunner
    grammar_compiler: object = None  # decoding.grammar.GrammarCompiler, made for the first structured request

    @property
    def vocab_size(self) -> int:
        return self.model.shape.vocab_size

    def compile_grammar(self, structured):
        """The compiled grammar of a request's structured_outputs (ValueError naming its field)."""
        if self.grammar_compiler is None:
            from counterpoint.decoding.grammar import GrammarCompiler

            self.grammar_compiler = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_ids)
        return self.grammar_compiler.compile(structured)


def load_slots(config: EngineConfig) -> tuple[dict[str, ModelSlot], dict[tuple[str, str], int]]:
    """Every model of the config under its served name, and the layers each ordered pair shares
    (see trunks.py): tied before the runners pack or capture them."""
    loaded = {name: _load(Path(path), config) for name, path in config.models}
    shared = tie_trunks({name: loaded_model[0] for name, loaded_model in loaded.items()})
    slots = {name: _slot(name, *loaded_model, config) for name, loaded_model in loaded.items()}
    return slots, shared


def _load(path: Path, config: EngineConfig) -> tuple[LlamaForCausalLM, torch.dtype, Path, object]:
    hf_config = read_hf_config(path)
    dtype = resolve_dtype(config.dtype, hf_config, config.torch_device)
    max_model_len = _max_model_len(LlamaShape.from_hf(hf_config), config)
    model = load_model(path, dtype, config.torch_device, max_model_len, show_progress=config.show_progress,
                       quantization=config.quantization, triton=config.resolved_attention_backend == "triton")
    return model, dtype, path, hf_config


def _slot(name: str, model: LlamaForCausalLM, dtype: torch.dtype, path: Path, hf_config,
          config: EngineConfig) -> ModelSlot:
    max_model_len = _max_model_len(model.shape, config)
    num_blocks, reason = _num_blocks(model, dtype, config, max_model_len)
    s = model.shape
    cache = KVCache(s.num_layers, num_blocks, config.block_size, s.num_kv_heads, s.head_dim, dtype,
                    config.torch_device)
    pool = BlockPool(num_blocks, config.block_size, config.enable_prefix_caching)
    tokenizer = AutoTokenizer.from_pretrained(config_dir(path))
    max_model_len = min(max_model_len, num_blocks * config.block_size)
    runner = _runner(name, model, cache, config, max_model_len)
    slot = ModelSlot(
        name=name, path=path, model=model, tokenizer=tokenizer,
        eos_ids=_eos_ids(config_dir(path), hf_config, tokenizer),
        max_model_len=max_model_len, kv=KVManager(pool), runner=runner,
    )
    logger.info(_describe(slot, dtype, reason))
    return slot


def tail_slot(name: str, amateur: ModelSlot, first_layer: int, config: EngineConfig) -> ModelSlot:
    """`amateur`'s layers first_layer.. as an internal model: a KV pool as large as the
    amateur's, over those layers alone, and a runner that goes on from another model's trunk."""
    pool, s, dtype = amateur.kv.pool, amateur.model.shape, amateur.runner.cache.data.dtype
    cache = KVCache(s.num_layers, pool.num_blocks, pool.block_size, s.num_kv_heads, s.head_dim, dtype,
                    config.torch_device, first_layer=first_layer)
    runner = ModelRunner(amateur.model, cache, config.resolved_attention_backend, config.torch_device, first_layer)
    tail_pool = BlockPool(pool.num_blocks, pool.block_size, config.enable_prefix_caching)
    return dataclasses.replace(amateur, name=name, kv=KVManager(tail_pool), runner=runner, grammar_compiler=None)


def _runner(name: str, model: LlamaForCausalLM, cache: KVCache, config: EngineConfig,
            max_model_len: int) -> ModelRunner:
    backend = config.resolved_attention_backend
    if backend == "triton":
        model.use_triton_kernels()
    if config.batch_invariant:
        model.make_batch_invariant()
    elif config.torch_device.type == "cpu" and packing_available():
        pack_linears(model)  # NOTE: layers tied to an earlier model's are packed already, and skipped
        model.decode_layers = cpu_step.DecodeLayers(model) if cpu_step.supports(model) else None
    runner = ModelRunner(model, cache, backend, config.torch_device)
    if config.uses_cuda_graphs:
        sizes = default_batch_sizes(config.max_num_seqs, config.cuda_graph_max_batch_size)
        try:
            runner.capture_decode_graphs(sizes, max_model_len, config.show_progress)
        except RuntimeError as err:
            raise RuntimeError(f"capturing CUDA graphs for {name} failed ({err}); enforce_eager=True "
                               "(--enforce-eager) serves without them") from err
    return runner


def _max_model_len(shape: LlamaShape, config: EngineConfig) -> int:
    limit = shape.max_position_embeddings
    if shape.sliding_window:
        limit = min(limit, shape.sliding_window)  # NOTE: no sliding-window attention yet: stay inside the window
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ValueError(f"max_model_len must be <= {limit} for this model; got {config.max_model_len}")
    return config.max_model_len


def _num_blocks(model: LlamaForCausalLM, dtype: torch.dtype, config: EngineConfig,
                max_model_len: int) -> tuple[int, str]:
    """KV blocks of this model's pool, and why that many (for the log)."""
    if config.num_blocks is not None:
        return config.num_blocks, "num_blocks"
    bytes_per_block = model.shape.kv_bytes_per_token * config.block_size * torch.finfo(dtype).bits // 8
    # No point holding more than every sequence at full length could use.
    enough = config.max_num_seqs * -(-max_model_len // config.block_size)
    if config.kv_cache_memory_gib is not None:
        by_memory, source = int(config.kv_cache_memory_gib * 2**30 // bytes_per_block), "kv_cache_memory"
    else:
        by_memory, source = int(kv_cache_budget(config.torch_device) // bytes_per_block), "auto"
    if enough <= by_memory:
        return max(1, enough), f"{source}, capped at max_num_seqs x max_model_len"
    return max(1, by_memory), source


def kv_cache_budget(device: torch.device) -> int:
    """Bytes of KV cache per model when none is asked for: on the CPU a share of the machine's
    memory (the cache is allocated in full, so it is resident), on CUDA a fixed 2 GiB."""
    if device.type == "cuda":
        return 2 * 2**30
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(CPU_KV_SHARE * physical)


def _describe(slot: ModelSlot, dtype: torch.dtype, num_blocks_reason: str) -> str:
    pool, cache = slot.kv.pool, slot.runner.cache
    kv_bytes = cache.data.numel() * cache.data.element_size()
    return (f"loaded {slot.name} from {slot.path}: {str(dtype).removeprefix('torch.')}, "
            f"{weight_bytes(slot.model) / 2**20:.0f} MiB of weights, max_model_len {slot.max_model_len}, "
            f"{pool.num_blocks} KV blocks of {pool.block_size} "
            f"tokens ({kv_bytes / 2**30:.2f} GiB; {num_blocks_reason})")


def weight_bytes(model: LlamaForCausalLM) -> int:
    """Memory held by the weights, quantized codes and scales included (tied tensors once)."""
    # NOTE: oneDNN's packed weights have no storage pointer, and are never shared
    tensors = {id(t) if t.is_mkldnn else t.data_ptr(): t
               for t in [*model.parameters(), *model.buffers()] if t is not model.cos_sin}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _eos_ids(path: Path, hf_config, tokenizer) -> tuple[int, ...]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen_file = path / "generation_config.json"
    for source in (json.loads(gen_file.read_text()) if gen_file.is_file() else {}, hf_config.to_dict()):
        value = source.get("eos_token_id")
        ids += value if isinstance(value, list) else [value] if value is not None else []
    return tuple(dict.fromkeys(ids))
