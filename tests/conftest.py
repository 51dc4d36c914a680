"""Shared fixtures. Golden vectors live in ../shared (beside the checkout); tests that need them skip cleanly
when it is absent (a fresh clone has none). NUNCHAKU_LITE_SHARED overrides the location."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("NUNCHAKU_LITE_SHARED", REPO.parent / "shared"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 on the CPU (kernel and fused-path checks)."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def random_w4a4_layer(n: int, k: int, rank: int, gen: torch.Generator, dtype=torch.bfloat16):
    """Random canonical W4A4 layer tensors for kernel tests:
    (qweight, wscales, lora_down, lora_up, bias, smooth); lora_* are None for rank 0."""
    from nunchaku_lite.quant import ops
    codes = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    wscales = (torch.rand(n, k // 64, generator=gen) * 0.02 + 1e-3).to(torch.bfloat16)
    lora_down = (torch.randn(rank, k, generator=gen) / k ** 0.5).to(dtype) if rank else None
    lora_up = (torch.randn(n, rank, generator=gen) * 0.1).to(dtype) if rank else None
    bias = torch.randn(n, generator=gen).to(dtype)
    smooth = torch.rand(k, generator=gen) * 2 + 0.25
    return ops.pack_int4(codes), wscales, lora_down, lora_up, bias, smooth


def reciprocal_boundary_group():
    """One 64-wide group whose codes tell the quantizer's roundings apart: x = ones [1, 64] (exact in bf16 and
    fp16) and smooth [64] float32 chosen so that xs = x * RN(1/smooth) hits chosen float32 values next to the
    rounding boundaries (n + 1/2) * scale. Returns (x, smooth, codes) with codes int8 [1, 64] by the reference
    semantics, rint(RN(xs * RN(1/scale))); the group holds values where dividing by the scale, and where one
    fused multiply-add rounding (rint(xs * RN(1/scale)) exactly), give other codes."""
    import numpy as np
    f32 = np.float32

    def smooth_for(v):  # a float32 smooth with RN(1 / smooth) == v
        c = f32(1.0 / float(v))
        for d in range(64):
            for cand in (c, np.nextafter(c, f32(np.inf)), np.nextafter(c, f32(0))):
                if f32(1) / cand == v:
                    return cand
            c = np.nextafter(c, f32(np.inf) if f32(1) / c > v else f32(0))
        raise AssertionError(f"no float32 smooth for {v}")

    for amax in np.linspace(7.0, 7.5, 201, dtype=np.float32)[1:]:
        s = amax / f32(7)
        r = f32(1) / s
        div, fma = [], []
        for n in range(-7, 7):
            c = f32((n + 0.5) * float(s))
            for _ in range(8):
                c = np.nextafter(c, f32(-np.inf))
            for _ in range(17):
                by_mul = np.rint(c * r)
                if np.rint(c / s) != by_mul and len(div) < 20:
                    div.append(c)
                if np.rint(float(c) * float(r)) != by_mul and len(fma) < 20:  # float64: the exact product
                    fma.append(c)
                c = np.nextafter(c, f32(np.inf))
        if div and fma:
            vals = [amax] + div + fma
            vals = np.array((vals + [f32(0.25)] * 64)[:64], dtype=f32)
            smooth = np.array([smooth_for(v) for v in vals], dtype=f32)
            xs = f32(1) * (f32(1) / smooth)
            codes = np.clip(np.rint(xs * r), -8, 7).astype(np.int8)
            return torch.ones(1, 64), torch.from_numpy(smooth), torch.from_numpy(codes).view(1, 64)
    raise AssertionError("no group found")


def shared_path(*parts) -> Path:
    """Path inside ../shared, or skip the calling test when it is not there."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared material not found: {p}")
    return p


@pytest.fixture
def golden():
    """Return a function golden('dit', 'dev', 'inputs.safetensors') -> Path (skips when absent)."""
    return lambda *parts: shared_path("golden", *parts)


@pytest.fixture
def tokenizer_files():
    return lambda *parts: shared_path("tokenizers", *parts)


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def golden_pipe():
    """The golden tiny schnell pipeline (diffusers layout) on CPU, float32; one instance per test module, so a
    module may change it (offload, quantized parts) without affecting other modules."""
    from nunchaku_lite import Flux

    return Flux.from_pretrained(shared_path("golden", "pipeline"), device="cpu")
