"""Checkpoint names and configs of the text encoders -> our T5Encoder / CLIPTextModel.

Both models use HF names already, so conversion is renaming only: strip whatever prefix a file puts in
front of the model (`text_model.` in transformers-4 CLIP files, `text_encoders.t5xxl.transformer.` in
ComfyUI bundles, ...), and drop tensors the encoder does not use (T5 decoder/lm_head, the tied
`encoder.embed_tokens` copy, CLIP `position_ids`, projection and vision tower).

`*_key_map(keys)` -> {native key: checkpoint key} lets a loader stream tensors one at a time;
`*_to_native_keys(state_dict)` applies the same renaming to an in-memory state dict.
`*_params_from_config(dict)` reads HF config.json dicts; `*_params_from_shapes(shapes)` infers a config
from tensor shapes alone (for single-file checkpoints shipped without a config).
"""
import re
from collections.abc import Iterable, Mapping

from ..models.clip import CLIPConfig
from ..models.t5 import T5Config

__all__ = [
    "t5_key_map", "t5_to_native_keys", "t5_params_from_config", "t5_params_from_shapes",
    "clip_key_map", "clip_to_native_keys", "clip_params_from_config", "clip_params_from_shapes",
]

T5_ANCHOR = "encoder.block.0.layer.0.SelfAttention.q.weight"
CLIP_ANCHOR = "embeddings.token_embedding.weight"
# Real-model head counts for widths whose head count the shapes cannot tell (CLIP heads are 64 wide).
CLIP_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20}


def _find_prefix(keys: list[str], anchor: str, model: str) -> str:
    """The text in front of `anchor` in this file ("" for a plain HF file). Errors if the anchor is absent."""
    prefixes = sorted({k[: -len(anchor)] for k in keys if k.endswith(anchor) and (k == anchor or k[-len(anchor) - 1] == ".")},
                      key=len)
    if not prefixes:
        sample = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
        raise ValueError(f"not a {model} checkpoint: no key ending in '{anchor}' (keys: {sample or 'none'})")
    return prefixes[0]


def _keys_of(state_dict_or_keys) -> list[str]:
    return list(state_dict_or_keys.keys() if isinstance(state_dict_or_keys, Mapping) else state_dict_or_keys)


def t5_key_map(keys: Iterable[str]) -> dict[str, str]:
    """{T5Encoder key: checkpoint key} for an HF T5EncoderModel / T5ForConditionalGeneration file or a
    prefixed copy of one."""
    keys = list(keys)
    prefix = _find_prefix(keys, T5_ANCHOR, "T5")
    scaled = [k for k in keys if k.endswith((".scale_weight", ".scale_input")) or k.endswith("scaled_fp8")]
    if scaled:
        raise ValueError(f"T5 checkpoint uses per-tensor scaled fp8 ('{scaled[0]}'), which is not supported; "
                         "use an unscaled bf16/fp16/fp8 file (e.g. t5xxl_fp8_e4m3fn.safetensors)")
    out = {}
    for key in keys:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name.startswith(("decoder.", "lm_head.")):
            continue  # encoder-decoder file: FLUX uses the encoder only
        if name == "encoder.embed_tokens.weight":
            continue  # tied copy of shared.weight; used below only when shared.weight is missing
        out[name] = key
    if "shared.weight" not in out:
        tied = prefix + "encoder.embed_tokens.weight"
        if tied not in keys:
            raise ValueError("T5 checkpoint has neither 'shared.weight' nor 'encoder.embed_tokens.weight' "
                             "(the token embedding)")
        out["shared.weight"] = tied
    return out


def clip_key_map(keys: Iterable[str]) -> dict[str, str]:
    """{CLIPTextModel key: checkpoint key} for an HF CLIPTextModel file (with or without `text_model.`),
    a full CLIPModel file (text tower only), or a prefixed copy of either."""
    keys = list(keys)
    prefix = _find_prefix(keys, CLIP_ANCHOR, "CLIP text")
    unused = ("embeddings.position_ids",)  # buffer some transformers-4 files still carry
    return {k[len(prefix):]: k for k in keys if k.startswith(prefix) and k[len(prefix):] not in unused}


