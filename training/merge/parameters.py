"""mergekit's parameter values: a scalar, a gradient (a list of numbers interpolated across the
layers) or a list of `{filter, value}` entries, the first whose filter is a substring of the tensor
name winning (an entry without a filter matches every tensor).

Where a tensor sits along the gradient: layer l of L at t = l / (L − 1); tensors before the layers
(the embeddings) at t = 0, after them (final norm, lm_head) at t = 1.
"""

import math
import re

LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def position(name: str, num_layers: int) -> float:
    match = LAYER.match(name)
    if match:
        return int(match.group(1)) / max(1, num_layers - 1)
    return 0.0 if "embed_tokens" in name else 1.0


def resolve(value, name: str, t: float):
    """The value of one parameter for the tensor `name` at gradient position t."""
    if isinstance(value, (int, float, bool, str)) or value is None:
        return value
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        scaled = t * (len(value) - 1)
        low = min(int(math.floor(scaled)), len(value) - 1)
        high = min(low + 1, len(value) - 1)
        frac = scaled - low
        return (1 - frac) * value[low] + frac * value[high]
    if isinstance(value, list) and all(isinstance(v, dict) and "value" in v for v in value):
        for entry in value:
            if "filter" not in entry or entry["filter"] in name:
                return resolve(entry["value"], name, t)
        return None
    raise ValueError(f"a parameter must be a number, a list of numbers (a gradient) or a list of "
                     f"{{filter, value}} entries; got {value!r}")
