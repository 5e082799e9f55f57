"""Runs one model over the sequences scheduled for it: a flattened variable-length batch."""

import torch

from counterpoint.serving.attention import create_backend
from counterpoint.serving.attention.base import AttentionMetadata, KVCache, block_table_tensor
from counterpoint.serving.attention.cuda_graphs import DecodeGraphs
from counterpoint.serving.models.llama import LlamaForCausalLM
from counterpoint.serving.engine.scheduler import ScheduledSeq


Trunk = tuple[torch.Tensor, torch.Tensor]  # (x, residual) rows of a sequence's new tokens after some layers


class ModelRunner:
    """Runs `model` from layer `first_layer` on: a tail runner (first_layer > 0) goes on from the
    trunk another model's runner computed and captured for the same tokens (see engine/trunks.py)."""

    def __init__(self, model: LlamaForCausalLM, cache: KVCache, backend: str, device: torch.device,
                 first_layer: int = 0):
        self.model = model
        self.cache = cache
        self.device = device
        self.first_layer = first_layer
        self.backend = create_backend(backend, scale=model.shape.head_dim**-0.5)
        self.graphs: DecodeGraphs | None = None

    @torch.inference_mode()
    def capture_decode_graphs(self, batch_sizes: list[int], max_context: int, show_progress: bool = True) -> None:
        """From now on, steps of decodes alone, all contexts within max_context, replay a graph
        (needs the Triton backend)."""
        if not hasattr(self.backend, "prepare_decode"):
            raise ValueError("CUDA graphs need the triton attention backend")
        self.graphs = DecodeGraphs(self.model, self.cache, self.backend, batch_sizes, max_context, self.device,
                                   show_progress)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq], copies: list[tuple[int, int]],
                trunks: list[Trunk] | None = None, capture: dict[int, int] | None = None):
        """Returns, per scheduled sequence in input order, its (len(logit_positions), hidden) final
        hidden states (`logits` turns them into logits), and the trunks `capture` asks for:
        {seq_id: layers} -> {seq_id: Trunk after that many layers}. A tail runner takes `trunks`,
        one per scheduled sequence."""
        self.cache.copy_blocks(copies)
        # Decodes first: the attention backend batches them together.
        order = sorted(range(len(scheduled)), key=lambda i: scheduled[i].num_new_tokens != 1)
        batch = [scheduled[i] for i in order]
        ids, positions, slots, logit_rows = self._flatten(batch)
        trunk = [trunks[i] for i in order] if trunks is not None else None
        hidden, captured = self._forward(batch, ids, positions, slots, trunk, set((capture or {}).values()))
        flat_rows = [row for rows in logit_rows for row in rows]
        if flat_rows != list(range(hidden.shape[0])):  # NOTE: a step of decodes alone needs every row, in order
            hidden = hidden[torch.tensor(flat_rows, dtype=torch.long, device=self.device)]
        per_seq, start = [None] * len(scheduled), 0
        for i, rows in zip(order, logit_rows):
            per_seq[i] = hidden[start : start + len(rows)]
            start += len(rows)
        return per_seq, self._trunks(batch, captured, capture or {})

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) final hidden states -> (N, vocab) float32 logits."""
        return self.model.compute_logits(hidden)

    def lm_head_key(self) -> int:
        """Equal for runners whose models hold one lm_head (they share their ends, see trunks.py):
        the engine runs their rows through it in one pass."""
        return id(self.model.lm_head)

    def _forward(self, batch: list[ScheduledSeq], ids: list[int], positions: list[int], slots: list[int],
                 trunk: list[Trunk] | None, capture: set[int]):
        if self.graphs is not None and not capture and all(item.num_new_tokens == 1 for item in batch):
            tables = [item.seq.block_table for item in batch]
            context_lens = [item.seq.num_computed_tokens + 1 for item in batch]
            if self.graphs.fits(len(batch), max(context_lens), max(map(len, tables))):
                return self.graphs.run(ids, positions, slots, tables, context_lens), {}
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        slot_mapping = as_tensor(slots)
        self.backend.prepare(self._metadata(batch, slot_mapping), self.cache)
        if trunk is None:
            x, residual = self.model.embed_tokens(as_tensor(ids)), None
        else:
            x, residual = (torch.cat(parts) for parts in zip(*trunk))
        return self.model.run_layers(x, residual, as_tensor(positions), self.backend, self.first_layer,
                                     frozenset(capture))

    @staticmethod
    def _trunks(batch: list[ScheduledSeq], captured: dict[int, Trunk], capture: dict[int, int]) -> dict[int, Trunk]:
        out, start = {}, 0
        for item in batch:
            end = start + item.num_new_tokens
            if item.seq.seq_id in capture:
                x, residual = captured[capture[item.seq.seq_id]]
                out[item.seq.seq_id] = (x[start:end], residual[start:end])
            start = end
        return out

    def _flatten(self, batch: list[ScheduledSeq]):
        """Host lists: token ids, positions and cache slots of every new token, and each
        sequence's flat rows whose logits the step returns."""
        ids, pos, slots, logit_rows = [], [], [], []
        bs = self.cache.block_size
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            offset = len(ids) - start  # flat row of absolute position p is p + offset
            span = range(start, start + item.num_new_tokens)
            ids += seq.token_ids[start : start + item.num_new_tokens]
            pos += span
            slots += [seq.block_table[p // bs] * bs + p % bs for p in span]
            logit_rows.append([p + offset for p in item.logit_positions])
        return ids, pos, slots, logit_rows

    def _metadata(self, batch: list[ScheduledSeq], slots: torch.Tensor) -> AttentionMetadata:
        tables = block_table_tensor([item.seq.block_table for item in batch], len(batch), torch.long)
        return AttentionMetadata(
            slot_mapping=slots,
            block_tables=tables.to(self.device),
            query_lens=[item.num_new_tokens for item in batch],
            context_lens=[item.seq.num_computed_tokens + item.num_new_tokens for item in batch],
            num_decodes=sum(item.num_new_tokens == 1 for item in batch),
            block_size=self.cache.block_size,
        )
