"""CLIP text model (FLUX's text_encoder, CLIP-L/14), parameter names equal to HF `CLIPTextModel` without the
`text_model.` prefix (loading/keys_text.py strips it).

Pre-LN transformer with a causal mask and no padding mask (FLUX passes none). FLUX uses only the pooled
vector: the final-LayerNorm output at the EOS position. No text projection.
"""
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CLIPConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # HF pooling rule: the legacy value 2 (what CLIP-L's config says) means "position of the largest id",
    # which is the first EOS for the OpenAI vocabulary; any other value means "first position of that id".
    eos_token_id: int = 2

    @classmethod
    def from_dict(cls, config: dict) -> "CLIPConfig":
        """From an HF CLIPTextConfig dict, or a full CLIPConfig dict (its `text_config` is used)."""
        if isinstance(config.get("text_config"), dict):
            config = config["text_config"]
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in config.items() if k in names})
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP config: hidden_act {cfg.hidden_act!r} not supported (use one of {sorted(ACTIVATIONS)})")
        return cfg


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (lin(x).view(B, L, self.num_heads, -1).transpose(1, 2) for lin in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # default scale 1/sqrt(head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class CLIPTextModel(nn.Module):
    """`forward(input_ids [B, L]) -> (last_hidden_state [B, L, D], pooled [B, D])`; L <= max_position_embeddings."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if input_ids.dim() != 2 or input_ids.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(f"input_ids must be [batch, length <= {self.cfg.max_position_embeddings}], "
                             f"got shape {tuple(input_ids.shape)}")
        x = self.embeddings(input_ids)
        for layer in self.encoder.layers:
            x = layer(x)
        x = self.final_layer_norm(x)
        if self.cfg.eos_token_id == 2:
            eos_pos = input_ids.argmax(-1)  # first occurrence of the largest id
        else:
            eos_pos = (input_ids == self.cfg.eos_token_id).int().argmax(-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), eos_pos]
        return x, pooled
