"""Benchmarks: `python -m nunchaku_lite.bench kernels` (native W4A4 kernels vs torch bf16 / fp8 at FLUX shapes)."""