def _rename(state_dict_or_keys, key_map):
    mapping = key_map(_keys_of(state_dict_or_keys))
    if isinstance(state_dict_or_keys, Mapping):
        return {name: state_dict_or_keys[src] for name, src in mapping.items()}
    return list(mapping)


def t5_to_native_keys(state_dict_or_keys):
    """A state dict renamed to T5Encoder keys (same tensors), or, given keys only, the list of native keys."""
    return _rename(state_dict_or_keys, t5_key_map)


def clip_to_native_keys(state_dict_or_keys):
    """A state dict renamed to CLIPTextModel keys (same tensors), or, given keys only, the native keys."""
    return _rename(state_dict_or_keys, clip_key_map)


def t5_params_from_config(config: dict) -> T5Config:
    return T5Config.from_dict(config)


def clip_params_from_config(config: dict) -> CLIPConfig:
    return CLIPConfig.from_dict(config)


def _native_shapes(shapes: Mapping, key_map) -> dict[str, tuple]:
    return {name: tuple(shapes[src]) for name, src in key_map(list(shapes)).items()}


def _count_layers(names, pattern: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
    if found != set(range(len(found))):
        raise ValueError(f"layer indices are not contiguous from 0: {sorted(found)}")
    return len(found)


def _shape(shapes: dict, key: str, model: str) -> tuple:
    if key not in shapes:
        raise ValueError(f"{model} checkpoint lacks '{key}', needed to infer the model size")
    return shapes[key]


def t5_params_from_shapes(shapes: Mapping) -> T5Config:
    """T5Config from {checkpoint key: shape}. Every dimension is visible in the shapes: the head count is the
    second dim of block 0's relative_attention_bias table [buckets, heads]. max_distance keeps its default."""
    s = _native_shapes(shapes, t5_key_map)
    vocab, d_model = _shape(s, "shared.weight", "T5")
    buckets, heads = _shape(s, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "T5")
    inner = _shape(s, "encoder.block.0.layer.0.SelfAttention.q.weight", "T5")[0]
    d_ff = _shape(s, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", "T5")[0]
    if inner % heads:
        raise ValueError(f"T5 checkpoint: attention width {inner} is not divisible by {heads} heads")
    return T5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_heads=heads,
                    num_layers=_count_layers(s, r"encoder\.block\.(\d+)\."), relative_attention_num_buckets=buckets)


def clip_params_from_shapes(shapes: Mapping) -> CLIPConfig:
    """CLIPConfig from {checkpoint key: shape}. The head count is not visible in the shapes: known CLIP widths
    (768 -> 12 heads as CLIP-L, 1024 -> 16, 1280 -> 20) use the real models' value, other widths need a
    config.json. hidden_act and the pooling rule keep CLIP-L's values (quick_gelu, legacy argmax pooling)."""
    s = _native_shapes(shapes, clip_key_map)
    vocab, hidden = _shape(s, "embeddings.token_embedding.weight", "CLIP")
    max_pos = _shape(s, "embeddings.position_embedding.weight", "CLIP")[0]
    intermediate = _shape(s, "encoder.layers.0.mlp.fc1.weight", "CLIP")[0]
    if hidden not in CLIP_HEADS_BY_WIDTH:
        raise ValueError(f"CLIP checkpoint of width {hidden}: the head count cannot be inferred from shapes; "
                         "pass its config.json (num_attention_heads)")
    return CLIPConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=_count_layers(s, r"encoder\.layers\.(\d+)\."),
                      num_attention_heads=CLIP_HEADS_BY_WIDTH[hidden], max_position_embeddings=max_pos)
