"""FLUX autoencoder checkpoints -> `models.vae.AutoEncoder` names (BFL `ae.safetensors` keys).

Two public layouts exist:
  * BFL / LDM (`ae.safetensors`): already our names, optionally under a `first_stage_model.` or `vae.` prefix
    (all-in-one checkpoints; other keys are then ignored);
  * diffusers `AutoencoderKL` (`vae/diffusion_pytorch_model.safetensors`): `down_blocks.i.resnets.j`,
    `mid_block.attentions.0.to_q` (linear [C, C] instead of a 1x1 conv), `conv_norm_out`, `conv_shortcut`, and
    decoder `up_blocks` numbered from the LOWEST resolution (diffusers up_blocks.k == BFL decoder.up.{n-1-k}).

The conversion is a plan computed from key names alone, so a loader can stream tensors one at a time:

    layout, plan = plan_vae_keys(keys)                  # {native_key: (source_key, op)}
    params = params_from_shapes(native_shapes(shapes))  # or params_from_config(config_dict)
    check_shapes(native_shapes(shapes), params, "ae.safetensors")
    tensor = convert_tensor(file.get_tensor(source_key), op)
"""
import re
from collections.abc import Iterable, Mapping

import torch

from ..models.vae import AutoEncoder, AutoEncoderParams

# Prefixes under which a VAE appears inside bigger checkpoints (LDM/SD-style all-in-one files, ComfyUI).
_PREFIXES = ("first_stage_model.", "vae.")

# diffusers attention names -> BFL; `query/key/value/proj_attn` is the pre-0.14 diffusers spelling.
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
         "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_RESNET = {"conv_shortcut": "nin_shortcut"}


def _strip_prefix(keys: list[str]) -> tuple[str, list[str]]:
    """Return (prefix, keys that carry it) when the VAE sits under a known prefix, else ('', keys)."""
    for prefix in _PREFIXES:
        inner = [k for k in keys if k.startswith(prefix + "encoder.") or k.startswith(prefix + "decoder.")]
        if inner:
            return prefix, inner
    return "", keys


def detect_layout(keys: Iterable[str]) -> str:
    """'diffusers' or 'bfl' from key names; ValueError when the keys look like neither."""
    keys = list(keys)
    prefix, inner = _strip_prefix(keys)
    inner = [k[len(prefix):] for k in inner]
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in inner):
        return "diffusers"
    if any(k.startswith(("encoder.", "decoder.")) for k in inner):
        return "bfl"
    sample = ", ".join(sorted(keys)[:5]) or "(no keys)"
    raise ValueError(f"not a FLUX autoencoder checkpoint: no `encoder.*`/`decoder.*` keys (first keys: {sample})")


def _diffusers_to_bfl(key: str, num_levels: int) -> tuple[str, str] | None:
    """One diffusers AutoencoderKL key -> (BFL key, op); None for keys that have no BFL counterpart."""
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return None
    op = "copy"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", rest):
        kind, level, j, name, leaf = m.groups()
        level = int(level) if kind == "down" else num_levels - 1 - int(level)
        rest = f"{kind}.{level}.block.{j}.{_RESNET.get(name, name)}.{leaf}"
    elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.(weight|bias)", rest):
        kind, level, _, leaf = m.groups()
        level = int(level) if kind == "down" else num_levels - 1 - int(level)
        rest = f"{kind}.{level}.{kind}sample.conv.{leaf}"
    elif m := re.fullmatch(r"mid_block\.resnets\.([01])\.(\w+)\.(weight|bias)", rest):
        j, name, leaf = m.groups()
        rest = f"mid.block_{int(j) + 1}.{_RESNET.get(name, name)}.{leaf}"
    elif m := re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)"
                           r"\.(weight|bias)", rest):
        name, leaf = m.groups()
        rest = f"mid.attn_1.{_ATTN[name]}.{leaf}"
        if leaf == "weight" and name != "group_norm":
            op = "to_conv1x1"  # diffusers stores the 1x1 convs as linear weights [C, C]
    elif m := re.fullmatch(r"conv_norm_out\.(weight|bias)", rest):
        rest = f"norm_out.{m.group(1)}"
    elif not re.fullmatch(r"conv_(in|out)\.(weight|bias)", rest):
        return None
    return f"{part}.{rest}", op


