"""Checking the `device=` / `dtype=` / `config=` arguments of the loaders and the pipeline."""
from __future__ import annotations

from pathlib import Path

import torch

from .files import read_json

DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_device(device, arg: str = "device") -> torch.device:
    """None -> cuda when available else cpu. Unknown or unavailable devices raise ValueError naming `arg`."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{arg}={device!r} is not a valid torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{arg}={device!r}: CUDA is not available on this machine (use device='cpu')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{arg}={device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type not in ("cpu", "meta"):
        raise ValueError(f"{arg}={device!r}: unsupported device type '{dev.type}' (use 'cpu' or 'cuda')")
    return dev


def resolve_dtype(dtype, arg: str = "dtype") -> torch.dtype | None:
    """None stays None (= the checkpoint's stored dtype); accepts torch dtypes and names like 'bf16'."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in DTYPE_NAMES:
            raise ValueError(f"{arg}={dtype!r} is not supported; use one of float32, bfloat16, float16")
        return DTYPE_NAMES[key]
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{arg}={dtype!r} is not supported; use one of torch.float32, torch.bfloat16, torch.float16")
    return dtype


def resolve_config(config, arg: str = "config") -> dict | None:
    """`config=` may be None, a dict, or the path of a JSON file."""
    if config is None or isinstance(config, dict):
        return config
    if isinstance(config, (str, Path)):
        return read_json(config, what=f"{arg} file")
    raise TypeError(f"{arg} must be a dict or the path of a JSON file, not {type(config).__name__}")
