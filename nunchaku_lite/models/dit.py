"""The FLUX.1 DiT (rectified-flow transformer), following the BFL reference (`flux.model.Flux`).

Parameter names match the BFL checkpoints (`flux1-dev.safetensors`) exactly. Every linear layer is an
nn.Linear called through its module (`self.img_attn.qkv(x)`), never through `.weight`, so a quantized
replacement with the same call signature can be swapped in by name.

Tensor layouts: B batch, L tokens, H heads, D head dim, K = 3 (q, k, v). Token order is always [txt, img].

This file is the reference. On CUDA (16-bit activations, native library built) the blocks and Flux.forward
dispatch to nunchaku_lite/fused.py, the same math with the memory-bound work fused; `fast = False` on a block
(or `Flux.set_fast(False)`) keeps the plain path.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import fused


@dataclass
class FluxParams:
    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = False

    @classmethod
    def dev(cls) -> "FluxParams":
        return cls(guidance_embed=True)

    @classmethod
    def schnell(cls) -> "FluxParams":
        return cls(guidance_embed=False)


# ---------------------------------------------------------------------------------------------------------
# Embeddings, RoPE and attention


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding [cos, sin] of `time_factor * t` (t: [B] in [0, 1]).

    The x1000 runs in t's dtype (BFL passes bf16 t, so 0.5 -> 500 exactly but 3.5 -> 3504), the trig in float32;
    the result is cast back to t's dtype when t is floating point.
    """
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """2x2 rotation matrices [[cos, -sin], [sin, cos]] for positions pos [B, L] -> [B, L, dim/2, 2, 2] float32."""
    if dim % 2:
        raise ValueError(f"rope: axis dim must be even, got {dim}")
    pos = pos.float()  # float32 even when ids arrive in bf16: positions up to ~100 must stay exact
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim)
    angle = pos[..., None] * omega  # einsum "...n,d->...nd"
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2))  # "b n d (i j) -> b n d i j"


def apply_rope(xq: Tensor, xk: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate ADJACENT pairs (x[2k], x[2k+1]) of q and k [B, H, L, D] by pe [B, 1, L, D/2, 2, 2], in float32."""

    def rotate(x: Tensor) -> Tensor:
        pairs = x.float().unflatten(-1, (-1, 1, 2))  # [..., D/2, 1, 2]
        out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]  # matrix @ (x0, x1)
        return out.flatten(-2).type_as(x)

    return rotate(xq), rotate(xk)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Full (unmasked) attention over [B, H, L, D] with RoPE on q and k; returns [B, L, H*D]."""
    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(D)
    return x.transpose(1, 2).flatten(2)  # "B H L D -> B L (H D)"


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, L, 3*H*D] laid out [q | k | v], each head-major -> q, k, v of [B, H, L, D] ("B L (K H D) -> K B H L D")."""
    B, L, _ = qkv.shape
    q, k, v = qkv.view(B, L, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


class EmbedND(nn.Module):
    """RoPE for N-axis position ids [B, L, N]: each axis i rotates its own axes_dim[i] slice of the head dim."""

    def __init__(self, dim: int, theta: int, axes_dim: tuple):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, tuple(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        pe = torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-3)
        return pe.unsqueeze(1)  # [B, 1, L, D/2, 2, 2], broadcast over heads


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


# ---------------------------------------------------------------------------------------------------------
# Norms and modulation


class RMSNorm(nn.Module):
    """RMS norm computed in float32; the learnable gain is named `scale` (as in the checkpoints)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        rrms = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        return (xf * rrms).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # the gain may be float32 while activations are bf16: bring q/k back to v's dtype for SDPA
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Holds the attention weights of one stream; the blocks run the attention themselves (joint over streams)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor

    def apply(self, x_normed: Tensor) -> Tensor:
        return (1 + self.scale) * x_normed + self.shift


class Modulation(nn.Module):
    """lin(silu(vec)) chunked into (shift, scale, gate), twice for double blocks (attention, then MLP)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def clip_fp16(x: Tensor) -> Tensor:
    """Saturate float16 activations at +-65504 (as diffusers/ComfyUI do; BFL does not): real FLUX's text stream
    can exceed the fp16 range, and inf would turn into NaN in the next norm. A no-op for other dtypes."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def gelu_mlp(dim: int, hidden: int) -> nn.Sequential:
    # Sequential so the keys are `.0.` and `.2.` like the checkpoints
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


# ---------------------------------------------------------------------------------------------------------
# Blocks


def _use_fused(module: nn.Module, x: Tensor) -> bool:
    """The fused CUDA path runs when enabled on the module, possible for x (CUDA, 16-bit, library built) and
    nothing observes the module's submodule calls (hooks, e.g. the quantizer's calibration; torch.compile)."""
    return module.fast and fused.usable(x) and not fused.intercepted(module)


