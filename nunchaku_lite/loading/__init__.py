"""Component loaders for the checkpoint layouts FLUX users download (all local safetensors files).

    load_transformer(path)   FLUX DiT: diffusers `transformer/` folder (sharded or not), BFL
                             `flux1-dev.safetensors` (optionally `model.diffusion_model.`-prefixed), our
                             quantized format, or a Nunchaku SVDQuant checkpoint
    load_t5(path)            T5 encoder: `text_encoder_2/` folder or a single file (`t5xxl_fp16.safetensors`,
                             `t5xxl_fp8_e4m3fn.safetensors`: float8 weights are upcast)
    load_clip(path)          CLIP-L text model: `text_encoder/` folder or a single file (`clip_l.safetensors`)
    load_vae(path)           autoencoder: diffusers `vae/` folder or BFL `ae.safetensors`
    load_clip_tokenizer(folder), load_t5_tokenizer(folder, max_length)

Each model loader takes device= (default cpu), dtype= (default: the checkpoint's stored dtype, float8 ->
bfloat16) and config= (a dict or JSON file in BFL or diffusers/transformers names; default: the folder's
config.json, or for a single file X.safetensors a sibling X.json or the entry "X" of a sibling
bfl_params.json; without any, dimensions are inferred from tensor shapes, and what shapes cannot show takes
the real models' values). The module is built on the meta device and every
tensor is read once, converted straight to the target device and dtype, and assigned into place, so peak
memory is the model itself plus one tensor (no float32 detour, no second copy).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .files import Checkpoint, CheckpointError, PickleCheckpointError, read_json
from .options import resolve_config, resolve_device, resolve_dtype

__all__ = [
    "load_transformer", "load_t5", "load_clip", "load_vae", "load_clip_tokenizer", "load_t5_tokenizer",
    "Checkpoint", "CheckpointError", "PickleCheckpointError", "detect_transformer_format",
]


@dataclass
class Plan:
    """How to build each native tensor of a module from a checkpoint: {native_key: (source_keys, build)},
    where build(fetch) returns the tensor given fetch(source_key) -> tensor; plus native shapes."""
    layout: str
    sources: dict[str, tuple[tuple[str, ...], Callable]]
    shapes: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class ModelKind:
    """What the generic loader needs to know about one model family."""
    name: str                                         # for messages: "FLUX transformer"
    plan: Callable[[Checkpoint], Plan]
    params: Callable[[Plan, Checkpoint, dict | None], object]
    build: Callable[[object], nn.Module]


# --------------------------------------------------------------------------------------------------------------
# Per-model adapters over the key modules (each model owner's loading/keys_*.py)

def _dit_plan(ckpt: Checkpoint) -> Plan:
    from . import keys_dit
    layout, recipes = keys_dit.plan_dit_keys(ckpt.keys())
    sources = {k: (r.sources, (lambda fetch, r=r: keys_dit.build_tensor(r, fetch))) for k, r in recipes.items()}
    return Plan(layout, sources, keys_dit.native_shapes(recipes, ckpt.shapes()))


def _dit_params(plan: Plan, ckpt: Checkpoint, config: dict | None):
    from . import keys_dit
    # Shapes give every size; the config adds what no shape shows (RoPE axes_dim, theta).
    return keys_dit.params_from_shapes(plan.shapes, config)


def _dit_build(params) -> nn.Module:
    from ..models.dit import Flux
    return Flux(params)


def _renaming_plan(key_map: dict[str, str], ckpt: Checkpoint, layout: str) -> Plan:
    sources = {k: ((src,), (lambda fetch, src=src: fetch(src))) for k, src in key_map.items()}
    return Plan(layout, sources, {k: ckpt.shape(src) for k, src in key_map.items()})


def _t5_plan(ckpt: Checkpoint) -> Plan:
    from .keys_text import t5_key_map
    return _renaming_plan(t5_key_map(ckpt.keys()), ckpt, "hf")


def _t5_params(plan: Plan, ckpt: Checkpoint, config: dict | None):
    from .keys_text import t5_params_from_config, t5_params_from_shapes
    return t5_params_from_config(config) if config else t5_params_from_shapes(ckpt.shapes())


def _t5_build(params) -> nn.Module:
    from ..models.t5 import T5Encoder
    return T5Encoder(params)


def _clip_plan(ckpt: Checkpoint) -> Plan:
    from .keys_text import clip_key_map
    return _renaming_plan(clip_key_map(ckpt.keys()), ckpt, "hf")


def _clip_params(plan: Plan, ckpt: Checkpoint, config: dict | None):
    from .keys_text import clip_params_from_config, clip_params_from_shapes
    return clip_params_from_config(config) if config else clip_params_from_shapes(ckpt.shapes())


def _clip_build(params) -> nn.Module:
    from ..models.clip import CLIPTextModel
    return CLIPTextModel(params)


def _vae_plan(ckpt: Checkpoint) -> Plan:
    from . import keys_vae
    layout, recipes = keys_vae.plan_vae_keys(ckpt.keys())
    sources = {k: ((src,), (lambda fetch, src=src, op=op: keys_vae.convert_tensor(fetch(src), op)))
               for k, (src, op) in recipes.items()}
    return Plan(layout, sources, keys_vae.native_shapes(ckpt.shapes()))


_VAE_ARCH_KEYS = ("ch", "ch_mult", "num_res_blocks", "z_channels", "block_out_channels", "layers_per_block",
                  "latent_channels")


def _vae_params(plan: Plan, ckpt: Checkpoint, config: dict | None):
    from . import keys_vae
    if config and any(k in config for k in _VAE_ARCH_KEYS):
        return keys_vae.params_from_config(config)
    # No architecture in the config: shapes give it; only the latent scale/shift can come from the config.
    config = config or {}
    scale = config.get("scale_factor", config.get("scaling_factor"))
    shift = config.get("shift_factor")
    return keys_vae.params_from_shapes(plan.shapes, scale_factor=scale, shift_factor=shift)


def _vae_build(params) -> nn.Module:
    from ..models.vae import AutoEncoder
    return AutoEncoder(params)


DIT = ModelKind("FLUX transformer", _dit_plan, _dit_params, _dit_build)
T5 = ModelKind("T5 encoder", _t5_plan, _t5_params, _t5_build)
CLIP = ModelKind("CLIP text model", _clip_plan, _clip_params, _clip_build)
VAE = ModelKind("autoencoder", _vae_plan, _vae_params, _vae_build)


# --------------------------------------------------------------------------------------------------------------
# The generic loader

def _folder_config(path: Path) -> dict | None:
    """The config that travels with a checkpoint: a component folder's config.json; for a single file X.safetensors
    a sibling X.json, or the entry "X" of a sibling bfl_params.json (BFL params of several single files)."""
    if path.is_dir():
        return read_json(path / "config.json", what="config file") if (path / "config.json").is_file() else None
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.stem
    if (path.parent / f"{stem}.json").is_file():
        return read_json(path.parent / f"{stem}.json", what="config file")
    if (path.parent / "bfl_params.json").is_file():
        entry = read_json(path.parent / "bfl_params.json", what="config file").get(stem)
        return entry if isinstance(entry, dict) else None
    return None


def build_on_meta(kind: ModelKind, ckpt: Checkpoint, path: Path, config: dict | None) -> tuple[nn.Module, Plan]:
    """`kind`'s module built on the meta device (no memory, no init: every tensor is assigned from the file
    later) and its plan for `ckpt`, checked against each other before any tensor is read. config None: the one
    that travels with `path` (see _folder_config), else the shapes alone."""
    if config is None:
        config = _folder_config(path)
    try:
        plan = kind.plan(ckpt)
        params = kind.params(plan, ckpt, config)
        with torch.device("meta"):
            module = kind.build(params)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{ckpt.description}: cannot load as a {kind.name}: {_msg(e)}") from None
    _check_against_module(module, plan, ckpt, kind.name)
    return module, plan


def load_model(kind: ModelKind, path, device="cpu", dtype=None, config=None) -> nn.Module:
    """Build `kind`'s module on the meta device and stream the checkpoint at `path` into it (eval mode)."""
    device = resolve_device(device) if device is not None else torch.device("cpu")
    dtype = resolve_dtype(dtype)
    config = resolve_config(config)
    path = Path(path)
    with Checkpoint.open(path) as ckpt:
        module, plan = build_on_meta(kind, ckpt, path, config)
        target = dtype if dtype is not None else ckpt.float_dtype()

        def fetch(key: str) -> torch.Tensor:
            return ckpt.get(key, device=device, dtype=target)

        state = {}
        for key, (srcs, build) in plan.sources.items():
            t = build(fetch)
            if tuple(t.shape) != plan.shapes[key]:  # a recipe disagreeing with its own shape plan
                raise ValueError(f"{ckpt.file_of(srcs[0])}: key '{srcs[0]}' gives {kind.name} tensor '{key}' "
                                 f"of shape {tuple(t.shape)}, expected {plan.shapes[key]}")
            state[key] = t
        module.load_state_dict(state, strict=True, assign=True)
    materialize_leftovers(module, device, target, kind.name)
    return module.eval()


