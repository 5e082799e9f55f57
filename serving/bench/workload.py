"""Benchmark workloads: random-token prompts (vLLM's random dataset) or the bundled text prompts."""

import random
from dataclasses import dataclass

from counterpoint.serving.bench.serve import load_prompts


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def random_workload(num_prompts: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int,
                    seed: int) -> Workload:
    """Random-token prompts; lengths uniform in [len·(1−r), len·(1+r)], like vLLM's random dataset."""
    rng = random.Random(seed)
    span = lambda n: rng.randint(max(1, int(n * (1 - range_ratio))), max(1, int(n * (1 + range_ratio))))  # noqa: E731
    low = min(100, vocab_size // 2)  # skip the first ids, where special tokens usually sit
    prompts = [[rng.randrange(low, vocab_size) for _ in range(span(input_len))] for _ in range(num_prompts)]
    return Workload(prompts, [span(output_len) for _ in range(num_prompts)])


def bundled_workload(tokenizer, num_prompts: int, output_len: int, seed: int) -> Workload:
    """The text prompts `bench serve` sends, so offline and served runs can be compared."""
    prompts = [tokenizer.encode(p) for p in load_prompts(None, num_prompts, seed)]
    return Workload(prompts, [output_len] * num_prompts)
