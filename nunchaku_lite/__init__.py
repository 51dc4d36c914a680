"""nunchaku_lite: a standalone 4-bit (SVDQuant W4A4) inference engine for FLUX.1 in plain PyTorch.

    from nunchaku_lite import Flux
    pipe = Flux.from_pretrained("path/to/FLUX.1-schnell", device="cuda", dtype=torch.bfloat16)
    images = pipe("a red circle on a blue background", seed=0)
"""
__version__ = "0.1.0"

__all__ = ["Flux", "__version__"]


def __getattr__(name):
    # Lazy so that `import nunchaku_lite.quant` etc. do not pay for the pipeline's imports.
    if name == "Flux":
        from .pipeline import Flux

        return Flux
    raise AttributeError(f"module 'nunchaku_lite' has no attribute {name!r}")
