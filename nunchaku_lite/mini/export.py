"""Write a trained mini model as a diffusers-layout FLUX repository, so the engine's loaders read it exactly as
they read a real FLUX.1 download:

    model_index.json                      (+ "_nunchaku_lite": pipeline defaults for this model)
    transformer/config.json + diffusion_pytorch_model.safetensors    diffusers FluxTransformer2DModel names
    text_encoder/config.json + model.safetensors                     HF CLIPTextModel (`text_model.` prefix)
    text_encoder_2/config.json + model.safetensors                   HF T5EncoderModel
    vae/config.json + diffusion_pytorch_model.safetensors            diffusers AutoencoderKL names
    tokenizer/, tokenizer_2/, scheduler/scheduler_config.json

The BFL -> diffusers renames below are the inverse of loading/keys_dit.py and loading/keys_vae.py (tests check
the round trip).
"""
import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.clip import CLIPConfig
from ..models.dit import FluxParams
from ..models.t5 import T5Config
from ..models.vae import AutoEncoderParams

# ------------------------------------------------------------------------------------------------ DiT
_DIT_RENAMES = {  # BFL module -> diffusers module (weight and bias alike)
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
    "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
}
_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out",
           "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}


def dit_to_diffusers(sd: dict[str, torch.Tensor], params: FluxParams) -> dict[str, torch.Tensor]:
    """BFL-named Flux state dict -> diffusers FluxTransformer2DModel state dict."""
    h = params.hidden_size
    out = {}
    for key, t in sd.items():
        module, leaf = key.rsplit(".", 1)
        leaf_out = "weight" if leaf == "scale" else leaf  # q/k RMSNorm gains: BFL `.scale`, diffusers `.weight`
        if module in _DIT_RENAMES:
            out[f"{_DIT_RENAMES[module]}.{leaf}"] = t
        elif module == "final_layer.adaLN_modulation.1":
            shift, scale = t.chunk(2, dim=0)  # BFL [shift; scale], diffusers [scale; shift]
            out[f"norm_out.linear.{leaf}"] = torch.cat([scale, shift])
        elif m := re.fullmatch(r"double_blocks\.(\d+)\.(.+)", module):
            i, sub = m.groups()
            p = f"transformer_blocks.{i}."
            if sub in ("img_attn.qkv", "txt_attn.qkv"):
                names = ("to_q", "to_k", "to_v") if sub.startswith("img") else ("add_q_proj", "add_k_proj", "add_v_proj")
                for name, part in zip(names, t.chunk(3, dim=0)):
                    out[f"{p}attn.{name}.{leaf}"] = part
            else:
                out[f"{p}{_DOUBLE[sub]}.{leaf_out}"] = t
        elif m := re.fullmatch(r"single_blocks\.(\d+)\.(.+)", module):
            i, sub = m.groups()
            p = f"single_transformer_blocks.{i}."
            if sub == "linear1":
                q, k, v, mlp = t.split([h, h, h, t.shape[0] - 3 * h], dim=0)
                for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (q, k, v, mlp)):
                    out[f"{p}{name}.{leaf}"] = part
            else:
                out[f"{p}{_SINGLE[sub]}.{leaf_out}"] = t
        else:
            raise ValueError(f"dit_to_diffusers: no diffusers name for {key!r}")
    return {k: v.contiguous() for k, v in out.items()}


def dit_config(params: FluxParams) -> dict:
    head_dim = params.hidden_size // params.num_heads
    return {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0", "patch_size": 1,
            "in_channels": params.in_channels, "out_channels": None if params.out_channels == params.in_channels
            else params.out_channels, "num_layers": params.depth, "num_single_layers": params.depth_single_blocks,
            "attention_head_dim": head_dim, "num_attention_heads": params.num_heads,
            "joint_attention_dim": params.context_in_dim, "pooled_projection_dim": params.vec_in_dim,
            "guidance_embeds": params.guidance_embed, "axes_dims_rope": list(params.axes_dim)}


