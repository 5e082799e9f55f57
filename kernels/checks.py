"""Argument checks run before every launch: a wrong shape, dtype or stride must fail loudly in
Python, never as a wrong answer or an illegal memory access on the GPU."""

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_tensor(t: torch.Tensor, name: str, ndim: int, dtypes=FLOAT_DTYPES, last_contiguous: bool = True) -> None:
    require(isinstance(t, torch.Tensor), f"{name} must be a tensor")
    require(t.dim() == ndim, f"{name} must have {ndim} dimensions; got shape {tuple(t.shape)}")
    require(t.dtype in dtypes, f"{name} must be one of {', '.join(map(str, dtypes))}; got {t.dtype}")
    if last_contiguous and t.numel():
        require(t.stride(-1) == 1, f"{name} must be contiguous in its last dimension; got strides {t.stride()}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    require(len(set(devices.values())) == 1, f"tensors must share one device; got {devices}")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    # NOTE: float32 inputs stay exact (no TF32), so float32 runs can be compared tightly.
    return "ieee" if dtype == torch.float32 else "tf32"
