"""Shared trunks: models whose first layers are the same, bit for bit, run those layers once.

An anti-expert tuned from its expert's last layers, or an early-exit amateur cut from the expert's
first layers, repeats the expert's computation up to the layer where it departs. At load, each
model's leading layers that equal an earlier model's are tied to that model's modules, so they
are held once. A contrastive request whose amateur shares k layers with its expert then gets a
*tail* stream: the amateur's layers k.. run over the expert's residual stream after k layers
(captured in the expert's step), with a KV cache for those layers alone. The scheduler moves a
tail sequence in lockstep with its main sequence, so the trunk rows it needs are always there.
"""

import dataclasses
import logging

import torch
from torch import nn

from counterpoint.serving.models.llama import LlamaForCausalLM

logger = logging.getLogger("counterpoint")


def tail_name(expert: str, amateur: str) -> str:
    """The internal (never served) model name of `amateur`'s tail over `expert`'s trunk."""
    return f"{amateur}@{expert}"


def tie_trunks(models: dict[str, LlamaForCausalLM]) -> dict[tuple[str, str], int]:
    """Ties each model's leading layers to an earlier model's equal ones; returns the shared
    layer count of every ordered pair of models that share any."""
    shared = {}
    names = list(models)
    for j, later in enumerate(names):
        for earlier in names[:j]:
            k = shared_layers(models[earlier], models[later])
            if k:
                for idx in range(k):
                    models[later].layers[idx] = models[earlier].layers[idx]
                _tie_ends(models[earlier], models[later])
                shared[earlier, later] = shared[later, earlier] = k
                logger.info(f"{later} shares its first {k} layers with {earlier}: held once, and run once when "
                            f"one is the other's amateur")
    return shared


def _tie_ends(earlier: LlamaForCausalLM, later: LlamaForCausalLM) -> None:
    """The embedding (equal, as shared layers require) and an equal lm_head are held once too: the
    engine then runs both models' rows through that lm_head in one pass (engine._run_models)."""
    later.embed_tokens = earlier.embed_tokens
    if _same_tensors(earlier.lm_head, later.lm_head):
        later.lm_head = earlier.lm_head


def shared_layers(a: LlamaForCausalLM, b: LlamaForCausalLM) -> int:
    """How many leading layers of a and b compute the same function: same embeddings, same
    layer settings, equal tensors."""
    if _layer_settings(a) != _layer_settings(b) or not _same_tensors(a.embed_tokens, b.embed_tokens):
        return 0
    k = 0
    for layer_a, layer_b in zip(a.layers, b.layers):
        if layer_a is not layer_b and not _same_tensors(layer_a, layer_b):
            break
        k += 1
    return k


def _layer_settings(model: LlamaForCausalLM):
    # NOTE: everything of the shape but what only the model's ends or its length depend on
    ends = dict(vocab_size=0, num_layers=0, tie_word_embeddings=False, max_position_embeddings=0)
    return dataclasses.replace(model.shape, **ends), model.triton_rotary


def _same_tensors(a: nn.Module, b: nn.Module) -> bool:
    if type(a) is not type(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(_equal(sa[key], sb[key]) for key in sa)


def _equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and bool(torch.equal(x, y))