class DoubleStreamBlock(nn.Module):
    """Separate weights for the image and text streams, one joint attention over [txt, img]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = layer_norm(hidden_size)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = layer_norm(hidden_size)
        self.img_mlp = gelu_mlp(hidden_size, mlp_hidden)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = layer_norm(hidden_size)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = layer_norm(hidden_size)
        self.txt_mlp = gelu_mlp(hidden_size, mlp_hidden)

    fast = True  # dispatch to fused.double_block when it can run (see _use_fused)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        if _use_fused(self, img):
            return fused.double_block(self, img, txt, F.silu(vec), pe)
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        img_q, img_k, img_v = split_heads(self.img_attn.qkv(img_mod1.apply(self.img_norm1(img))), self.num_heads)
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)
        txt_q, txt_k, txt_v = split_heads(self.txt_attn.qkv(txt_mod1.apply(self.txt_norm1(txt))), self.num_heads)
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)

        q, k, v = (torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        attn = attention(q, k, v, pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp(img_mod2.apply(self.img_norm2(img)))
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp(txt_mod2.apply(self.txt_norm2(txt)))
        return clip_fp16(img), clip_fp16(txt)


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP on the joint sequence: linear1 -> [q, k, v, mlp], linear2 <- [attn, gelu(mlp)]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = layer_norm(hidden_size)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    fast = True  # dispatch to fused.single_block when it can run (see _use_fused)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        if _use_fused(self, x):
            return fused.single_block(self, x, F.silu(vec), pe)
        mod, _ = self.modulation(vec)
        qkv, mlp = self.linear1(mod.apply(self.pre_norm(x))).split([3 * self.hidden_size, self.mlp_hidden], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe)
        return clip_fp16(x + mod.gate * self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2)))


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)  # shift first (diffusers stores scale first)
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)


# ---------------------------------------------------------------------------------------------------------
# The model


class Flux(nn.Module):
    """FLUX.1 transformer: predicts the flow velocity for packed latent tokens.

    forward(img [B, L_img, in_channels], img_ids [B, L_img, 3], txt [B, L_txt, context_in_dim],
            txt_ids [B, L_txt, 3], timesteps [B] in [0, 1], y [B, vec_in_dim], guidance [B] or None)
      -> [B, L_img, out_channels] in img's dtype.
    txt, y and the time/guidance embeddings are cast to img's dtype, which must match the weights.
    """

    fast = True  # the fused CUDA forward (nunchaku_lite/fused.py) when it can run; see set_fast
    cuda_graph = False  # replay the fused step from a CUDA graph; see enable_cuda_graph

    def __init__(self, params: FluxParams):
        super().__init__()
        if params.hidden_size % params.num_heads:
            raise ValueError(f"hidden_size {params.hidden_size} is not divisible by num_heads {params.num_heads}")
        head_dim = params.hidden_size // params.num_heads
        if sum(params.axes_dim) != head_dim:
            raise ValueError(f"sum(axes_dim) = {sum(params.axes_dim)} must equal the head dim {head_dim}")
        self.params = params
        self.in_channels, self.out_channels = params.in_channels, params.out_channels
        self.hidden_size, self.num_heads = params.hidden_size, params.num_heads
        self.pe_embedder = EmbedND(dim=head_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(params.in_channels, params.hidden_size, bias=True)
        self.time_in = MLPEmbedder(256, params.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, params.hidden_size)
        if params.guidance_embed:  # absent (not Identity) otherwise, so no key is expected
            self.guidance_in = MLPEmbedder(256, params.hidden_size)
        self.txt_in = nn.Linear(params.context_in_dim, params.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(params.hidden_size, 1, params.out_channels)

    def set_fast(self, enabled: bool) -> "Flux":
        """Use the fused CUDA forward (default) or always the plain reference path (False). Returns self."""
        for m in (self, *self.double_blocks, *self.single_blocks):
            m.fast = bool(enabled)
        return self

    def enable_cuda_graph(self, enabled: bool = True) -> "Flux":
        """Capture the fused CUDA step in a CUDA graph on its first call for given input shapes (and weights) and
        replay it afterwards: no host launch overhead. Applies only when the fused path runs. Returns self."""
        self.cuda_graph = bool(enabled)
        if not enabled:
            object.__setattr__(self, "_fused_graph", None)
        return self

    def conditioning(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The vector fed to every modulation: time_in(t) [+ guidance_in(g)] + vector_in(y)."""
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX model embeds guidance (a dev-type model): pass guidance, e.g. 3.5")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        return vec + self.vector_in(y.to(dtype))

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be [B, L, C]; got img {tuple(img.shape)}, txt {tuple(txt.shape)}")
        if img_ids.shape[:2] != img.shape[:2] or txt_ids.shape[:2] != txt.shape[:2]:
            raise ValueError(
                f"ids must be [B, L, 3] matching their tokens; got img_ids {tuple(img_ids.shape)} for img "
                f"{tuple(img.shape)}, txt_ids {tuple(txt_ids.shape)} for txt {tuple(txt.shape)}"
            )
        if _use_fused(self, img):
            step = fused.graphed_forward if self.cuda_graph else fused.flux_forward
            return step(self, img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=timesteps, y=y,
                        guidance=guidance)
        vec = self.conditioning(timesteps, y, guidance, img.dtype)
        img = self.img_in(img)
        txt = self.txt_in(txt.to(img.dtype))
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))  # text first

        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1] :], vec)
