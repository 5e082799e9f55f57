"""Runs one model over the sequences scheduled for it: a flattened variable-length batch."""

import torch

from counterpoint.serving.attention import AttentionMetadata, KVCache, create_backend
from counterpoint.serving.models.llama import LlamaForCausalLM
from counterpoint.serving.scheduler import ScheduledSeq


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cache: KVCache, backend: str, device: torch.device):
        self.model = model
        self.cache = cache
        self.device = device
        self.backend = create_backend(backend, scale=model.shape.head_dim**-0.5)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq], copies: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Returns, per scheduled sequence in input order, (len(logit_positions), vocab) logits."""
        self.cache.copy_blocks(copies)
        # Decodes first: the attention backend batches them together.
        order = sorted(range(len(scheduled)), key=lambda i: scheduled[i].num_new_tokens != 1)
        batch = [scheduled[i] for i in order]
        input_ids, positions, slots, logit_rows = self._flatten(batch)
        meta = self._metadata(batch, slots)
        self.backend.prepare(meta, self.cache)
        hidden = self.model(input_ids, positions, self.backend)  # (T, hidden)
        logits = self.model.compute_logits(hidden[torch.cat(logit_rows)]) if logit_rows else None
        per_seq, start = [None] * len(scheduled), 0
        for i, rows in zip(order, logit_rows):
            per_seq[i] = logits[start : start + len(rows)]
            start += len(rows)
        return per_seq

    def _flatten(self, batch: list[ScheduledSeq]):
        ids, pos, slots, logit_rows = [], [], [], []
        bs = self.cache.block_size
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            offset = len(ids) - start  # flat row of absolute position p is p + offset
            span = range(start, start + item.num_new_tokens)
            ids += seq.token_ids[start : start + item.num_new_tokens]
            pos += span
            slots += [seq.block_table[p // bs] * bs + p % bs for p in span]
            logit_rows.append(torch.tensor([p + offset for p in item.logit_positions], dtype=torch.long))
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        logit_rows = [r.to(self.device) for r in logit_rows]
        return as_tensor(ids), as_tensor(pos), as_tensor(slots), logit_rows

    def _metadata(self, batch: list[ScheduledSeq], slots: torch.Tensor) -> AttentionMetadata:
        width = max(len(item.seq.block_table) for item in batch)
        tables = torch.zeros(len(batch), width, dtype=torch.long)
        for i, item in enumerate(batch):
            tables[i, : len(item.seq.block_table)] = torch.tensor(item.seq.block_table)
        return AttentionMetadata(
            slot_mapping=slots,
            block_tables=tables.to(self.device),
            query_lens=[item.num_new_tokens for item in batch],
            context_lens=[item.seq.num_computed_tokens + item.num_new_tokens for item in batch],
            num_decodes=sum(item.num_new_tokens == 1 for item in batch),
            block_size=self.cache.block_size,
        )
