"""Shared fixtures. Golden vectors live in ../shared (beside the checkout); tests that need them skip cleanly
when it is absent (a fresh clone has none). NUNCHAKU_LITE_SHARED overrides the location."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("NUNCHAKU_LITE_SHARED", REPO.parent / "shared"))


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
