"""Checkpoint layouts of the FLUX DiT -> our (BFL) parameter names, and FluxParams from configs or shapes.

Pure functions, no file IO. Layouts:
  "bfl"           flux1-dev.safetensors / flux1-schnell.safetensors: keys are already ours;
  "bfl_prefixed"  the same with every key under `model.diffusion_model.` (ComfyUI-style repacks);
  "diffusers"     FluxTransformer2DModel (transformer/ folder): separate q/k/v, renamed modules, and the final
                  layer's modulation stored [scale; shift] instead of [shift; scale].
`plan_dit_keys(keys)` returns, per native key, a Recipe naming its source keys and how to combine them, so a
loader can fetch tensors one native tensor at a time (`build_tensor(recipe, fetch)`).
"""
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.dit import Flux, FluxParams

BFL_PREFIX = "model.diffusion_model."
OPS = ("copy", "cat0", "swap_halves0")


@dataclass(frozen=True)
class Recipe:
    """How to build one native tensor: `copy` sources[0], `cat0` the sources along dim 0, or `swap_halves0`
    (exchange the two halves along dim 0 of sources[0])."""

    sources: tuple[str, ...]
    op: str = "copy"


def build_tensor(recipe: Recipe, fetch: Callable[[str], Tensor]) -> Tensor:
    """Materialise one native tensor; fetch(source_key) returns a source tensor."""
    if recipe.op == "copy":
        return fetch(recipe.sources[0])
    if recipe.op == "cat0":
        return torch.cat([fetch(k) for k in recipe.sources], dim=0)
    if recipe.op == "swap_halves0":
        first, second = fetch(recipe.sources[0]).chunk(2, dim=0)
        return torch.cat([second, first], dim=0)
    raise ValueError(f"unknown recipe op {recipe.op!r} for {recipe.sources}")


def recipe_shape(recipe: Recipe, shapes: Mapping[str, tuple]) -> tuple:
    """Shape of the native tensor a recipe builds, from the source shapes (no tensor is read)."""
    first = tuple(shapes[recipe.sources[0]])
    if recipe.op == "cat0":
        return (sum(shapes[k][0] for k in recipe.sources),) + first[1:]
    return first


# ---------------------------------------------------------------------------------------------------------
# Layout detection and key plans


def detect_dit_layout(keys: Iterable[str]) -> str:
    """'bfl', 'bfl_prefixed' or 'diffusers'; ValueError for anything else."""
    keys = list(keys)
    if any(k.startswith(BFL_PREFIX) for k in keys):
        return "bfl_prefixed"
    if "img_in.weight" in keys or any(k.startswith("double_blocks.") for k in keys):
        return "bfl"
    if "x_embedder.weight" in keys or any(k.startswith("transformer_blocks.") for k in keys):
        return "diffusers"
    sample = ", ".join(sorted(keys)[:5])
    raise ValueError(f"not a FLUX transformer checkpoint (no img_in / x_embedder / double_blocks keys); keys: {sample}")


# diffusers name -> BFL name for plain renames; {i} is the block index (D: double block, S: single block)
D, S = "transformer_blocks.{i}.", "single_transformer_blocks.{i}."
_RENAMES = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    D + "norm1.linear": "double_blocks.{i}.img_mod.lin",
    D + "norm1_context.linear": "double_blocks.{i}.txt_mod.lin",
    D + "attn.to_out.0": "double_blocks.{i}.img_attn.proj",
    D + "attn.to_add_out": "double_blocks.{i}.txt_attn.proj",
    D + "ff.net.0.proj": "double_blocks.{i}.img_mlp.0",
    D + "ff.net.2": "double_blocks.{i}.img_mlp.2",
    D + "ff_context.net.0.proj": "double_blocks.{i}.txt_mlp.0",
    D + "ff_context.net.2": "double_blocks.{i}.txt_mlp.2",
    S + "norm.linear": "single_blocks.{i}.modulation.lin",
    S + "proj_out": "single_blocks.{i}.linear2",
}
# q/k norm gains: diffusers `<module>.weight` -> BFL `<module>.scale`
_NORMS = {
    D + "attn.norm_q": "double_blocks.{i}.img_attn.norm.query_norm",
    D + "attn.norm_k": "double_blocks.{i}.img_attn.norm.key_norm",
    D + "attn.norm_added_q": "double_blocks.{i}.txt_attn.norm.query_norm",
    D + "attn.norm_added_k": "double_blocks.{i}.txt_attn.norm.key_norm",
    S + "attn.norm_q": "single_blocks.{i}.norm.query_norm",
    S + "attn.norm_k": "single_blocks.{i}.norm.key_norm",
}
# fused BFL linears <- diffusers linears concatenated along the output dim, in this order
_FUSED = {
    "double_blocks.{i}.img_attn.qkv": (D + "attn.to_q", D + "attn.to_k", D + "attn.to_v"),
    "double_blocks.{i}.txt_attn.qkv": (D + "attn.add_q_proj", D + "attn.add_k_proj", D + "attn.add_v_proj"),
    "single_blocks.{i}.linear1": (S + "attn.to_q", S + "attn.to_k", S + "attn.to_v", S + "proj_mlp"),
}


