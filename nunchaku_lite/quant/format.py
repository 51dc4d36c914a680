"""Our quantized FLUX transformer checkpoint: one safetensors file.

Tensors: the quantized model's state_dict as is: every quantized layer's buffers at `<BFL module path>.<buffer>`
(`double_blocks.0.img_attn.qkv.qweight`, `.wscales`, `.smooth`, `.lora_down`, `.lora_up`, `.bias`; composite
layers nest their parts: `single_blocks.0.linear2.parts.1.qweight`), plus the 16-bit weights left unquantized
(embedders, final layer, norms, and the modulation linears when kept 16-bit).

`__metadata__` (all strings):
    format          "nunchaku_lite.svdquant"
    format_version  "1"             (any other version is refused with a clear error)
    method          e.g. "svdquant", "naive", "smooth", "w4a16", "nunchaku-import"
    rank            the quantizer's rank (`quant_config["rank"]`), else the largest W4A4 low-rank rank
    group_size      "64"
    base_model      "dev" | "schnell"   (from guidance_embed)
    flux_params     JSON of FluxParams (BFL names)
    precision       JSON {linear path: "w4a4" | "w4a16" | "bf16" | "fp16" | "fp32"} for every linear of the DiT
    layers          JSON {path: layer config} of every quantized replacement (see modules.module_from_config;
                    a W4A4 layer with power-of-two activation scales carries "act_pow2": true)
    act_unsigned    JSON [paths of W4A4 layers with unsigned, shifted activations]
    quant_config    JSON of the model's `quant_config` attribute (quantizer settings), if any

Loading builds Flux on the meta device, swaps in the listed quantized layers, and assigns tensors read one at a
time straight to the target device, so 16-bit weights of quantized layers never exist in memory. Packed codes,
weight scales and smooth vectors keep their stored dtype (they are exact data); the other floating tensors
are cast to `dtype` when one is given.
"""
import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .modules import (ConcatOutputLinear, SplitInputLinear, W4A4Linear, W4A16Linear, module_from_config,
                      quantized_linears)

FORMAT = "nunchaku_lite.svdquant"
FORMAT_VERSION = "1"
_COMPOSITES = (W4A4Linear, W4A16Linear, SplitInputLinear, ConcatOutputLinear)
_EXACT_SUFFIXES = (".qweight", ".wscales", ".wzeros", ".smooth")  # never cast: they define the quantized values
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{path: module} of the outermost quantized replacements (composites count once, not their parts)."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, _COMPOSITES) and not any(name.startswith(p + ".") for p in found):
            found[name] = m
    return found


def _precision(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, str]:
    prec = {}
    for name, m in model.named_modules():
        if name in layers:
            prec[name] = "w4a16" if isinstance(m, W4A16Linear) else "w4a4"
        elif isinstance(m, nn.Linear) and not any(name.startswith(p + ".") for p in layers):
            prec[name] = _DTYPE_NAMES.get(m.weight.dtype, str(m.weight.dtype).replace("torch.", ""))
    return prec


def build_metadata(model: nn.Module, method: str | None = None) -> dict[str, str]:
    """The `__metadata__` strings describing `model` (a Flux with quantized layers swapped in)."""
    params = getattr(model, "params", None)
    if params is None or not dataclasses.is_dataclass(params):
        raise ValueError("save_quantized: the model has no FluxParams `.params`; pass the quantized Flux module")
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("save_quantized: the model has no quantized layers (run quantize() first)")
    qcfg = dict(getattr(model, "quant_config", None) or {})
    w4a4 = [(name, m) for name, m in quantized_linears(model) if isinstance(m, W4A4Linear)]
    ranks = [m.rank for _, m in w4a4]
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": str(method or qcfg.get("method", "svdquant")),
        "rank": str(max(ranks, default=0) if qcfg.get("rank") is None else qcfg["rank"]),
        "group_size": "64",
        "base_model": "dev" if params.guidance_embed else "schnell",
        "flux_params": json.dumps(dataclasses.asdict(params)),
        "precision": json.dumps(_precision(model, layers)),
        "layers": json.dumps({name: m.config() for name, m in layers.items()}),
        "act_unsigned": json.dumps([name for name, m in w4a4 if m.act_unsigned]),
    }
    if qcfg:
        meta["quant_config"] = json.dumps(qcfg, default=str)
    return meta


