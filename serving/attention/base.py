"""The attention backend interface: one step's metadata, the paged KV cache, and a registry.

The runner builds one `AttentionMetadata` per step; the backend turns it once into whatever it
needs (`prepare`), then `attend` is called for every layer. A new backend is one file whose class
is decorated with `register_backend(name)`.
"""

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """One step's batch layout. Sequences are ordered decodes first (query length 1)."""

    slot_mapping: torch.Tensor  # (T,) flat cache slot of each new token
    block_tables: torch.Tensor  # (B, max_blocks) int64, padded with 0
    query_lens: list[int]  # (B,) new tokens of each sequence this step
    context_lens: list[int]  # (B,) tokens of each sequence once this step is done
    num_decodes: int  # the first num_decodes sequences have query length 1
    block_size: int


def block_table_tensor(tables: list[list[int]], num_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """(num_rows, longest table) on the host, each row padded with block 0; rows past the
    tables are all block 0 (padding sequences)."""
    width = max(map(len, tables))
    rows = [table + [0] * (width - len(table)) for table in tables] + [[0] * width] * (num_rows - len(tables))
    return torch.tensor(rows, dtype=dtype)


class KVCache:
    """K and V for every layer: (layers, 2, kv_heads, num_blocks, block_size, head_dim).

    NOTE: head-major, so one head's block is a contiguous (block_size, head_dim) tile: gathering a
    sequence's blocks yields (kv_heads, blocks·block_size, head_dim) ready for a matmul.
    A tail runner's cache holds only layers first_layer.. (the layers before are another model's).
    """

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device, first_layer=0):
        shape = (num_layers - first_layer, 2, num_kv_heads, num_blocks, block_size, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.first_layer = first_layer

    def layer(self, idx: int) -> torch.Tensor:
        """(2, kv_heads, num_blocks, block_size, head_dim): K and V of one layer."""
        return self.data[idx - self.first_layer]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: block src's contents to block dst, in every layer."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.data.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.data.device)
        self.data[:, :, :, dst] = self.data[:, :, :, src]


def write_kv(kv_cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """Store the new tokens' k/v (T, Hkv, D) at (block, offset) in one layer's cache (2, Hkv, NB, bs, D).
    NOTE: K and V move together: one index op costs half of two (measured on CPU)."""
    kv_cache[:, :, blocks, offsets] = torch.stack([k, v]).transpose(1, 2)


class AttentionBackend:
    """Base class: `prepare` once per step, then `attend` once per layer."""

    def prepare(self, meta: AttentionMetadata, cache: KVCache) -> None:
        raise NotImplementedError

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (T, Hq, D), k/v (T, Hkv, D) of the new tokens -> (T, Hq, D). Stores k/v in the cache."""
        raise NotImplementedError


BACKENDS: dict[str, type[AttentionBackend]] = {}


def register_backend(name: str):
    def wrap(cls):
        BACKENDS[name] = cls
        return cls

    return wrap