def plan_vae_keys(keys: Iterable[str]) -> tuple[str, dict[str, tuple[str, str]]]:
    """Checkpoint keys -> (layout, {native_key: (source_key, op)}), op in {'copy', 'to_conv1x1'}.

    Only key names are used. Keys that cannot belong to the autoencoder raise ValueError naming them
    (`quant_conv` / `post_quant_conv` of non-FLUX VAEs included) — except keys outside a detected
    `first_stage_model.`/`vae.` prefix, which belong to other models of an all-in-one file and are skipped.
    Missing keys are found later by `check_shapes`.
    """
    keys = list(keys)
    layout = detect_layout(keys)
    prefix, inner = _strip_prefix(keys)
    plan, unexpected = {}, []
    if layout == "bfl":
        for k in inner:
            if k.startswith(prefix + "encoder.") or k.startswith(prefix + "decoder."):
                plan[k[len(prefix):]] = (k, "copy")
            else:
                unexpected.append(k)
    else:
        # The decoder's level count fixes the index reversal (diffusers up_blocks.0 == BFL up.{n-1}).
        levels = {int(m.group(1)) for k in inner if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k[len(prefix):]))}
        num_levels = max(levels) + 1 if levels else 0
        for k in inner:
            native = _diffusers_to_bfl(k[len(prefix):], num_levels)
            if native is None:
                unexpected.append(k)
            elif native[0] in plan:
                raise ValueError(f"VAE checkpoint has two keys for `{native[0]}`: {plan[native[0]][0]} and {k}")
            else:
                plan[native[0]] = (k, native[1])
    if unexpected:
        raise ValueError(f"unexpected keys for a FLUX autoencoder ({layout} layout): {_preview(unexpected)}"
                         + (" (quant_conv/post_quant_conv belong to SD-style VAEs; FLUX has none)"
                            if any("quant_conv" in k for k in unexpected) else ""))
    return layout, plan


