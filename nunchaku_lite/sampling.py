"""Rectified-flow sampling for FLUX.1, following the BFL reference (`flux.sampling`).

Convention: t = 1 is pure noise, t = 0 the clean latent, x_t = (1 - t) * x0 + t * noise; the model predicts the
velocity (noise - x0) and `denoise` integrates it with explicit Euler steps.
Latent [B, 16, h, w] with h = 2 * ceil(H / 16), w = 2 * ceil(W / 16) is packed into 2x2 patches:
tokens [B, (h/2)(w/2), 64], token index row * (w/2) + col, feature index c * 4 + ph * 2 + pw.
"""
import math
from collections.abc import Callable

import torch
from torch import Tensor

LATENT_CHANNELS = 16


def round_size(width: int, height: int) -> tuple[int, int, bool]:
    """Round width and height down to multiples of 16 (as the BFL CLI does); returns (width, height, changed)."""
    if width < 16 or height < 16:
        raise ValueError(f"width and height must be at least 16 pixels, got {width}x{height}")
    new_width, new_height = 16 * (width // 16), 16 * (height // 16)
    return new_width, new_height, (new_width, new_height) != (width, height)


def latent_size(height: int, width: int) -> tuple[int, int]:
    """(h, w) of the unpacked latent for an image of height x width pixels (8x VAE, then 2x2 packing)."""
    return 2 * math.ceil(height / 16), 2 * math.ceil(width / 16)


def get_noise(
    batch: int, height: int, width: int, seed: int, dtype: torch.dtype = torch.bfloat16, device="cpu"
) -> Tensor:
    """Initial latent noise [batch, 16, h, w], drawn like BFL: randn directly in `dtype` from a CPU generator
    seeded with `seed`, then moved to `device` (so a seed gives the same noise on every device)."""
    h, w = latent_size(height, width)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(batch, LATENT_CHANNELS, h, w, dtype=dtype, generator=generator).to(device)


def pack(latent: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), C*4] ("b c (h ph) (w pw) -> b (h w) (c ph pw)", ph = pw = 2)."""
    B, C, h, w = latent.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack: latent height and width must be even, got {h}x{w}")
    x = latent.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `pack` for an image of height x width pixels:
    [B, (h/2)(w/2), C*4] -> [B, C, h, w] ("b (h w) (c ph pw) -> b c (h ph) (w pw)")."""
    B, L, D = tokens.shape
    rows, cols = math.ceil(height / 16), math.ceil(width / 16)
    if L != rows * cols or D % 4:
        raise ValueError(f"unpack: {L} tokens of {D} features do not fit a {height}x{width} image "
                         f"({rows}x{cols} patches of 16x16 pixels)")
    x = tokens.view(B, rows, cols, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, rows * 2, cols * 2)


def prepare_ids(batch: int, latent_h: int, latent_w: int, txt_len: int, device="cpu") -> tuple[Tensor, Tensor]:
    """Position ids for the joint sequence, float32: img_ids [B, (h/2)(w/2), 3] = (0, row, col) for the latent
    of latent_h x latent_w, and txt_ids [B, txt_len, 3] = 0 (text is unrotated)."""
    rows, cols = latent_h // 2, latent_w // 2
    img_ids = torch.zeros(rows, cols, 3, device=device)
    img_ids[..., 1] = torch.arange(rows, device=device)[:, None]
    img_ids[..., 2] = torch.arange(cols, device=device)[None, :]
    img_ids = img_ids.reshape(1, rows * cols, 3).expand(batch, -1, -1).contiguous()
    return img_ids, torch.zeros(batch, txt_len, 3, device=device)


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    """Resolution-dependent shift e^mu / (e^mu + (1/t - 1)^sigma): moves steps towards t = 1 (noise)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def shift_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu grows linearly with the token count: base_shift at 256 tokens, max_shift at 4096 (1024x1024)."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return slope * image_seq_len + (base_shift - slope * 256)


def get_schedule(
    num_steps: int, image_seq_len: int, shift: bool = True, base_shift: float = 0.5, max_shift: float = 1.15
) -> list[float]:
    """num_steps + 1 times from 1 down to 0: linspace, time-shifted when `shift` (dev: yes, schnell: no)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        timesteps = time_shift(shift_mu(image_seq_len, base_shift, max_shift), 1.0, timesteps)
    return timesteps.tolist()


@torch.no_grad()
def denoise(
    model,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    vec: Tensor,
    timesteps: list[float],
    guidance: float | None = 4.0,
    callback: Callable[[int, int, float, Tensor], None] | None = None,
) -> Tensor:
    """Euler-integrate the velocity from timesteps[0] to timesteps[-1], in img's dtype like BFL (so t and
    guidance are rounded to bf16 for a bf16 run). `guidance` is ignored by models without a guidance
    embedding; None passes no guidance. callback(step, num_steps, t_curr, img) runs after every step."""
    B = img.shape[0]
    guidance_vec = None if guidance is None else torch.full((B,), guidance, device=img.device, dtype=img.dtype)
    num_steps = len(timesteps) - 1
    for step, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        t_vec = torch.full((B,), t_curr, dtype=img.dtype, device=img.device)
        pred = model(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, y=vec, timesteps=t_vec, guidance=guidance_vec)
        img = img + (t_prev - t_curr) * pred
        if callback is not None:
            callback(step, num_steps, t_curr, img)
    return img
