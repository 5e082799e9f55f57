"""The weight-format registry: how a checkpoint's quantized linear layers are read.

A format names the tensors each quantized linear layer stores (GPTQ's qweight/qzeros/scales/g_idx,
bitsandbytes' weight and quant state) and turns one layer's tensors into a weight the quantized
linear module can run. The model file never sees a format: the loader swaps its linear layers for
`QuantLinear` modules before reading the checkpoint. Each format is one file that registers itself.
"""

import torch

FORMATS: dict[str, type["WeightFormat"]] = {}


def register(cls: type["WeightFormat"]) -> type["WeightFormat"]:
    FORMATS[cls.name] = cls
    return cls


class WeightFormat:
    """One quantized checkpoint format, configured by config.json's `quantization_config`."""

    name = ""
    required: tuple[str, ...] = ()  # the tensors every quantized layer stores (the first marks one)

    def __init__(self, config: dict):
        self.config = config

    def quantized_modules(self, tensor_names) -> set[str]:
        """Module names (HF, e.g. `model.layers.0.self_attn.q_proj`) stored quantized."""
        marker = f".{self.required[0]}"
        return {name.removesuffix(marker) for name in tensor_names if name.endswith(marker)}

    def split(self, name: str, modules: set[str]) -> tuple[str, str] | None:
        """A tensor name -> (quantized module, its part's name), or None if it is not one."""
        for module in (name.rsplit(".", depth)[0] for depth in (1, 2, 3)):
            if module in modules:
                return module, name[len(module) + 1 :]
        return None

    def read(self, module: str, tensors: dict[str, torch.Tensor]):
        """One layer's tensors (keyed by suffix) -> a QuantizedWeight, or a kernel object that runs
        itself (bitsandbytes)."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


def weight_format(quantization_config: dict | None) -> WeightFormat | None:
    """The format for a config.json `quantization_config` (None: plain float weights)."""
    if not quantization_config:
        return None
    config = dict(quantization_config) if isinstance(quantization_config, dict) else quantization_config.to_dict()
    method = str(config.get("quant_method", "")).lower()
    if method not in FORMATS:
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported; supported: "
                         f"{', '.join(sorted(FORMATS))}")
    return FORMATS[method](config)
