"""Quantized layers at load time: swap the model's linear layers for QuantLinear before the
checkpoint is read, pick the quantized layers' tensors out of the stream, and build them."""

import logging
from collections import defaultdict

import torch
from torch import nn

from counterpoint.serving.models.weights import locate
from counterpoint.serving.quant.base import WeightFormat
from counterpoint.serving.quant.linear import QuantLinear

log = logging.getLogger("counterpoint")


class QuantizedLayers:
    """The quantized linear layers of one model being loaded from one checkpoint."""

    def __init__(self, fmt: WeightFormat, tensor_names: list[str]):
        self.fmt = fmt
        self.modules = fmt.quantized_modules(tensor_names)  # HF names
        self.pending: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        self.weights: dict[str, dict[int | None, object]] = defaultdict(dict)  # our module -> shard -> weight
        self.expected: dict[str, set[str]] = defaultdict(set)  # module -> its parts in the checkpoint
        for name in tensor_names:
            part = fmt.split(name, self.modules)
            if part and part[1] != "bias":
                self.expected[part[0]].add(part[1])
        for module in self.modules:
            missing = [s for s in fmt.required if s not in self.expected[module]]
            if missing:
                raise ValueError(f"{module}: the checkpoint is missing {', '.join(missing)}")

    def swap_linears(self, model: nn.Module) -> None:
        """Replace every linear layer that has a quantized part with a QuantLinear (on meta)."""
        targets = {_target(m)[0] for m in self.modules}
        for target in targets:
            parent_name, _, child = target.rpartition(".")
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, child)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"checkpoint stores {target} quantized, but the model has no such linear layer")
            setattr(parent, child, QuantLinear(linear.in_features, linear.out_features, linear.bias is not None))

    def take(self, name: str, tensor: torch.Tensor) -> bool:
        """Keep `name` if it belongs to a quantized layer; read the layer once all its tensors came."""
        part = self.fmt.split(name, self.modules)
        if part is None or part[1] == "bias":
            return False
        module, suffix = part
        self.pending[module][suffix] = tensor
        if len(self.pending[module]) == len(self.expected[module]):
            tensors = self.pending.pop(module)
            target, shard = _target(module)
            self.weights[target][shard] = self.fmt.read(module, tensors)
        return True

    def install(self, model: nn.Module, dtype: torch.dtype, device: torch.device, triton: bool) -> None:
        if self.pending:
            module, tensors = next(iter(self.pending.items()))
            missing = sorted(self.expected[module] - set(tensors))
            raise ValueError(f"{module}: the checkpoint is missing {', '.join(missing)}")
        kinds = defaultdict(list)
        for module_name, module in model.named_modules():
            if not isinstance(module, QuantLinear):
                continue
            shards = self.weights.get(module_name, {})
            count = 3 if "qkv_proj" in module_name else 2 if "gate_up_proj" in module_name else 1
            order = [None] if count == 1 else list(range(count))
            missing = [shard for shard in order if shard not in shards]
            if missing:
                raise ValueError(f"{module_name}: part {missing[0]} of this packed layer is not quantized in the "
                                 "checkpoint while the others are; all of q/k/v (gate/up) must share one format")
            kinds[module.install([shards[s] for s in order], dtype, device, triton)].append(module_name)
        for kind, names in kinds.items():
            log.info("%s: %d linear layers run as %s", self.fmt.describe(), len(names), kind)


def _target(module: str) -> tuple[str, int | None]:
    """HF module name -> our (packed) module name and the shard it fills."""
    name, shard = locate(f"{module.removeprefix('model.')}.weight")
    return name.removesuffix(".weight"), shard
