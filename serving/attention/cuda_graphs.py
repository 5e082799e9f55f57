"""CUDA graphs of the decode step, one per batch-size bucket.

A decode step of a small batch launches hundreds of short kernels; replaying a captured graph
launches them all at once, so the step is no longer bound by Python and launch overhead. A batch
of decodes is padded up to the next bucket: padding rows write no KV (slot −1), attend to one
token of block 0, and their outputs are ignored. The decode kernel's grid depends on the batch
alone (each sequence splits its own context), so one graph serves every context length.

On a device without CUDA (the tests) the same static buffers are replayed eagerly, which checks
the padding and buffer plumbing everywhere but the capture itself.
"""

import functools

import torch
from tqdm import tqdm

from counterpoint.serving.attention.base import KVCache, block_table_tensor


def default_batch_sizes(max_num_seqs: int, largest: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to the batch the engine can schedule (as vLLM)."""
    top = min(max_num_seqs, largest)
    sizes = [s for s in (1, 2, 4) if s < top] + list(range(8, top, 8))
    return sizes + [top]


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, cache: KVCache, backend, batch_sizes: list[int],
                 max_context: int, device: torch.device, show_progress: bool = True):
        self.model, self.cache, self.backend, self.device = model, cache, backend, device
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_context = max_context
        largest, width = self.batch_sizes[-1], -(-max_context // cache.block_size)

        def new(*shape, dtype=torch.int64, fill=0):
            return torch.full(shape, fill, dtype=dtype, device=device)

        self.input_ids, self.positions = new(largest), new(largest)
        self.slots = new(largest, fill=-1)
        self.tables = new(largest, width, dtype=torch.int32)
        self.context_lens = new(largest, dtype=torch.int32, fill=1)
        self.hidden = torch.zeros(largest, model.shape.hidden_size, dtype=model.embed_tokens.weight.dtype,
                                  device=device)
        self.replays = 0  # steps served by a graph (for tests and benchmarks)
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        # NOTE: largest first, sharing one memory pool, so smaller graphs reuse the larger ones' memory.
        sizes = tqdm(self.batch_sizes[::-1], desc="capturing CUDA graphs", disable=not show_progress, leave=False)
        self.graphs = {size: self._capture(size) for size in sizes}

    def fits(self, num_seqs: int, longest_context: int, longest_table: int) -> bool:
        return (num_seqs <= self.batch_sizes[-1] and longest_context <= self.max_context
                and longest_table <= self.tables.shape[1])

    def run(self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            context_lens: list[int]) -> torch.Tensor:
        """One decode step for len(ids) sequences -> their (len(ids), hidden) final hidden states,
        a view of a static buffer that the next step overwrites."""
        n = len(ids)
        size = next(s for s in self.batch_sizes if s >= n)
        pad = size - n
        rows = [ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad, context_lens + [1] * pad]
        host_tables = block_table_tensor(tables, size, torch.int64)
        # NOTE: everything crosses in one host-to-device copy; the rest are copies on the device.
        staged = torch.cat([torch.tensor(rows, dtype=torch.int64), host_tables.T]).to(self.device)
        self.input_ids[:size], self.positions[:size], self.slots[:size], self.context_lens[:size] = staged[:4]
        self.tables[:size, : host_tables.shape[1]] = staged[4:].T
        self.graphs[size]()
        self.replays += 1
        return self.hidden[:n]

    def _capture(self, size: int):
        step = functools.partial(self._step, size)
        if self.device.type != "cuda":
            return step
        self._warm_up(step)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step()
        return graph.replay

    def _step(self, size: int) -> None:
        """The model over the first `size` rows of the static buffers, into self.hidden."""
        # NOTE: short tiles: the graph is captured at the longest context but mostly replays at short ones.
        self.backend.prepare_decode(self.cache, self.slots[:size], self.tables[:size], self.context_lens[:size],
                                    self.max_context, long_tiles=False)
        self.hidden[:size] = self.model(self.input_ids[:size], self.positions[:size], self.backend)

    def _warm_up(self, step) -> None:
        """One run on a side stream, as torch's docs advise: Triton compiles and cuBLAS sets up
        its workspace there, outside the capture, which could not record them."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