def _block_indices(keys: Iterable[str], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def _first(what: str, keys: list[str]) -> str:
    """'<what> 'k0' (+N more)' for error messages."""
    return f"{what} {keys[0]!r}" + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")


def _diffusers_plan(keys: list[str]) -> dict[str, Recipe]:
    key_set = set(keys)
    blocks = {family: _block_indices(keys, family) for family in ("transformer_blocks", "single_transformer_blocks")}

    def instances(template: str) -> list[dict]:
        """Format arguments for every block index present (one empty set for top-level names)."""
        return [{"i": i} for i in blocks[template.split(".")[0]]] if "{i}" in template else [{}]

    plan: dict[str, Recipe] = {}
    for param in ("weight", "bias"):
        for src, dst in _RENAMES.items():
            for fmt in instances(src):
                if (key := f"{src.format(**fmt)}.{param}") in key_set:
                    plan[f"{dst.format(**fmt)}.{param}"] = Recipe((key,))
        for dst, srcs in _FUSED.items():
            for fmt in instances(srcs[0]):
                sources = tuple(f"{s.format(**fmt)}.{param}" for s in srcs)
                missing = [k for k in sources if k not in key_set]
                if len(missing) < len(sources):  # some present: all must be
                    if missing:
                        raise ValueError(f"diffusers FLUX checkpoint: {_first('missing key', missing)}, "
                                         f"needed for {dst.format(**fmt)}.{param}")
                    plan[f"{dst.format(**fmt)}.{param}"] = Recipe(sources, "cat0")
        if (key := f"norm_out.linear.{param}") in key_set:
            # diffusers' AdaLayerNormContinuous stores [scale; shift], BFL's LastLayer [shift; scale]
            plan[f"final_layer.adaLN_modulation.1.{param}"] = Recipe((key,), "swap_halves0")
    for src, dst in _NORMS.items():
        for fmt in instances(src):
            if (key := f"{src.format(**fmt)}.weight") in key_set:
                plan[f"{dst.format(**fmt)}.scale"] = Recipe((key,))

    unknown = sorted(key_set - {k for r in plan.values() for k in r.sources})
    if unknown:
        raise ValueError(f"diffusers FLUX checkpoint: {_first('unexpected key', unknown)}")
    return plan


def plan_dit_keys(keys: Iterable[str]) -> tuple[str, dict[str, Recipe]]:
    """(layout, {native_key: Recipe}) for the keys of a FLUX transformer checkpoint in any supported layout."""
    keys = list(keys)
    layout = detect_dit_layout(keys)
    if layout == "bfl":
        return layout, {k: Recipe((k,)) for k in keys}
    if layout == "bfl_prefixed":
        # keys outside the prefix (an all-in-one file's VAE / text encoders) are not the transformer's: skip them
        return layout, {k[len(BFL_PREFIX) :]: Recipe((k,)) for k in keys if k.startswith(BFL_PREFIX)}
    return layout, _diffusers_plan(keys)


def convert_dit_state_dict(state_dict: Mapping[str, Tensor]) -> tuple[str, dict[str, Tensor]]:
    """In-memory conversion of a whole state dict to native names: (layout, native_state_dict)."""
    layout, plan = plan_dit_keys(state_dict.keys())
    return layout, {k: build_tensor(r, state_dict.__getitem__) for k, r in plan.items()}


def native_shapes(plan: Mapping[str, Recipe], shapes: Mapping[str, tuple]) -> dict[str, tuple]:
    """Shapes of the native tensors of a plan, from the source checkpoint's key -> shape mapping."""
    return {k: recipe_shape(r, shapes) for k, r in plan.items()}


# ---------------------------------------------------------------------------------------------------------
# FluxParams from a config or from shapes

_BFL_FIELDS = set(FluxParams.__dataclass_fields__)


def params_from_config(config: Mapping) -> FluxParams:
    """FluxParams from BFL FluxParams names or a diffusers FluxTransformer2DModel config.json dict."""
    diffusers_names = ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads")
    if any(k in config for k in diffusers_names) or config.get("_class_name") == "FluxTransformer2DModel":
        required = ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                    "joint_attention_dim", "pooled_projection_dim")
        missing = [k for k in required if k not in config]
        if missing:
            raise ValueError(f"diffusers FLUX config lacks {missing}")
        if config.get("patch_size", 1) != 1:
            raise ValueError(f"diffusers FLUX config: patch_size {config['patch_size']} is not supported (FLUX uses 1)")
        in_channels = config.get("in_channels", 64)
        # diffusers fixes theta = 10000, mlp_ratio = 4 and qkv bias = True for FLUX
        params = FluxParams(
            in_channels=in_channels,
            out_channels=config.get("out_channels") or in_channels,
            vec_in_dim=config["pooled_projection_dim"],
            context_in_dim=config["joint_attention_dim"],
            hidden_size=config["num_attention_heads"] * config["attention_head_dim"],
            num_heads=config["num_attention_heads"],
            depth=config["num_layers"],
            depth_single_blocks=config["num_single_layers"],
            axes_dim=tuple(config.get("axes_dims_rope", (16, 56, 56))),
            guidance_embed=bool(config.get("guidance_embeds", False)),
        )
    else:
        unknown = sorted(k for k in config if k not in _BFL_FIELDS and not k.startswith("_"))
        if unknown:
            raise ValueError(f"FLUX config: unknown field {unknown[0]!r} (expected FluxParams or diffusers names)")
        fields = {k: v for k, v in config.items() if not k.startswith("_")}
        if "axes_dim" in fields:
            fields["axes_dim"] = tuple(fields["axes_dim"])
        params = FluxParams(**fields)
    _check_params(params)
    return params


