"""The registry of combine methods. A method maps the logits of a hypothesis' two streams to one
vector: (R, V) main-stream logits and (R, V') logits of the other stream (the amateur, or the
prompt without its documents) -> (R, V) float32 combined logits, plus each row's weight of the
context where the method has one (ACD's w, AdaCAD's α), reported by return_decoding_info.
Methods get the logits in the model's dtype and compute in float32 (a fused kernel can read
bfloat16 logits as they are, without a float32 copy first).

A new method is one new file whose function is decorated with `@register(name)`, and one import
line in `__init__.py`. Methods see the common prefix of the two vocabularies; the rest is −inf."""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Combined:
    logits: torch.Tensor  # (R, V) float32
    weights: torch.Tensor | None = None  # (R,) the weight of the context, for return_decoding_info


Method = Callable[[torch.Tensor, torch.Tensor, list, list[int]], Combined]
METHODS: dict[str, Method] = {}


def register(name: str):
    def wrap(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return wrap


def combine(method: str, main: torch.Tensor, other: torch.Tensor, params: list, widths: list[int]) -> Combined:
    """`params[i]` are row i's method parameters; `widths[i]` its beam width (1 outside beam search)."""
    vocab = min(main.shape[-1], other.shape[-1])
    inner = METHODS[method](main[:, :vocab], other[:, :vocab], params, widths)
    if vocab == main.shape[-1]:
        return inner
    out = torch.full((main.shape[0], main.shape[-1]), -math.inf, device=main.device)
    out[:, :vocab] = inner.logits
    return Combined(out, inner.weights)


def row_values(params: list, name: str, device) -> torch.Tensor:
    """(R, 1) float32: one parameter of every row."""
    return torch.tensor([getattr(p, name) for p in params], dtype=torch.float32, device=device)[:, None]
