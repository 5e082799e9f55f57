"""KV store: write each new token's key and value into the paged cache at its slot."""

import torch
import triton
import triton.language as tl

from counterpoint.kernels.checks import check_same_device, check_tensor, next_power_of_2, require


@triton.jit
def _store_kv_kernel(key_ptr, value_ptr, cache_ptr, slot_ptr, block_size,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_c2, stride_ch, stride_cb, stride_co,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    token, head = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:  # NOTE: negative slots mark padding rows
        d = tl.arange(0, BLOCK_D)
        in_head = d < HEAD_DIM
        k = tl.load(key_ptr + token * stride_kt + head * stride_kh + d, mask=in_head)
        v = tl.load(value_ptr + token * stride_vt + head * stride_vh + d, mask=in_head)
        dst = cache_ptr + head * stride_ch + (slot // block_size) * stride_cb + (slot % block_size) * stride_co + d
        tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=in_head)
        tl.store(dst + stride_c2, v.to(cache_ptr.dtype.element_ty), mask=in_head)


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key, value: (T, Hkv, D); kv_cache: (2, Hkv, num_blocks, block_size, D); slot_mapping: (T,)."""
    check_tensor(key, "key", 3)
    check_tensor(value, "value", 3)
    check_tensor(kv_cache, "kv_cache", 5)
    check_tensor(slot_mapping, "slot_mapping", 1, dtypes=(torch.int32, torch.int64))
    check_same_device(key=key, value=value, kv_cache=kv_cache, slot_mapping=slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    require(value.shape == key.shape, f"value must have key's shape {tuple(key.shape)}; got {tuple(value.shape)}")
    require(kv_cache.shape[0] == 2 and kv_cache.shape[1] == num_kv_heads and kv_cache.shape[4] == head_dim,
            f"kv_cache must be (2, {num_kv_heads}, num_blocks, block_size, {head_dim}); got {tuple(kv_cache.shape)}")
    require(slot_mapping.shape == (num_tokens,),
            f"slot_mapping must be ({num_tokens},); got {tuple(slot_mapping.shape)}")
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens, num_kv_heads)](
        key, value, kv_cache, slot_mapping, kv_cache.shape[3],
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim),
    )