def _check_params(p: FluxParams) -> None:
    if p.hidden_size % p.num_heads:
        raise ValueError(f"FLUX config: hidden_size {p.hidden_size} is not divisible by num_heads {p.num_heads}")
    if sum(p.axes_dim) != p.hidden_size // p.num_heads:
        head_dim = p.hidden_size // p.num_heads
        raise ValueError(f"FLUX config: sum(axes_dim) = {sum(p.axes_dim)} must equal the head dim {head_dim}")


def params_from_shapes(shapes: Mapping[str, tuple], config: Mapping | None = None) -> FluxParams:
    """Infer FluxParams from native key -> shape. The head dim comes from the q/k norm gains; axes_dim cannot be
    seen in any shape, so it defaults to real FLUX's (16, 56, 56) only for head dim 128 and otherwise must come
    from `config` (which, when given, fills any field that shapes cannot tell)."""

    def shape(key: str) -> tuple:
        if key not in shapes:
            raise ValueError(f"FLUX checkpoint: missing key {key!r}")
        return tuple(shapes[key])

    hidden, in_channels = shape("img_in.weight")
    # max index + 1, so a gap shows up later as a missing key rather than a shallower model
    depth = max(_block_indices(shapes, "double_blocks"), default=-1) + 1
    singles = max(_block_indices(shapes, "single_blocks"), default=-1) + 1
    first = "double_blocks.0.img_attn.norm.query_norm.scale" if depth else "single_blocks.0.norm.query_norm.scale"
    head_dim = shape(first)[0]
    # MLP width from biases: they keep their shape when a quantized format replaces the block weights
    if depth:
        mlp_hidden = shape("double_blocks.0.img_mlp.0.bias")[0]
    elif singles:
        mlp_hidden = shape("single_blocks.0.linear1.bias")[0] - 3 * hidden
    else:
        mlp_hidden = 4 * hidden
    given = params_from_config(config) if config else None
    if given is not None:
        axes_dim, theta = given.axes_dim, given.theta
    elif head_dim == 128:
        axes_dim, theta = (16, 56, 56), 10_000
    else:
        raise ValueError(f"FLUX checkpoint with head dim {head_dim}: pass a config giving axes_dim "
                         "(only real FLUX's head dim 128 has a known default)")
    params = FluxParams(
        in_channels=in_channels,
        out_channels=shape("final_layer.linear.weight")[0],
        vec_in_dim=shape("vector_in.in_layer.weight")[1],
        context_in_dim=shape("txt_in.weight")[1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=singles,
        axes_dim=tuple(axes_dim),
        theta=theta,
        qkv_bias=(not depth) or "double_blocks.0.img_attn.qkv.bias" in shapes,
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    )
    _check_params(params)
    return params


def expected_shapes(params: FluxParams) -> dict[str, tuple]:
    """Native key -> shape of Flux(params), computed on the meta device (no memory)."""
    with torch.device("meta"):
        model = Flux(params)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_shapes(params: FluxParams, shapes: Mapping[str, tuple]) -> None:
    """ValueError naming the first missing, unexpected or wrongly shaped native key."""
    expected = expected_shapes(params)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing:
        raise ValueError(f"FLUX checkpoint: {_first('missing key', missing)}")
    if unexpected:
        raise ValueError(f"FLUX checkpoint: {_first('unexpected key', unexpected)}")
    for k, s in expected.items():
        if tuple(shapes[k]) != s:
            raise ValueError(f"FLUX checkpoint: key {k!r} has shape {tuple(shapes[k])}, expected {s}")
