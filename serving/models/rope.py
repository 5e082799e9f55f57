"""Rotary position embeddings: inverse frequencies for each rope type, and a cos/sin cache."""

import math

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def inverse_frequencies(rope: dict, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in float32 for the rope parameters of an HF config."""
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    base = float(rope.get("rope_theta", 10000.0))
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if rope_type == "linear":
        inv_freq = inv_freq / float(rope["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_scaling(inv_freq, rope)
    return inv_freq.float()


def _llama3_scaling(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between smoothed.
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_len = float(rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def cos_sin_cache(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    """(max_positions, head_dim) float32: cos in the first half, sin in the second."""
    positions = torch.arange(max_positions, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)  # (P, D/2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on x (T, H, D), as in the HF Llama code, bit for bit: cos (T, 1, D) holds
    [cos, cos] and sin (T, 1, D) holds [-sin, sin], so rotate_half(x)·sin is roll(x)·sin."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
