"""Memory modes: 4-bit text encoders, CPU offload of the parts used once per call, memory accounting.

    t5 = load_w4a16(T5, "t5xxl_fp16.safetensors", device="cuda", dtype=torch.bfloat16)   # ~2.7 GB, not 9.5
    with CPUOffload(t5, "cuda") as t5_on_gpu:    # weights lent to the GPU for the block, then dropped there
        hidden = t5_on_gpu(ids)

A FLUX generation uses the text encoders once at the start and the VAE once at the end, while the DiT runs
every step; keeping only the DiT resident (`Flux.from_pretrained(..., offload="model")`) with T5 in 4-bit
weights aims at a 1024x1024 FLUX.1-dev generation with the W4A4 DiT under 10 GiB of GPU memory (weights: DiT
~6.5 GiB resident in the kernels' layout, one copy: see native.prepare_model_; then T5 ~2.7 GiB or the VAE
lent one at a time); `python -m nunchaku_lite.bench model` measures each mode's peak.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn

from .quant.modules import W4A16Linear


def module_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, plus the kernels' cached prepared copies of
    unconverted quantized layers (`_native_prepared`; a layer converted by native.prepare_model_ holds its
    prepared tensors as buffers). Tensors sharing storage are counted once."""
    seen, total = set(), 0
    tensors = list(module.parameters()) + list(module.buffers())
    for m in module.modules():
        cached = m.__dict__.get("_native_prepared")
        if cached is not None:
            tensors += [t for t in vars(cached[1]).values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        key = (t.device, t.untyped_storage().data_ptr()) if not t.is_meta else id(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes() if not t.is_meta else t.numel() * t.element_size()
    return total


def _w4a16_from_tensors(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> W4A16Linear:
    """A W4A16Linear on weight's device from a dense weight [N, K] (quantized in float32 there)."""
    n, k = weight.shape
    with torch.device("meta"):
        dense = nn.Linear(k, n, bias=bias is not None)
    dense.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        dense.bias = nn.Parameter(bias, requires_grad=False)
    with warnings.catch_warnings():  # tiny test models have K < 64: padding is expected there, not news
        warnings.simplefilter("ignore", UserWarning)
        return W4A16Linear.from_linear(dense, dtype=dtype)


def _linear_names(module: nn.Module, select) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and select(n)]


def quantize_w4a16_(module: nn.Module, select=lambda name: True) -> nn.Module:
    """Replace every nn.Linear of `module` whose name passes `select` by a W4A16Linear, in place, one layer
    at a time on the layer's own device (so peak memory is the model plus one float32 weight). Returns module."""
    for name in _linear_names(module, select):
        lin = module.get_submodule(name)
        dtype = lin.weight.dtype if lin.weight.dtype.is_floating_point else torch.bfloat16
        q = _w4a16_from_tensors(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), dtype)
        module.set_submodule(name, q)
        del lin
    return module


def load_w4a16(kind, path, device="cpu", dtype=None, config=None, select=lambda name: True,
               work_device=None) -> nn.Module:
    """Load a model of `kind` (nunchaku_lite.loading.T5 or CLIP) with its linears in 4-bit weights.

    Streams the checkpoint like the 16-bit loader (meta build, one tensor at a time), but each selected
    linear's weight is quantized as soon as it arrives on `work_device` (default `device`; e.g. the GPU for a
    model that will live in CPU memory) and only the 4-bit copy is kept, on `device`: a full 16-bit model
    never exists on either. Peak memory: the 4-bit model plus one float32 weight.
    dtype: the activations' and the remaining tensors' dtype (default: the checkpoint's, float8 -> bfloat16).
    """
    from pathlib import Path

    from .loading import Checkpoint, build_on_meta, materialize_leftovers
    from .loading.options import resolve_config, resolve_device, resolve_dtype

    device = resolve_device(device) if device is not None else torch.device("cpu")
    work = resolve_device(work_device, "work_device") if work_device is not None else device
    dtype, config, path = resolve_dtype(dtype), resolve_config(config), Path(path)
    with Checkpoint.open(path) as ckpt:
        module, plan = build_on_meta(kind, ckpt, path, config)
        target = dtype if dtype is not None else ckpt.float_dtype()

        def tensor(key: str, where=device) -> torch.Tensor:
            build = plan.sources[key][1]
            return build(lambda k: ckpt.get(k, device=where, dtype=target))

        linears = _linear_names(module, select)
        for name in linears:
            bias_key = f"{name}.bias"
            bias = tensor(bias_key, work) if bias_key in plan.sources else None
            q = _w4a16_from_tensors(tensor(f"{name}.weight", work), bias, target)
            module.set_submodule(name, q.to(device))
        quantized = {f"{n}.{leaf}" for n in linears for leaf in ("weight", "bias")}
        rest = {k: tensor(k) for k in plan.sources if k not in quantized}
        module.load_state_dict(rest, strict=False, assign=True)
    materialize_leftovers(module, device, target, kind.name)
    return module.eval()


def load_t5_w4a16(path, device="cpu", dtype=None, config=None, work_device=None) -> nn.Module:
    """T5 encoder with every block linear in W4A16 (the embedding table and norms keep `dtype`); see load_w4a16."""
    from .loading import T5
    return load_w4a16(T5, path, device, dtype, config, work_device=work_device)


class CPUOffload:
    """Keeps a module's weights in CPU memory and lends them to `device` inside a `with` block.

    The CPU copies are pinned (when CUDA is present) so the upload runs at full PCIe speed, and since
    inference never changes the weights, leaving the block just drops the device copies: nothing is copied
    back. Device-side caches that kernels keep on modules (`_native_prepared`) are dropped with them.
    Tied tensors stay tied. With a CPU `device` the block is a no-op. Re-entrant: nested blocks upload once.
    """

    def __init__(self, module: nn.Module, device, pin: bool | None = None):
        self.module, self.device, self.depth = module, torch.device(device), 0
        module.to("cpu")
        pin = torch.cuda.is_available() and self.device.type == "cuda" if pin is None else pin
        self.slots = []  # (owner module, "_parameters" | "_buffers", name, CPU tensor or Parameter)
        copies = {}  # id(original) -> its CPU copy, wrapped like the original: tied tensors stay one object
        for owner in module.modules():
            for store in ("_parameters", "_buffers"):
                for name, t in getattr(owner, store).items():
                    if t is not None:
                        if id(t) not in copies:
                            copies[id(t)] = _like(t, t.detach().pin_memory() if pin else t.detach())
                        self.slots.append((owner, store, name, copies[id(t)]))
        self._place(lambda cpu: cpu)

    def _place(self, make):
        """Put make(cpu copy) in every slot, once per distinct tensor."""
        made = {}
        for owner, store, name, cpu in self.slots:
            if id(cpu) not in made:
                made[id(cpu)] = make(cpu)
            getattr(owner, store)[name] = made[id(cpu)]

    @property
    def lent(self) -> bool:
        return self.depth > 0

    def __enter__(self) -> nn.Module:
        self.depth += 1
        if self.depth == 1 and self.device.type != "cpu":
            self._place(lambda cpu: _like(cpu, cpu.detach().to(self.device, non_blocking=True)))
        return self.module

    def __exit__(self, *exc):
        self.depth -= 1
        if self.depth == 0 and self.device.type != "cpu":
            self._place(lambda cpu: cpu)
            for owner in self.module.modules():
                owner.__dict__.pop("_native_prepared", None)
        return False


def _like(original: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t wrapped as a frozen nn.Parameter when `original` is a parameter, else t."""
    return nn.Parameter(t, requires_grad=False) if isinstance(original, nn.Parameter) else t


@contextmanager
def on_device(module: nn.Module, offload: CPUOffload | None):
    """`with on_device(m, offload) as m:` lends m's weights to the GPU when it is offloaded; else m as is."""
    if offload is None:
        yield module
    else:
        with offload as m:
            yield m