def _msg(e: Exception) -> str:
    return e.args[0] if isinstance(e, KeyError) and e.args else str(e)


def _check_against_module(module: nn.Module, plan: Plan, ckpt: Checkpoint, name: str) -> None:
    """Missing / unexpected / wrongly shaped keys, each named with the file it comes from (before any read)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}

    def origin(key: str) -> str:
        src = plan.sources[key][0][0]
        return f"'{src}' in {ckpt.file_of(src)}" if src != key else f"in {ckpt.file_of(src)}"

    missing = [k for k in expected if k not in plan.sources]
    unexpected = [k for k in plan.sources if k not in expected]
    wrong = [k for k in expected if k in plan.sources and plan.shapes[k] != expected[k]]
    if wrong:
        k = wrong[0]
        raise ValueError(f"{name} key '{k}' ({origin(k)}) has shape {plan.shapes[k]}, but the model built from "
                         f"the config needs {expected[k]}" + _more(wrong))
    if missing:
        raise ValueError(f"{ckpt.description}: {name} checkpoint ({plan.layout} layout) is missing key "
                         f"'{missing[0]}'" + _more(missing))
    if unexpected:
        k = unexpected[0]
        raise ValueError(f"{name}: unexpected key '{k}' ({origin(k)}) that the model has no place for"
                         + _more(unexpected))


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more: {', '.join(map(str, items[1:4]))}{', ...' if len(items) > 4 else ''})" \
        if len(items) > 1 else ""


def materialize_leftovers(module: nn.Module, device, dtype, name: str) -> None:
    """Non-persistent buffers are not in checkpoints, so after meta construction they are still on meta:
    a module may recompute them in `init_buffers(device, dtype)`; anything else left on meta is an error."""
    leftovers = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if leftovers and hasattr(module, "init_buffers"):
        module.init_buffers(device=device, dtype=dtype)
        leftovers = [n for n, t in module.named_buffers() if t.is_meta]
    if leftovers:
        raise RuntimeError(f"{name}: tensors not filled by the checkpoint: {', '.join(leftovers[:5])}")


# --------------------------------------------------------------------------------------------------------------
# Public loaders

def detect_transformer_format(path) -> str:
    """'nunchaku_lite' (our quantized file), 'nunchaku' (Nunchaku SVDQuant file or legacy folder) or '16bit'."""
    path = Path(path)
    if path.is_dir():
        if (path / "transformer_blocks.safetensors").is_file() and (path / "unquantized_layers.safetensors").is_file():
            return "nunchaku"
        if not any(path.glob("*.safetensors")):
            return "16bit"  # let the generic loader explain what is missing
    elif path.suffix.lower() != ".safetensors" or not path.is_file():
        return "16bit"
    with Checkpoint.open(path) as ckpt:
        meta = ckpt.metadata
        if meta.get("format", "").startswith("nunchaku_lite"):
            return "nunchaku_lite"
        if meta.get("model_class", "").startswith("Nunchaku") or "quantization_config" in meta:
            return "nunchaku"
        if any(k.endswith(".qweight") for k in ckpt.keys()):
            # Nunchaku names its fused linears qkv_proj / mlp_fc1; ours keeps BFL module paths.
            nunchaku_names = any(".qkv_proj." in k or ".mlp_fc1." in k for k in ckpt.keys())
            return "nunchaku" if nunchaku_names else "nunchaku_lite"
    return "16bit"


def load_transformer(path, device="cpu", dtype=None, config=None, **kwargs) -> nn.Module:
    """FLUX DiT (`models.dit.Flux`, called as dit(img, img_ids, txt, txt_ids, timesteps, y, guidance)).

    Quantized checkpoints (ours, or Nunchaku's) are detected and handed to the quant loaders; extra keyword
    arguments such as act_quant=False are passed through to them.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"transformer checkpoint not found: {path}")
    fmt = detect_transformer_format(path)
    if fmt == "16bit":
        if kwargs:
            raise TypeError(f"load_transformer: unexpected arguments {sorted(kwargs)} for a 16-bit checkpoint "
                            f"({path})")
        return load_model(DIT, path, device, dtype, config)
    device = resolve_device(device) if device is not None else torch.device("cpu")
    dtype = resolve_dtype(dtype)
    is_legacy_folder = path.is_dir() and (path / "transformer_blocks.safetensors").is_file()
    if path.is_dir() and not is_legacy_folder:  # a component folder holding one quantized file
        with Checkpoint.open(path) as ckpt:
            if len(ckpt.files) != 1:
                raise CheckpointError(f"{path}: expected one quantized safetensors file, found "
                                      f"{', '.join(f.name for f in ckpt.files)}")
            path = ckpt.files[0]
    if fmt == "nunchaku_lite":
        from ..quant.format import load_quantized_transformer
        return load_quantized_transformer(path, device=device, dtype=dtype, **kwargs)
    try:
        from ..quant.nunchaku import load_nunchaku_transformer
    except ImportError:
        raise NotImplementedError(f"{path} is a Nunchaku SVDQuant checkpoint, but the Nunchaku importer "
                                  "(nunchaku_lite.quant.nunchaku) is not available in this build") from None
    return load_nunchaku_transformer(path, device=device, dtype=dtype, **kwargs)