def save_quantized(model: nn.Module, path, method: str | None = None) -> Path:
    """Write `model` (a Flux with quantized layers) to one safetensors file, atomically (temp file + rename)."""
    path = Path(path)
    meta = build_metadata(model, method)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_metadata(path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (header only); {} when it has none."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})


def is_quantized_checkpoint(path) -> bool:
    """True if `path` is a single safetensors file in our quantized format (any version)."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        return read_metadata(path).get("format") == FORMAT
    except Exception:  # not a readable safetensors file: not ours; the generic loader reports the problem
        return False


def _check_header(path: Path, meta: dict[str, str]) -> None:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a nunchaku_lite quantized checkpoint (metadata format="
                         f"{meta.get('format')!r}, expected {FORMAT!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: quantized checkpoint format_version {version!r} is not supported by this "
                         f"nunchaku_lite (it reads version {FORMAT_VERSION!r}); re-quantize the model or use a "
                         "matching nunchaku_lite version")
    if meta.get("group_size", "64") != "64":
        raise ValueError(f"{path}: group_size {meta['group_size']} is not supported (only 64)")
    for key in ("flux_params", "layers"):
        if key not in meta:
            raise ValueError(f"{path}: metadata lacks {key!r}")


def build_quantized_flux(params, layers: dict[str, dict], act_quant: bool = True) -> nn.Module:
    """Flux(params) on the meta device with the quantized layers of `layers` ({path: config}) swapped in."""
    from ..models.dit import Flux

    with torch.device("meta"):
        model = Flux(params)
    for name, cfg in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantized layer {name!r} does not exist in this FLUX architecture") from None
        new = module_from_config(cfg, device="meta", act_quant=act_quant)
        if (getattr(old, "in_features", None), getattr(old, "out_features", None)) != \
                (new.in_features, new.out_features):
            raise ValueError(f"quantized layer {name!r} is {new.in_features}->{new.out_features} but the model "
                             f"expects {old.in_features}->{old.out_features}")
        model.set_submodule(name, new)
    return model


def load_tensors_into(model: nn.Module, tensors: dict, source: str) -> nn.Module:
    """load_state_dict(assign=True) with a clear error naming `source` for missing/unexpected keys."""
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: tensors do not match the model: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    ref = model.state_dict()
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(ref[k].shape):
            raise ValueError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(ref[k].shape)}")
    model.load_state_dict(tensors, strict=True, assign=True)
    return model


def _target(key: str, t: torch.Tensor, device, dtype) -> torch.Tensor:
    from ..loading.files import aligned

    if dtype is not None and t.is_floating_point() and not key.endswith(_EXACT_SUFFIXES):
        return aligned(t.to(device=device, dtype=dtype))
    return aligned(t.to(device=device))


def load_quantized_transformer(path, device=None, dtype: torch.dtype | None = None,
                               act_quant: bool = True) -> nn.Module:
    """Load a checkpoint written by save_quantized -> Flux with quantized layers, in eval mode.

    device: where tensors go (default CPU). dtype: cast the 16-bit weights, low-rank factors and biases
    (default: as stored); codes, weight scales and smooth vectors are kept exactly. act_quant=False runs the
    W4A4 layers with 16-bit activations (4-bit weights plus low-rank branch).
    """
    from ..loading.keys_dit import params_from_config

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quantized checkpoint not found: {path}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
        _check_header(path, meta)
        try:
            params = params_from_config(json.loads(meta["flux_params"]))
            layers = json.loads(meta["layers"])
            qcfg = json.loads(meta["quant_config"]) if "quant_config" in meta else {}
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path}: corrupt metadata ({e})") from None
        model = build_quantized_flux(params, layers, act_quant)
        tensors = {k: _target(k, f.get_tensor(k), device, dtype) for k in f.keys()}
    load_tensors_into(model, tensors, str(path))
    qcfg.setdefault("method", meta.get("method", "svdquant"))
    model.quant_config = qcfg
    return model.eval()
