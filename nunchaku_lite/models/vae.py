"""The FLUX.1 autoencoder: a KL-regularised conv VAE with 16 latent channels (BFL `AutoEncoder`).

Parameter names equal the keys of BFL's `ae.safetensors` (`encoder.down.0.block.1.conv2.weight`,
`decoder.mid.attn_1.q.weight`, ...); other layouts are translated in `loading/keys_vae.py`.

    ae = AutoEncoder(AutoEncoderParams())
    z = ae.encode(x)        # x: [B, 3, H, W] in [-1, 1]   -> [B, 16, H/8, W/8], the DiT's latent space
    x = ae.decode(z)        # latent -> [B, 3, H, W] on the [-1, 1] scale, not clamped

Spatial factor: 2 ** (len(ch_mult) - 1) (8 for FLUX; the tiny test models use 2).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AutoEncoderParams:
    resolution: int = 256  # training resolution; not used by the network, kept for config round trips
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self):
        try:
            self.ch_mult = tuple(int(m) for m in self.ch_mult)
            for name in ("resolution", "in_channels", "ch", "out_ch", "num_res_blocks", "z_channels"):
                setattr(self, name, int(getattr(self, name)))
            self.scale_factor, self.shift_factor = float(self.scale_factor), float(self.shift_factor)
        except (TypeError, ValueError) as e:
            raise ValueError(f"AutoEncoderParams: non-numeric field ({e}) in {self!r}") from None
        for name in ("in_channels", "ch", "out_ch", "num_res_blocks", "z_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"AutoEncoderParams.{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"AutoEncoderParams.ch_mult must be a non-empty list of positive ints, got {self.ch_mult!r}")
        if any(self.ch * m % 32 for m in self.ch_mult):
            raise ValueError(f"AutoEncoderParams: every ch * ch_mult ({self.ch} * {self.ch_mult}) must be a multiple "
                             "of 32 (GroupNorm uses 32 groups)")
        if self.scale_factor == 0:
            raise ValueError("AutoEncoderParams.scale_factor must be non-zero")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each axis (8 for FLUX)."""
        return 2 ** (len(self.ch_mult) - 1)


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32 groups, eps 1e-6) computed in float32 for half inputs.

    Statistics over a whole feature map in bf16 lose digits; BFL decodes under autocast, which also runs
    group_norm in float32. Float32 inputs take the plain path.
    """

    def __init__(self, channels: int):
        super().__init__(32, channels, eps=1e-6, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        out = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, channels as the feature dim (1x1 conv projections).

    Queries are processed in chunks so that the [queries, H*W] score matrix stays under MAX_SCORES elements
    (an unfused attention path, e.g. on the CPU, would otherwise allocate (H*W)^2 floats: 17 GB for a
    2048x2048 FLUX image). Each query row's softmax is independent, so chunking does not change the math.
    """

    MAX_SCORES = 1 << 26  # 256 MiB of float32 scores per chunk

    def __init__(self, channels: int):
        super().__init__()
        self.norm = GroupNorm32(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def query_chunk(self, length: int) -> int:
        return max(1, min(length, self.MAX_SCORES // length))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # [B, C, H, W] -> [B, 1, H*W, C]: one head whose dimension is the channel count (scale 1/sqrt(C))
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q(hn), self.k(hn), self.v(hn)))
        attn = torch.cat([F.scaled_dot_product_attention(qc, k, v) for qc in q.split(self.query_chunk(h * w), -2)],
                         dim=-2)
        attn = attn.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(attn)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = GroupNorm32(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm32(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric padding (right and bottom only) as in the original LDM/BFL code: the weights were
        # trained with it, symmetric padding=1 would shift the sampling grid by one pixel.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: resnets, then an optional resampling conv. Named like BFL's nn.Module() containers
    (`block`, `downsample` / `upsample`) so the state-dict keys match; BFL's empty `attn` lists hold no weights."""

    def __init__(self, channels: list[tuple[int, int]], resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in, c_out) for c_in, c_out in channels)
        self.resample_name = resample_name
        if resample is not None:
            setattr(self, resample_name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if hasattr(self, self.resample_name):
            x = getattr(self, self.resample_name)(x)
        return x


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> moments [B, 2*z_channels, H/f, W/f] (mean, then log-variance)."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = p.ch
        for i, c_out in enumerate(widths):
            pairs = [(c_in if j == 0 else c_out, c_out) for j in range(p.num_res_blocks)]
            last = i == len(widths) - 1
            self.down.append(Level(pairs, None if last else Downsample(c_out), "downsample"))
            c_in = c_out
        self.mid = MidBlock(widths[-1])
        self.norm_out = GroupNorm32(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * p.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] (unscaled, what the encoder's mean looks like) -> image [B, out_ch, h*f, w*f]."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        self.conv_in = nn.Conv2d(p.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        # Built from the lowest resolution up, but stored under BFL's indices: up[i] has width widths[i], so
        # up[-1] runs first. Each level has one more resnet than the encoder's; all but up[0] upsample.
        levels = {}
        c_in = widths[-1]
        for i in reversed(range(len(widths))):
            c_out = widths[i]
            pairs = [(c_in if j == 0 else c_out, c_out) for j in range(p.num_res_blocks + 1)]
            levels[i] = Level(pairs, Upsample(c_out) if i > 0 else None, "upsample")
            c_in = c_out
        self.up = nn.ModuleList(levels[i] for i in range(len(widths)))
        self.norm_out = GroupNorm32(p.ch * p.ch_mult[0])
        self.conv_out = nn.Conv2d(p.ch * p.ch_mult[0], p.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.upsample_path(self.latent_path(z))

    def latent_path(self, z: Tensor) -> Tensor:
        """conv_in + mid block: the part that runs at latent resolution (and holds the only attention)."""
        return self.mid(self.conv_in(z))

    def upsample_path(self, h: Tensor) -> Tensor:
        """Up levels + output head: the memory-heavy part at growing resolution; purely convolutional."""
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """FLUX autoencoder. `encode`/`decode` work in the DiT's latent space: z = scale * (mean - shift).

    Inputs are moved to the weights' device and dtype; outputs come back in them (float32, bfloat16 or
    float16; FLUX's diffusers config says force_upcast, i.e. float16 can overflow on real images: prefer
    bfloat16 or float32).
    """

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def _check(self, t: Tensor, name: str, channels: int) -> Tensor:
        if not isinstance(t, Tensor):
            raise TypeError(f"AutoEncoder: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4 or t.shape[1] != channels:
            raise ValueError(f"AutoEncoder: `{name}` must have shape [B, {channels}, H, W], got {list(t.shape)}")
        weight = self.decoder.conv_in.weight
        return t.to(device=weight.device, dtype=weight.dtype)

    def encode(self, x: Tensor) -> Tensor:
        """Image in [-1, 1], [B, C, H, W] -> scaled latent (the Gaussian's mean, no sampling), [B, z, H/f, W/f].

        H and W should be multiples of the downsample factor f; otherwise the last partial cell is dropped
        (the stride-2 convs floor), as in the reference.
        """
        x = self._check(x, "x", self.params.in_channels)
        mean = self.encoder(x)[:, : self.params.z_channels]
        return self.scale_factor * (mean - self.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent [B, z, h, w] -> image [B, out_ch, h*f, w*f] on the [-1, 1] scale, not clamped."""
        z = self._check(z, "z", self.params.z_channels)
        return self.decoder(z / self.scale_factor + self.shift_factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def decode_tiled(self, z: Tensor, tile: int = 64, overlap: int = 16) -> Tensor:
        """`decode` with the high-resolution part run in overlapping tiles, blended linearly across overlaps.

        The decoder's conv_in and mid block (with the global attention) run on the whole latent, which is
        cheap at latent resolution; the up levels, where nearly all activation memory goes, run per tile of
        tile x tile latent cells, `overlap` cells shared with each neighbour. Peak activation memory is that of
        one tile plus the float32 output image. Latents no larger than `tile` in both dimensions take the
        `decode` path (identical results).

        Not exact: the up levels' GroupNorms use each tile's own statistics instead of the whole image's (as
        diffusers' tiled VAE does), and convolutions near a tile edge see zero padding instead of the
        neighbour (the overlap and the blend weights hide most of that). The deviation depends on the weights
        and shrinks with larger tiles; measured rel. L2 vs `decode` with tile 16, overlap 8: 5.2e-2 for the
        random tiny golden model on a 16x32 latent, 7.6e-2 for the full-size architecture with random init on
        a 24x40 latent (trained weights give smoother, more uniform statistics; not measured here).
        """
        if tile < 1 or overlap < 0 or overlap >= tile:
            raise ValueError(f"decode_tiled: need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
        z = self._check(z, "z", self.params.z_channels)
        b, _, h, w = z.shape
        if h <= tile and w <= tile:
            return self.decode(z)
        feats = self.decoder.latent_path(z / self.scale_factor + self.shift_factor)
        f = self.params.downsample_factor
        th, tw = min(tile, h), min(tile, w)
        out = torch.zeros(b, self.params.out_ch, h * f, w * f, device=z.device, dtype=torch.float32)
        weight_sum = torch.zeros(h * f, w * f, device=z.device, dtype=torch.float32)
        for y0 in _tile_starts(h, tile, overlap):
            for x0 in _tile_starts(w, tile, overlap):
                img = self.decoder.upsample_path(feats[:, :, y0 : y0 + th, x0 : x0 + tw]).float()
                # Ramps fall off toward tile edges inside the image; edges on the image border keep full weight.
                wy = _ramp(th * f, overlap * f, y0 > 0, y0 + th < h, z.device)
                wx = _ramp(tw * f, overlap * f, x0 > 0, x0 + tw < w, z.device)
                wgt = wy[:, None] * wx[None, :]
                ys, xs = slice(y0 * f, (y0 + th) * f), slice(x0 * f, (x0 + tw) * f)
                out[:, :, ys, xs] += img * wgt
                weight_sum[ys, xs] += wgt
        return (out / weight_sum).to(self.dtype)


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering [0, size): stride tile - overlap, the last tile flush with the end."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((size - tile) / stride) + 1
    return sorted({min(i * stride, size - tile) for i in range(n)})


def _ramp(n: int, width: int, fade_start: bool, fade_end: bool, device) -> Tensor:
    """Blend weights for n pixels. A faded end's `width` pixels (the overlap) split in quarters: the outer
    quarter gets ~0 weight (zero padding there corrupts the conv outputs; the neighbour covers it), the middle
    half a linear ramp, the inner quarter full weight. Weights stay > 0 so a normalised sum never divides by 0."""
    pos = torch.arange(n, device=device, dtype=torch.float32) + 0.5
    wgt = torch.ones(n, device=device)
    ramp = lambda d: ((d - width / 4) / (width / 2)).clamp(1e-4, 1.0)  # d: distance from the tile edge
    if width > 0 and fade_start:
        wgt = torch.minimum(wgt, ramp(pos))
    if width > 0 and fade_end:
        wgt = torch.minimum(wgt, ramp(n - pos))
    return wgt
