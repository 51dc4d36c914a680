"""T5 v1.1 encoder (FLUX's text_encoder_2), parameter names equal to HF `T5EncoderModel`.

FLUX calls it without an attention mask, so padding tokens are attended to like any other token.
T5 conventions that differ from most transformers: RMSNorm without mean or bias, no 1/sqrt(d) scaling of the
attention logits (folded into the init), no absolute positions but a learned bias per relative-position bucket
(table in block 0 only, reused by every layer), gated tanh-GELU feed-forward, no biases anywhere.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def from_dict(cls, config: dict) -> "T5Config":
        """From an HF T5 config.json dict (unknown keys ignored, absent keys keep the T5-XXL defaults)."""
        # T5 v1.1 (and FLUX): gated tanh-GELU. Original T5 (ReLU, ungated) is refused, not silently misrun.
        proj = config.get("feed_forward_proj", "gated-gelu")
        act = config.get("dense_act_fn", "gelu_new")
        if proj != "gated-gelu" or act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"T5 config: only the gated tanh-GELU feed-forward of T5 v1.1 is supported, got "
                             f"feed_forward_proj={proj!r}, dense_act_fn={act!r}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int = 32, max_distance: int = 128):
    """Bidirectional T5 bucket of `key_pos - query_pos`: half the buckets per sign, exact below half of
    those (|d| < 8 for 32 buckets), log-spaced up to max_distance, everything farther in the last bucket."""
    num_buckets //= 2
    bucket = (relative_position > 0).long() * num_buckets
    n = relative_position.abs()
    max_exact = num_buckets // 2
    # Clamp before the log so n = 0 (handled by the exact branch) does not produce -inf.
    log_bucket = max_exact + (
        torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return bucket + torch.where(n < max_exact, n, log_bucket)


class T5LayerNorm(nn.Module):
    """RMSNorm: variance in float32, result cast back to the weight's dtype before scaling (as HF)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_bias:
            self.num_buckets = cfg.relative_attention_num_buckets
            self.max_distance = cfg.relative_attention_max_distance
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, length: int) -> torch.Tensor:
        """[1, heads, L, L] additive bias for every query/key pair."""
        pos = torch.arange(length, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (lin(x).view(B, L, self.num_heads, self.d_kv).transpose(1, 2) for lin in (self.q, self.k, self.v))
        # scale=1.0: T5 does not scale its logits.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(B, L, self.num_heads * self.d_kv))


class T5DenseGatedActDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        # fp16 models keep `wo` in fp32 (T5Encoder.keep_wo_in_fp32, as HF does): its input overflows fp16.
        # Only reads the dtype, and only of a plain float weight, so quantized replacements pass through.
        w = getattr(self.wo, "weight", None)
        if isinstance(w, torch.Tensor) and w.is_floating_point() and w.dtype != h.dtype:
            h = h.to(w.dtype)
        return self.wo(h)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x, position_bias):
        return x + self.SelfAttention(self.layer_norm(x), position_bias)


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """HF's guard against fp16 overflow in T5 activations: clip to the largest finite value (minus a margin
    when something already overflowed). A no-op for other dtypes."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return x.clamp(min=-limit, max=limit)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_bias), T5LayerFF(cfg)])

    def forward(self, x, position_bias):
        x = clamp_fp16(self.layer[0](x, position_bias))
        return clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList([T5Block(cfg, has_relative_bias=(i == 0)) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """`forward(input_ids [B, L]) -> last_hidden_state [B, L, d_model]`, no attention mask (the FLUX way)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)

    def keep_wo_in_fp32(self) -> "T5Encoder":
        """For float16 inference: put every feed-forward output projection back in float32 (HF's
        `_keep_in_fp32_modules = ["wo"]`); the residual stream then runs in float32 after the first block,
        as in HF. Not needed for bfloat16 (what FLUX uses), whose range does not overflow."""
        for block in self.encoder.block:
            block.layer[1].DenseReluDense.wo.float()
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        x = self.shared(input_ids)
        # Computed once from block 0's table and shared by all layers.
        position_bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(input_ids.shape[1])
        for block in self.encoder.block:
            x = block(x, position_bias)
        return self.encoder.final_layer_norm(x)
