"""One implementation of the Llama family: Llama 2/3, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

The model works on a flattened variable-length batch: (T,) token ids and positions, no padding.
Attention goes through an `AttentionBackend`, so the same model runs on the torch path and on the
Triton kernels.
"""

import torch
from torch import nn
import torch.nn.functional as F

from counterpoint.serving.models import cpu_norm
from counterpoint.serving.models.rope import apply_rotary, cos_sin_cache, inverse_frequencies
from counterpoint.serving.models.shape import LlamaShape


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # NOTE: same rounding points as HF: normalise in float32, cast back, then scale. F.rms_norm
    # without a weight is HF's float32 normalisation bit for bit, in one call instead of five.
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


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
        if cpu_norm.supports(x, self.weight):
            return cpu_norm.add_rms_norm(x, residual, self.weight, self.eps)
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
            self.cos, self.sin = torch.cat([cos, cos], -1).to(dtype), torch.cat([-sin, sin], -1).to(dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, H, D) -> rotated (in place with the kernel)."""
        if self.use_kernel:
            from counterpoint.kernels.rotary import rotary_

            return rotary_(x, self.positions, self.cos_sin)
        return apply_rotary(x, self.cos, self.sin)


class RowwiseLinear(nn.Module):
    """A linear layer applied one row at a time (batch-invariant mode). NOTE: a matmul kernel may
    cut a batch of rows into blocks by its size, which changes roundings; one row at a time, every
    row goes through the same kernel whatever else the batch holds."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.linear(row, self.weight, self.bias) for row in x.split(1)])


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
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        v = v.view(-1, s.num_kv_heads, s.head_dim)  # (T, Hkv, D)
        if s.qk_norm:
            q = rope.apply(self.q_norm(q.view(-1, s.num_heads, s.head_dim)))  # (T, Hq, D)
            k = rope.apply(self.k_norm(k.view(-1, s.num_kv_heads, s.head_dim)))
        else:  # NOTE: queries and keys rotate in one call: each op costs more than its arithmetic here
            qk = qkv[:, : self.q_size + self.kv_size].view(-1, s.num_heads + s.num_kv_heads, s.head_dim)
            q, k = rope.apply(qk).split([s.num_heads, s.num_kv_heads], dim=1)
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
        self.decode_layers = None  # the C decode step (cpu_step.DecodeLayers), set where it applies

    def use_triton_kernels(self) -> None:
        """Fused RMSNorm and in-place rotary from kernels/ (the GPU path)."""
        self.triton_rotary = True
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.use_kernel = True

    def make_batch_invariant(self) -> None:
        """Every linear layer, lm_head included, runs one row at a time (see RowwiseLinear)."""
        for module in list(self.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    setattr(module, name, RowwiseLinear(child))

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
        hidden, _ = self.run_layers(self.embed_tokens(input_ids), None, positions, ctx)
        return hidden

    def run_layers(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, ctx,
                   first: int = 0, capture: frozenset[int] = frozenset()):
        """Layers `first`.. over the residual stream (x, residual), then the final norm.

        Returns the (T, hidden) final hidden states and, for each k in `capture`, the stream
        (x, residual) after the first k layers: the trunk a model sharing those layers goes on from.
        """
        native = self.decode_layers is not None and self.decode_layers.takes(x, ctx)
        if native:
            x, residual = self.decode_layers.stream(x, residual)
        else:
            rope = Rotary(positions, self.cos_sin, x.dtype, self.triton_rotary)
        captured, start = {}, first
        for stop in sorted({k for k in capture if k > first} | {len(self.layers)}):
            if native:
                self.decode_layers.run(x, residual, positions, ctx, start, stop)
            else:
                for idx in range(start, stop):
                    x, residual = self.layers[idx](x, residual, rope, ctx)
            if stop in capture:  # NOTE: cloned, as the fused GPU norm and the C step update their inputs in place
                captured[stop] = (x.clone(), residual.clone())
            start = stop
        x, _ = self.norm(x, residual)
        return x, captured

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32 logits."""
        return self.lm_head(hidden).float()