def convert_tensor(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """Apply a plan op to one source tensor (a view where possible; no copy)."""
    if op == "copy":
        return tensor
    if op == "to_conv1x1":
        return tensor if tensor.ndim == 4 else tensor.reshape(*tensor.shape, *(1,) * (4 - tensor.ndim))
    raise ValueError(f"unknown VAE key-conversion op {op!r}")


def native_shapes(shapes: Mapping[str, Iterable[int]]) -> dict[str, tuple[int, ...]]:
    """{source_key: shape} of any layout -> {native_key: shape} as the converted tensors will have them."""
    _, plan = plan_vae_keys(shapes.keys())
    out = {}
    for native, (src, op) in plan.items():
        shape = tuple(int(d) for d in shapes[src])
        out[native] = shape + (1,) * (4 - len(shape)) if op == "to_conv1x1" and len(shape) < 4 else shape
    return out


def to_native_keys(state_dict_or_keys: Mapping[str, torch.Tensor] | Iterable[str]):
    """A state dict of either layout -> {native_key: tensor} (converted, not copied);
    an iterable of key names -> the plan {native_key: (source_key, op)} (as `plan_vae_keys`)."""
    if not isinstance(state_dict_or_keys, Mapping):
        return plan_vae_keys(state_dict_or_keys)[1]
    _, plan = plan_vae_keys(state_dict_or_keys.keys())
    return {native: convert_tensor(state_dict_or_keys[src], op) for native, (src, op) in plan.items()}


def params_from_config(config: Mapping) -> AutoEncoderParams:
    """AutoEncoderParams from BFL names (`ch`, `ch_mult`, `z_channels`, ...) or a diffusers AutoencoderKL config.

    Unknown keys are ignored; missing ones take the FLUX values. Settings FLUX's architecture cannot express
    (quant convs, other norm group counts or activations, no mid attention) raise ValueError.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"VAE config must be a dict, got {type(config).__name__}")
    d = AutoEncoderParams()
    if "block_out_channels" in config or "latent_channels" in config:  # diffusers AutoencoderKL
        for key, ok in (("use_quant_conv", False), ("use_post_quant_conv", False), ("norm_num_groups", 32),
                        ("act_fn", "silu"), ("mid_block_add_attention", True)):
            if key in config and config[key] != ok:
                raise ValueError(f"VAE config: {key}={config[key]!r} is not supported (the FLUX autoencoder has "
                                 f"{key}={ok!r})")
        try:
            return _params_from_diffusers(config, d)
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise ValueError(f"VAE config (diffusers AutoencoderKL names): bad value: {e}") from None
    names = AutoEncoderParams.__dataclass_fields__.keys()
    return AutoEncoderParams(**{k: v for k, v in config.items() if k in names})


def _params_from_diffusers(config: Mapping, d: AutoEncoderParams) -> AutoEncoderParams:
    """block_out_channels -> ch and ch_mult, layers_per_block -> num_res_blocks, latent_channels -> z_channels."""
    blocks = [int(c) for c in config.get("block_out_channels", [d.ch * m for m in d.ch_mult])]
    if not blocks or any(c % blocks[0] for c in blocks):
        raise ValueError(f"block_out_channels {blocks} must be multiples of the first entry")
    shift = config.get("shift_factor", d.shift_factor)
    return AutoEncoderParams(
        resolution=int(config.get("sample_size", d.resolution)),
        in_channels=int(config.get("in_channels", d.in_channels)),
        ch=blocks[0],
        out_ch=int(config.get("out_channels", d.out_ch)),
        ch_mult=tuple(c // blocks[0] for c in blocks),
        num_res_blocks=int(config.get("layers_per_block", d.num_res_blocks)),
        z_channels=int(config.get("latent_channels", d.z_channels)),
        scale_factor=float(config.get("scaling_factor", d.scale_factor)),
        shift_factor=0.0 if shift is None else float(shift),  # SD-style VAEs have none
    )


def params_from_shapes(shapes: Mapping[str, Iterable[int]], scale_factor: float | None = None,
                       shift_factor: float | None = None) -> AutoEncoderParams:
    """Infer the architecture from native tensor shapes (`native_shapes(...)` output).

    Channel counts, levels and resnets per level come from the shapes; scale/shift factors cannot be seen in
    weights and default to FLUX's 0.3611 / 0.1159 unless given.
    """
    s = {k: tuple(v) for k, v in shapes.items()}

    def need(key):
        if key not in s:
            raise ValueError(f"cannot infer VAE dimensions: missing key `{key}`")
        return s[key]

    d = AutoEncoderParams()
    ch = need("encoder.conv_in.weight")[0]
    levels = sorted({int(m.group(1)) for k in s if (m := re.match(r"encoder\.down\.(\d+)\.block\.", k))})
    if levels != list(range(len(levels))) or not levels:
        raise ValueError(f"cannot infer VAE dimensions: encoder levels {levels} are not 0..n-1")
    ch_mult = []
    for i in levels:
        width = need(f"encoder.down.{i}.block.0.conv1.weight")[0]
        if width % ch:
            raise ValueError(f"VAE: encoder.down.{i} width {width} is not a multiple of ch={ch}")
        ch_mult.append(width // ch)
    num_res = len({k.split(".")[4] for k in s if k.startswith("encoder.down.0.block.")})
    return AutoEncoderParams(
        in_channels=need("encoder.conv_in.weight")[1],
        ch=ch,
        out_ch=need("decoder.conv_out.weight")[0],
        ch_mult=tuple(ch_mult),
        num_res_blocks=num_res,
        z_channels=need("decoder.conv_in.weight")[1],
        scale_factor=d.scale_factor if scale_factor is None else scale_factor,
        shift_factor=d.shift_factor if shift_factor is None else shift_factor,
    )


def expected_shapes(params: AutoEncoderParams) -> dict[str, tuple[int, ...]]:
    """Native key -> shape of an AutoEncoder(params), built on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoEncoder(params)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_shapes(shapes: Mapping[str, Iterable[int]], params: AutoEncoderParams, source: str = "checkpoint") -> None:
    """Raise ValueError naming `source` and the keys when native `shapes` do not fit AutoEncoder(params)."""
    want = expected_shapes(params)
    have = {k: tuple(v) for k, v in shapes.items()}
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    wrong = [f"{k}: {list(have[k])} (expected {list(want[k])})" for k in want if k in have and have[k] != want[k]]
    problems = []
    if missing:
        problems.append(f"missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_preview(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_preview(wrong)}")
    if problems:
        raise ValueError(f"{source}: does not match the autoencoder config {params}: " + "; ".join(problems))


def _preview(items: list[str], n: int = 8) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