# ------------------------------------------------------------------------------------------------ VAE
def vae_to_diffusers(sd: dict[str, torch.Tensor], params: AutoEncoderParams) -> dict[str, torch.Tensor]:
    """BFL-named AutoEncoder state dict -> diffusers AutoencoderKL state dict."""
    n = len(params.ch_mult)
    attn = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    out = {}
    for key, t in sd.items():
        part, rest = key.split(".", 1)
        if m := re.fullmatch(r"(down|up)\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", rest):
            kind, level, j, name, leaf = m.groups()
            level = int(level) if kind == "down" else n - 1 - int(level)  # diffusers up_blocks.0 = lowest res
            name = "conv_shortcut" if name == "nin_shortcut" else name
            rest = f"{kind}_blocks.{level}.resnets.{j}.{name}.{leaf}"
        elif m := re.fullmatch(r"(down|up)\.(\d+)\.(?:down|up)sample\.conv\.(weight|bias)", rest):
            kind, level, leaf = m.groups()
            level = int(level) if kind == "down" else n - 1 - int(level)
            rest = f"{kind}_blocks.{level}.{kind}samplers.0.conv.{leaf}"
        elif m := re.fullmatch(r"mid\.block_([12])\.(\w+)\.(weight|bias)", rest):
            j, name, leaf = m.groups()
            name = "conv_shortcut" if name == "nin_shortcut" else name
            rest = f"mid_block.resnets.{int(j) - 1}.{name}.{leaf}"
        elif m := re.fullmatch(r"mid\.attn_1\.(\w+)\.(weight|bias)", rest):
            name, leaf = m.groups()
            rest = f"mid_block.attentions.0.{attn[name]}.{leaf}"
            if leaf == "weight" and name != "norm":
                t = t.reshape(t.shape[0], t.shape[1])  # 1x1 conv -> linear
        elif m := re.fullmatch(r"norm_out\.(weight|bias)", rest):
            rest = f"conv_norm_out.{m.group(1)}"
        elif not re.fullmatch(r"conv_(in|out)\.(weight|bias)", rest):
            raise ValueError(f"vae_to_diffusers: no diffusers name for {key!r}")
        out[f"{part}.{rest}"] = t
    return {k: v.contiguous() for k, v in out.items()}


def vae_config(params: AutoEncoderParams) -> dict:
    n = len(params.ch_mult)
    return {"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0", "in_channels": params.in_channels,
            "out_channels": params.out_ch, "block_out_channels": [params.ch * m for m in params.ch_mult],
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "layers_per_block": params.num_res_blocks, "latent_channels": params.z_channels,
            "norm_num_groups": 32, "act_fn": "silu", "sample_size": params.resolution,
            "scaling_factor": params.scale_factor, "shift_factor": params.shift_factor,
            "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
            "force_upcast": True}


# ------------------------------------------------------------------------------------------ text encoders
def clip_config(cfg: CLIPConfig) -> dict:
    d = asdict(cfg)
    d.update({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "torch_dtype": "bfloat16",
              "attention_dropout": 0.0, "projection_dim": cfg.hidden_size})
    return d


def t5_config(cfg: T5Config) -> dict:
    d = asdict(cfg)
    d.update({"architectures": ["T5EncoderModel"], "model_type": "t5", "torch_dtype": "bfloat16",
              "dense_act_fn": "gelu_new", "feed_forward_proj": "gated-gelu", "is_gated_act": True,
              "is_encoder_decoder": True, "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
              "decoder_start_token_id": 0, "dropout_rate": 0.0})
    return d


def scheduler_config(shift: bool) -> dict:
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0",
            "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": shift,
            "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def _save(sd: dict[str, torch.Tensor], path: Path, dtype: torch.dtype):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in sd.items()}, str(path),
              metadata={"format": "pt"})


def _write_json(path: Path, obj: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def export_diffusers(out_dir, *, flux_params: FluxParams, flux_sd, t5_cfg: T5Config, t5_sd, clip_cfg: CLIPConfig,
                     clip_sd, ae_params: AutoEncoderParams, ae_sd, tokenizer_dir, defaults: dict,
                     dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the repository. `tokenizer_dir` holds tokenizer/ and tokenizer_2/ (mini.tokenizer output);
    `defaults` becomes model_index.json's "_nunchaku_lite" entry (kind, default_steps, shift, ...)."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    _save(dit_to_diffusers(flux_sd, flux_params), out / "transformer" / "diffusion_pytorch_model.safetensors", dtype)
    _write_json(out / "transformer" / "config.json", dit_config(flux_params))
    _save({"text_model." + k: v for k, v in clip_sd.items()}, out / "text_encoder" / "model.safetensors", dtype)
    _write_json(out / "text_encoder" / "config.json", clip_config(clip_cfg))
    _save(dict(t5_sd), out / "text_encoder_2" / "model.safetensors", dtype)
    _write_json(out / "text_encoder_2" / "config.json", t5_config(t5_cfg))
    # bfloat16 like the rest: CPU convolutions in float16 are ~100x slower than in bfloat16 or float32.
    _save(vae_to_diffusers(ae_sd, ae_params), out / "vae" / "diffusion_pytorch_model.safetensors", dtype)
    _write_json(out / "vae" / "config.json", vae_config(ae_params))
    _write_json(out / "scheduler" / "scheduler_config.json", scheduler_config(bool(defaults.get("shift", True))))
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(Path(tokenizer_dir) / name, out / name)
    _write_json(out / "model_index.json", {
        "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "_nunchaku_lite": defaults,
    })
    return out
