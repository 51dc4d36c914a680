"""SVDQuant W4A4 quantization of FLUX transformers.

    from nunchaku_lite.quant import quantize, save_quantized
    qdit = quantize(dit, calibration, method="svdquant", rank=32)   # in place; returns dit
    save_quantized(qdit, "flux-dev-svdq-r32.safetensors")            # read back with loading.load_transformer

Submodules: ops (reference arithmetic), modules (W4A4Linear, W4A16Linear), format (our checkpoint file),
nunchaku (import of Nunchaku's files), svdquant (the quantizer), evaluate (quality tables), cli.
"""
__all__ = ["quantize", "save_quantized", "QuantConfig", "METHODS"]


def __getattr__(name):
    # Lazy: importing nunchaku_lite.quant.ops (e.g. from the kernels) must not pull in the quantizer.
    if name in ("quantize", "QuantConfig", "METHODS"):
        from . import svdquant

        return getattr(svdquant, name)
    if name == "save_quantized":
        from .format import save_quantized

        return save_quantized
    raise AttributeError(f"module 'nunchaku_lite.quant' has no attribute {name!r}")
