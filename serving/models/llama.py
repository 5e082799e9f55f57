"""One implementation of the Llama family: Llama 2/3, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

The model works on a flattened variable-length batch: (T,) token ids and positions, no padding.
Attention goes through an `AttentionBackend`, so the same model runs on the torch path and on the
Triton kernels.
"""

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from counterpoint.serving.models.rope import apply_rotary, cos_sin_cache, inverse_frequencies

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions the engine needs, read once from an HF config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    sliding_window: int | None
    rope: dict

    @classmethod
    def from_hf(cls, config) -> "LlamaShape":
        model_type = config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        num_heads = config.num_attention_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        use_sliding = getattr(config, "use_sliding_window", model_type == "mistral")
        return cls(
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            rms_norm_eps=config.rms_norm_eps,
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias and model_type != "qwen2",
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_position_embeddings=config.max_position_embeddings,
            sliding_window=getattr(config, "sliding_window", None) if use_sliding else None,
            rope=dict(config.rope_parameters or {}),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token per element size 1 (multiply by the cache dtype's size)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # NOTE: same rounding points as HF: normalise in float32, cast back, then scale.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.use_kernel = False  # the fused Triton kernel (set by LlamaForCausalLM.use_triton_kernels)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With `residual`: returns (norm(x + residual), x + residual), the fused pre-norm step."""
        if self.use_kernel and x.dim() == 2:
            from counterpoint.kernels.rms_norm import fused_add_rms_norm

            out, total = fused_add_rms_norm(x, residual, self.weight, self.eps)
            return out if residual is None else (out, total)
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        x = x + residual
        return rms_norm(x, self.weight, self.eps), x


class Rotary:
    """One step's rotary inputs: the positions, and the cos/sin rows the torch path needs."""

    def __init__(self, positions: torch.Tensor, cos_sin: torch.Tensor, dtype: torch.dtype, use_kernel: bool):
        self.positions, self.cos_sin, self.use_kernel = positions, cos_sin, use_kernel
        if not use_kernel:
            cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)  # (T, 1, D/2) each
            self.cos, self.sin = cos.to(dtype), sin.to(dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, H, D) -> rotated (in place with the kernel)."""
        if self.use_kernel:
            from counterpoint.kernels.rotary import rotary_

            return rotary_(x, self.positions, self.cos_sin)
        return apply_rotary(x, self.cos, self.sin)


class Attention(nn.Module):
    def __init__(self, shape: LlamaShape, layer_idx: int):
        super().__init__()
        self.shape = shape
        self.layer_idx = layer_idx
        self.q_size = shape.num_heads * shape.head_dim
        self.kv_size = shape.num_kv_heads * shape.head_dim
        self.qkv_proj = nn.Linear(shape.hidden_size, self.q_size + 2 * self.kv_size, bias=shape.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, shape.hidden_size, bias=shape.o_bias)
        if shape.qk_norm:
            self.q_norm = RMSNorm(shape.head_dim, shape.rms_norm_eps)
            self.k_norm = RMSNorm(shape.head_dim, shape.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: "Rotary", ctx) -> torch.Tensor:
        s = self.shape
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, s.num_heads, s.head_dim)  # (T, Hq, D)
        k = k.view(-1, s.num_kv_heads, s.head_dim)  # (T, Hkv, D)
        v = v.view(-1, s.num_kv_heads, s.head_dim)
        if s.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.apply(q), rope.apply(k)
        out = ctx.attend(self.layer_idx, q, k, v)  # (T, Hq, D)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.intermediate_size = shape.intermediate_size
        self.gate_up_proj = nn.Linear(shape.hidden_size, 2 * shape.intermediate_size, bias=False)
        self.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, shape: LlamaShape, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.self_attn = Attention(shape, layer_idx)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.mlp = MLP(shape)

    def forward(self, x, residual, rope, ctx):
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rope, ctx)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    # HF tensor name fragment -> (our packed parameter fragment, index of the shard in the pack)
    PACKED = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, shape: LlamaShape, max_positions: int):
        super().__init__()
        self.shape = shape
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(shape, i) for i in range(shape.num_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        self.tie_weights()
        self.init_rope(max_positions)
        self.triton_rotary = False

    def use_triton_kernels(self) -> None:
        """Fused RMSNorm and in-place rotary from kernels/ (the GPU path)."""
        self.triton_rotary = True
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.use_kernel = True

    def tie_weights(self) -> None:
        if self.shape.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_rope(self, max_positions: int) -> None:
        # NOTE: kept in float32 whatever the model dtype, like HF's inv_freq.
        inv_freq = inverse_frequencies(self.shape.rope, self.shape.head_dim)
        cache = cos_sin_cache(inv_freq, max_positions).to(self.embed_tokens.weight.device)
        self.register_buffer("cos_sin", cache, persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        """(T,) ids and positions -> (T, hidden) final hidden states."""
        x = self.embed_tokens(input_ids)
        rope = Rotary(positions, self.cos_sin, x.dtype, self.triton_rotary)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope, ctx)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32 logits."""
        return self.lm_head(hidden).float()

    def load_weights(self, named_tensors) -> None:
        """Copy HF-named tensors in; raises if any parameter was left unset."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in named_tensors:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.shape.tie_word_embeddings):
                continue
            target, shard = self._locate(name)
            if target not in params:
                raise ValueError(f"unexpected tensor {name!r} in the checkpoint")
            self._copy_shard(params[target], tensor, target, shard)
            loaded.add(target if shard is None else f"{target}#{shard}")
        self._check_complete(params, loaded)

    def _locate(self, name: str) -> tuple[str, int | None]:
        for fragment, (packed, shard) in self.PACKED.items():
            if f".{fragment}." in name:
                return name.replace(fragment, packed), shard
        return name, None

    def _copy_shard(self, param: nn.Parameter, tensor: torch.Tensor, target: str, shard: int | None) -> None:
        if shard is None:
            if param.shape != tensor.shape:
                raise ValueError(f"{target}: checkpoint shape {tuple(tensor.shape)} != model shape "
                                 f"{tuple(param.shape)}")
            param.data.copy_(tensor)
            return
        sizes = self._shard_sizes(target)
        start = sum(sizes[:shard])
        param.data[start : start + sizes[shard]].copy_(tensor)

    def _shard_sizes(self, target: str) -> list[int]:
        s = self.shape
        if "qkv_proj" in target:
            return [s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim]
        return [s.intermediate_size, s.intermediate_size]

    def _check_complete(self, params: dict, loaded: set) -> None:
        missing = []
        for name in params:
            shards = 3 if "qkv_proj" in name else 2 if "gate_up_proj" in name else 0
            if shards:
                missing += [f"{name}#{i}" for i in range(shards) if f"{name}#{i}" not in loaded]
            elif name not in loaded and not (name == "lm_head.weight" and self.shape.tie_word_embeddings):
                missing.append(name)
        if missing:
            raise ValueError(f"checkpoint is missing tensors: {', '.join(missing[:8])}")