def load_t5(path, device="cpu", dtype=None, config=None) -> nn.Module:
    """T5 v1.1 encoder (`models.t5.T5Encoder`): t5(input_ids) -> last hidden state."""
    return load_model(T5, path, device, dtype, config)


def load_clip(path, device="cpu", dtype=None, config=None) -> nn.Module:
    """CLIP text model (`models.clip.CLIPTextModel`): clip(input_ids) -> (last_hidden_state, pooled)."""
    return load_model(CLIP, path, device, dtype, config)


def load_vae(path, device="cpu", dtype=None, config=None) -> nn.Module:
    """FLUX autoencoder (`models.vae.AutoEncoder`): decode(latent) -> image in [-1, 1], encode(image) -> latent."""
    return load_model(VAE, path, device, dtype, config)


def load_clip_tokenizer(folder, max_length: int = 77):
    """CLIP tokenizer from a folder with vocab.json + merges.txt (or tokenizer.json)."""
    from ..tokenizers import load_clip_tokenizer as load
    return load(folder, max_length)


def load_t5_tokenizer(folder, max_length: int = 512):
    """T5 tokenizer from a folder with spiece.model (or tokenizer.json); 256 for schnell, 512 for dev."""
    from ..tokenizers import load_t5_tokenizer as load
    return load(folder, max_length)
