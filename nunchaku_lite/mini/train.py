"""Train the mini FLUX model on the synthetic shapes data, then export it in the diffusers layout.

    python -m nunchaku_lite.mini.train --out runs/mini --export nunchaku_lite/assets/mini      # full run (GPU)
    python -m nunchaku_lite.mini.train --out /tmp/tiny --tiny                                 # smoke test (CPU)

Stages (each seeded, checkpointed every --ckpt-every steps and resumed from its checkpoint when rerun):
0. tokenizers: BPE (CLIP-style) and Unigram (T5-style) on the caption vocabulary (mini.tokenizer);
1. VAE: the FLUX AutoEncoder architecture (small channels, 16 latent channels, 8x downsampling), trained on
   L1 + L2 reconstruction with a small KL term; then scale_factor / shift_factor are measured on the data
   (shift = latent mean, scale = 1 / std) and stored in its config, FLUX-style;
2. DiT + T5-style + CLIP-style encoders jointly, rectified flow as FLUX: x_t = (1 - t) x0 + t noise, the model
   predicts noise - x0, t ~ logit-normal(0, 1) (favours mid-range t). Kind: schnell-like (no guidance
   embedding), sampled with `default_steps` Euler steps on the shifted schedule. EMA weights are exported.
Outputs in --out: tokenizer/, tokenizer_2/, vae_ckpt.pt, dit_ckpt.pt, loss_{vae,dit}.csv, loss_{vae,dit}.png,
eval.json and eval_grid.png (held-out prompts, see mini.eval).

Step randomness comes from a generator seeded by (seed, stage, step), so a resumed run draws exactly the batches
an uninterrupted one would.
"""
import argparse
import copy
import csv
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..models.clip import CLIPConfig, CLIPTextModel
from ..models.dit import Flux, FluxParams
from ..models.t5 import T5Config, T5Encoder
from ..models.vae import AutoEncoder, AutoEncoderParams
from ..sampling import pack, prepare_ids
from ..tokenizers import load_clip_tokenizer, load_t5_tokenizer
from . import data as D
from .tokenizer import train_tokenizers

T5_MAX_LENGTH = 32
CLIP_MAX_LENGTH = 77
DIT_EXPORT_MARGIN = 45.0  # seconds kept, under --time-limit, for the eval and export after DiT training


@dataclass
class TrainConfig:
    out: str
    seed: int = 0
    num_images: int = 100_000
    captions_per_image: int = 4
    workers: int = 0  # data generation processes; 0 = one per CPU
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    tiny: bool = False  # minute-sized models and data, for smoke tests on CPU
    # stage 1: VAE
    vae_steps: int = 3000
    vae_batch: int = 64
    vae_lr: float = 5e-4
    kl_weight: float = 1e-4
    tail_weight: float = 0.0  # weight of the mean of each image's worst 1% pixel errors (local artifacts)
    # stage 2: DiT + text encoders
    dit_steps: int = 8000
    dit_batch: int = 256
    dit_lr: float = 6e-4
    warmup: int = 300
    ema_decay: float = 0.999
    # bookkeeping
    ckpt_every: int = 1000
    log_every: int = 25
    time_limit: float = 0.0  # seconds for this invocation (0 = none): stop cleanly, checkpointed, before it
    # sampling defaults recorded in model_index.json and used by the eval
    default_steps: int = 20
    shift: bool = True
    eval_other_steps: str = ""  # comma-separated step counts also benchmarked (accuracy only), e.g. "8,12"
    eval_single: int = 84
    eval_double: int = 24
    export: str = ""
    # continue from an exported model (diffusers folder): the VAE encoder stays frozen (so the latent space
    # the DiT learned is kept) while stage 1 fine-tunes the decoder; stage 2 continues the DiT and encoders
    init_from: str = ""


def model_configs(clip_vocab: int, t5_vocab: int, tiny: bool = False):
    """(FluxParams, T5Config, CLIPConfig, AutoEncoderParams) of the mini model. Every DiT linear that W4A4
    quantizes has an input width that is a multiple of 128 (256, 1024, 1280)."""
    if tiny:
        return (FluxParams(vec_in_dim=32, context_in_dim=32, hidden_size=64, num_heads=2, depth=1,
                           depth_single_blocks=1, axes_dim=(8, 12, 12)),
                T5Config(vocab_size=t5_vocab, d_model=32, d_kv=16, d_ff=64, num_heads=2, num_layers=1),
                CLIPConfig(vocab_size=clip_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH),
                AutoEncoderParams(resolution=D.IMAGE_SIZE, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1))
    return (FluxParams(in_channels=64, out_channels=64, vec_in_dim=128, context_in_dim=128, hidden_size=256,
                       mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=4, axes_dim=(8, 28, 28),
                       theta=10_000, qkv_bias=True, guidance_embed=False),
            T5Config(vocab_size=t5_vocab, d_model=128, d_kv=32, d_ff=512, num_heads=4, num_layers=3),
            CLIPConfig(vocab_size=clip_vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                       num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH),
            AutoEncoderParams(resolution=D.IMAGE_SIZE, ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1,
                              z_channels=16))


# ----------------------------------------------------------------------------------------------- data
def _data_chunk(args):
    seed, start, n, k = args
    images, captions = [], []
    for i in range(start, start + n):
        s = D.make_sample(seed, i)
        images.append(s.image)
        captions.append([s.caption] + D.extra_captions(seed, i, s, k - 1))
    return np.stack(images), captions


def build_data(cfg: TrainConfig, out: Path):
    """(images uint8 [N, H, W, 3], t5 ids [N, K, L5], clip ids [N, K, 77]); K captions per image."""
    n, k = cfg.num_images, cfg.captions_per_image
    chunk = 2000
    jobs = [(cfg.seed, s, min(chunk, n - s), k) for s in range(0, n, chunk)]
    workers = cfg.workers or os.cpu_count() or 1
    t0 = time.time()
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_data_chunk, jobs)
    else:
        parts = [_data_chunk(j) for j in jobs]
    images = np.concatenate([p[0] for p in parts])
    captions = [c for p in parts for cs in p[1] for c in cs]
    clip_tok = load_clip_tokenizer(out / "tokenizer", CLIP_MAX_LENGTH)
    t5_tok = load_t5_tokenizer(out / "tokenizer_2", T5_MAX_LENGTH)
    clip_ids = clip_tok(captions).view(n, k, -1)
    t5_ids = t5_tok(captions).view(n, k, -1)
    print(f"data: {n} images x {k} captions in {time.time() - t0:.1f}s", flush=True)
    return images, t5_ids, clip_ids


def images_to_tensor(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return images_u8.permute(0, 3, 1, 2).float() / 127.5 - 1


# ---------------------------------------------------------------------------------------- bookkeeping
class Progress:
    """One self-overwriting status line: stage, step/total, smoothed loss, speed and time left."""

    def __init__(self, stage: str, start: int, total: int):
        self.stage, self.start, self.total, self.t0, self.avg = stage, start, total, time.time(), None

    def update(self, step: int, loss: float):
        self.avg = loss if self.avg is None else 0.9 * self.avg + 0.1 * loss
        done = step + 1 - self.start
        rate = done / max(time.time() - self.t0, 1e-9)
        eta = (self.total - step - 1) / max(rate, 1e-9)
        bar = "#" * int(30 * (step + 1) / self.total)
        sys.stdout.write(f"\r[{self.stage}] {bar:<30} {step + 1}/{self.total} loss {self.avg:.4f} "
                         f"{rate:.1f} it/s eta {eta / 60:.1f} min ")
        sys.stdout.flush()

    def close(self):
        sys.stdout.write("\n")
        sys.stdout.flush()


def append_log(path: Path, rows: list[dict]):
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def plot_losses(path: Path, png: Path, title: str):
    """Loss curve (log10 scale, every logged column but `step` and `lr`), drawn with PIL."""
    rows = read_log(path)
    if not rows:
        return
    cols = [c for c in rows[0] if c not in ("step", "lr")]
    W, H, L, B = 640, 360, 60, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    steps = np.array([r["step"] for r in rows])
    series = {c: np.log10(np.maximum([r[c] for r in rows], 1e-8)) for c in cols}
    lo = min(s.min() for s in series.values())
    hi = max(s.max() for s in series.values())
    hi = hi if hi > lo else lo + 1
    s0, s1 = steps.min(), max(steps.max(), steps.min() + 1)

    def xy(s, v):
        return L + (s - s0) / (s1 - s0) * (W - L - 20), 20 + (hi - v) / (hi - lo) * (H - 20 - B)

    d.rectangle([L, 20, W - 20, H - B], outline="black")
    for frac in np.linspace(0, 1, 5):
        v = lo + frac * (hi - lo)
        y = xy(s0, v)[1]
        d.text((4, y - 6), f"{10 ** v:.3g}", fill="black", font=font)
        d.line([L, y, L + 4, y], fill="black")
    for frac in np.linspace(0, 1, 5):
        s = s0 + frac * (s1 - s0)
        x = xy(s, lo)[0]
        d.text((x - 10, H - B + 4), f"{int(s)}", fill="black", font=font)
    colors = ["#1f4fd1", "#d1341f", "#1f9d3a", "#9d1fa8", "#c98a00"]
    for i, c in enumerate(cols):
        v = series[c]
        k = max(1, len(v) // 100)  # moving average over ~1% of the run
        sm = np.convolve(v, np.ones(k) / k, mode="valid")
        pts = [xy(s, y) for s, y in zip(steps[k - 1:], sm)]
        if len(pts) > 1:
            d.line(pts, fill=colors[i % len(colors)], width=2)
        d.text((L + 10 + 110 * i, H - 14), c, fill=colors[i % len(colors)], font=font)
    d.text((L, 4), f"{title} (log scale) vs step", fill="black", font=font)
    img.save(png)


def save_atomic(obj, path: Path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def step_generator(seed: int, stage: int, step: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + stage * 7919) * 1_000_033 + step)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of base."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.time() + seconds if seconds > 0 else None

    def near(self, margin: float = 0.0) -> bool:
        return self.end is not None and time.time() > self.end - margin


# ------------------------------------------------------------------------------------------ stage 1: VAE
def vae_loss(ae: AutoEncoder, x: torch.Tensor, kl_weight: float, gen: torch.Generator, tail_weight: float = 0.0):
    moments = ae.encoder(x)
    mean, logvar = moments.float().chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, device=x.device, generator=gen)
    rec = ae.decoder(z).float()
    err = (rec - x).abs()
    l1, l2 = err.mean(), (err ** 2).mean()
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
    # Small local artifacts barely move the means; the worst 1% of each image's pixels does not let them hide.
    worst = err.amax(1).flatten(1)
    tail = worst.topk(max(1, worst.shape[1] // 100), dim=1).values.mean()
    loss = l1 + l2 + kl_weight * kl + tail_weight * tail
    return loss, {"l1": l1.item(), "l2": l2.item(), "kl": kl.item(), "tail": tail.item()}


def train_vae(cfg: TrainConfig, ap: AutoEncoderParams, images: torch.Tensor, out: Path, deadline: Deadline,
              init_state: dict | None = None):
    """Stage 1. With init_state (a trained AutoEncoder's weights) only the decoder is trained."""
    dev = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    ae = AutoEncoder(ap).to(dev)
    if init_state is not None:
        ae.load_state_dict(init_state)
        ae.encoder.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in ae.parameters() if p.requires_grad], lr=cfg.vae_lr, betas=(0.9, 0.99),
                            weight_decay=0.0)
    ckpt, start = out / "vae_ckpt.pt", 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=dev)
        ae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        print(f"vae: resumed at step {start}")
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    prog, rows = Progress("vae", start, cfg.vae_steps), []
    step = start
    for step in range(start, cfg.vae_steps):
        g = step_generator(cfg.seed, 1, step, dev)
        idx = torch.randint(len(images), (cfg.vae_batch,), device=dev, generator=g)
        x = images_to_tensor(images[idx].to(dev))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup)
        with amp:
            loss, parts = vae_loss(ae, x, cfg.kl_weight, g, cfg.tail_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in ae.parameters() if p.requires_grad], 1.0)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            rows.append({"step": step, "loss": loss.item(), **parts, "lr": opt.param_groups[0]["lr"]})
            prog.update(step, loss.item())
        last = step == cfg.vae_steps - 1
        if (step + 1) % cfg.ckpt_every == 0 or last or deadline.near():
            save_atomic({"step": step + 1, "model": ae.state_dict(), "opt": opt.state_dict()}, ckpt)
            if rows:
                append_log(out / "loss_vae.csv", rows)
                rows = []
            if deadline.near() and not last:
                prog.close()
                print(f"vae: time limit reached at step {step + 1}; rerun to resume")
                return None
    prog.close()
    if rows:
        append_log(out / "loss_vae.csv", rows)
    plot_losses(out / "loss_vae.csv", out / "loss_vae.png", "VAE loss")
    return ae


@torch.no_grad()
def latent_stats(ae: AutoEncoder, images: torch.Tensor, dev, n: int = 20_000, batch: int = 500):
    """(shift, scale) so that scale * (mean - shift) has zero mean and unit std over n images."""
    means = []
    for i in range(0, min(n, len(images)), batch):
        x = images_to_tensor(images[i: i + batch].to(dev))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            means.append(ae.encoder(x)[:, : ae.params.z_channels].float())
    z = torch.cat(means)
    shift = z.mean().item()
    return shift, 1.0 / (z - shift).std().item()


@torch.no_grad()
def encode_all(ae: AutoEncoder, images: torch.Tensor, dev, batch: int = 500) -> torch.Tensor:
    """Packed, scaled latents [N, L_img, 64] (bf16 on the device) of every image."""
    out = []
    for i in range(0, len(images), batch):
        x = images_to_tensor(images[i: i + batch].to(dev))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            mean = ae.encoder(x)[:, : ae.params.z_channels].float()
        out.append(pack(ae.scale_factor * (mean - ae.shift_factor)).to(torch.bfloat16))
    return torch.cat(out)


# ------------------------------------------------------------------------------ stage 2: DiT + encoders
class TextToImage(torch.nn.Module):
    """The three jointly trained modules, so one optimizer, EMA and state dict cover them."""

    def __init__(self, fp: FluxParams, tc: T5Config, cc: CLIPConfig):
        super().__init__()
        self.flux, self.t5, self.clip = Flux(fp), T5Encoder(tc), CLIPTextModel(cc)
        self._init_weights(tc)

    @torch.no_grad()
    def _init_weights(self, tc: T5Config):
        # adaLN-Zero (DiT): every modulation and the output layer start at zero, so each block starts as
        # the identity and the model as "predict 0"; training then grows them.
        for name, mod in self.flux.named_modules():
            if name.endswith("mod.lin") or name.endswith("modulation.lin") or name in (
                    "final_layer.adaLN_modulation.1", "final_layer.linear"):
                mod.weight.zero_()
                mod.bias.zero_()
        # T5 has no 1/sqrt(d) in attention; HF folds it into the init of q instead. Do the same.
        for name, p in self.t5.named_parameters():
            if name.endswith("SelfAttention.q.weight"):
                p.mul_(tc.d_kv ** -0.5)

    def forward(self, x_t, t, t5_ids, clip_ids, img_ids):
        txt = self.t5(t5_ids)
        _, vec = self.clip(clip_ids)
        txt_ids = torch.zeros(x_t.shape[0], txt.shape[1], 3, device=x_t.device)
        return self.flux(img=x_t, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=t, y=vec)


def train_dit(cfg: TrainConfig, model_cfgs, latents, t5_ids, clip_ids, out: Path, deadline: Deadline,
              init_state: dict | None = None):
    """Stage 2; init_state: TextToImage weights to start from (model and EMA alike)."""
    dev = torch.device(cfg.device)
    fp, tc, cc = model_cfgs
    torch.manual_seed(cfg.seed + 1)
    model = TextToImage(fp, tc, cc).to(dev)
    if init_state is not None:
        model.load_state_dict(init_state)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.dit_lr, betas=(0.9, 0.99), weight_decay=0.0)
    ckpt, start = out / "dit_ckpt.pt", 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=dev)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        print(f"dit: resumed at step {start}")
    n_img, L = latents.shape[0], latents.shape[1]
    side = int(math.isqrt(L)) * 2
    img_ids, _ = prepare_ids(cfg.dit_batch, side, side, 1, device=dev)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    prog, rows = Progress("dit", start, cfg.dit_steps), []
    step = start - 1
    for step in range(start, cfg.dit_steps):
        g = step_generator(cfg.seed, 2, step, dev)
        idx = torch.randint(n_img, (cfg.dit_batch,), device=dev, generator=g)
        which = torch.randint(t5_ids.shape[1], (cfg.dit_batch,), device=dev, generator=g)
        x0 = latents[idx].float()
        noise = torch.randn(x0.shape, device=dev, generator=g)
        t = torch.sigmoid(torch.randn(cfg.dit_batch, device=dev, generator=g))  # logit-normal(0, 1)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.dit_steps, cfg.dit_lr, cfg.warmup)
        with amp:
            pred = model(x_t, t, t5_ids[idx, which], clip_ids[idx, which], img_ids)
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # EMA warm-up (short memory early on), except when continuing a trained model, whose EMA is kept.
        decay = cfg.ema_decay if init_state is not None else min(cfg.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        if step % cfg.log_every == 0 or step == cfg.dit_steps - 1:
            rows.append({"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"]})
            prog.update(step, loss.item())
        last = step == cfg.dit_steps - 1
        stop = deadline.near(margin=DIT_EXPORT_MARGIN) and not last
        if (step + 1) % cfg.ckpt_every == 0 or last or stop:
            save_atomic({"step": step + 1, "model": model.state_dict(), "ema": ema.state_dict(),
                         "opt": opt.state_dict()}, ckpt)
            if rows:
                append_log(out / "loss_dit.csv", rows)
                rows = []
        if stop:
            print(f"\ndit: time limit reached at step {step + 1}; evaluating and exporting the EMA weights so far "
                  "(rerun to resume training)")
            break
    prog.close()
    if rows:
        append_log(out / "loss_dit.csv", rows)
    if (out / "loss_dit.csv").exists():
        plot_losses(out / "loss_dit.csv", out / "loss_dit.png", "rectified-flow loss")
    return ema, step + 1


# ------------------------------------------------------------------------------------------------- main
def run(cfg: TrainConfig) -> dict | None:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    deadline = Deadline(cfg.time_limit)
    dev = torch.device(cfg.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    init = load_exported(cfg.init_from) if cfg.init_from else None
    if init is None:
        vocab = train_tokenizers(out, t5_max_length=T5_MAX_LENGTH, clip_max_length=CLIP_MAX_LENGTH)
        fp, tc, cc, ap = model_configs(vocab["clip_vocab_size"], vocab["t5_vocab_size"], cfg.tiny)
    else:
        for name in ("tokenizer", "tokenizer_2"):  # the trained encoders' vocabularies, unchanged
            shutil.copytree(Path(cfg.init_from) / name, out / name, dirs_exist_ok=True)
        fp, tc, cc, ap = init["configs"]
    images, t5_ids, clip_ids = build_data(cfg, out)
    images = torch.from_numpy(images).to(dev)
    t5_ids, clip_ids = t5_ids.to(dev), clip_ids.to(dev)

    ae = train_vae(cfg, ap, images, out, deadline, init_state=init and init["vae"])
    if ae is None:
        return None
    ae.eval()
    if init is None:
        shift, scale = latent_stats(ae, images, dev)
        ap.shift_factor, ap.scale_factor = shift, scale
        ae.shift_factor, ae.scale_factor = shift, scale
    # (continuing: the frozen encoder's factors are kept, so latents match what the DiT was trained on)
    print(f"vae: latent shift_factor {ae.shift_factor:.4f} scale_factor {ae.scale_factor:.4f}")
    latents = encode_all(ae, images, dev)
    del images

    ema, steps_done = train_dit(cfg, (fp, tc, cc), latents, t5_ids, clip_ids, out, deadline,
                                init_state=init and init["text_to_image"])
    result = evaluate_run(cfg, ema, ae, out)
    result["dit_steps_done"] = steps_done
    if cfg.export:
        from .export import export_diffusers

        defaults = {"kind": "schnell", "default_steps": cfg.default_steps, "shift": cfg.shift,
                    "max_sequence_length": T5_MAX_LENGTH, "default_size": D.IMAGE_SIZE, "guidance": None}
        export_diffusers(cfg.export, flux_params=fp, flux_sd=ema.flux.state_dict(), t5_cfg=tc,
                         t5_sd=ema.t5.state_dict(), clip_cfg=cc, clip_sd=ema.clip.state_dict(), ae_params=ap,
                         ae_sd=ae.state_dict(), tokenizer_dir=out, defaults=defaults)
        print(f"exported to {cfg.export}")
    return result


def load_exported(folder) -> dict:
    """Weights and configs of an exported mini model, read with the engine's own loaders (float32)."""
    from ..loading import load_clip, load_t5, load_transformer, load_vae

    folder = Path(folder)
    flux = load_transformer(folder / "transformer", dtype=torch.float32)
    t5 = load_t5(folder / "text_encoder_2", dtype=torch.float32)
    clip = load_clip(folder / "text_encoder", dtype=torch.float32)
    ae = load_vae(folder / "vae", dtype=torch.float32)
    ap = copy.deepcopy(ae.params)
    ap.scale_factor, ap.shift_factor = ae.scale_factor, ae.shift_factor
    state = {**{"flux." + k: v for k, v in flux.state_dict().items()},
             **{"t5." + k: v for k, v in t5.state_dict().items()},
             **{"clip." + k: v for k, v in clip.state_dict().items()}}
    return {"configs": (flux.params, t5.cfg, clip.cfg, ap), "vae": ae.state_dict(), "text_to_image": state}


def evaluate_run(cfg: TrainConfig, ema: TextToImage, ae: AutoEncoder, out: Path) -> dict:
    """Held-out benchmark with the EMA weights in bf16 (what the exported 16-bit model runs)."""
    from .eval import evaluate, generate_with_modules, heldout_prompts
    from .grid import image_grid

    dev = torch.device(cfg.device)
    dtype = torch.bfloat16
    model = copy.deepcopy(ema).to(dtype).eval()
    ae16 = copy.deepcopy(ae).to(dtype).eval()
    clip_tok = load_clip_tokenizer(out / "tokenizer", CLIP_MAX_LENGTH)
    t5_tok = load_t5_tokenizer(out / "tokenizer_2", T5_MAX_LENGTH)

    def generator(steps):
        def generate(prompts, seeds):
            return generate_with_modules(model.flux, model.t5, model.clip, ae16, clip_tok, t5_tok, prompts, seeds,
                                         steps=steps, shift=cfg.shift, dtype=dtype, device=dev)
        return generate

    prompts = heldout_prompts(cfg.eval_single, cfg.eval_double)
    res = evaluate(generator(cfg.default_steps), prompts, batch_size=64)
    acc = res["accuracy"]
    other = {int(n): evaluate(generator(int(n)), prompts, batch_size=64)["accuracy"]
             for n in cfg.eval_other_steps.split(",") if n.strip()}
    (out / "eval.json").write_text(json.dumps({"sample_steps": cfg.default_steps, "shift": cfg.shift, "accuracy": acc,
                                               "accuracy_at_other_steps": other,
                                               "per_prompt": [{**p, **s} for p, s in zip(prompts, res["scores"])]},
                                              indent=1) + "\n")
    for n, a in other.items():
        print(f"eval at {n} steps: color_shape {a['color_shape']:.3f}, one_shape.color_shape "
              f"{a.get('one_shape.color_shape', float('nan')):.3f}")
    n = min(24, len(prompts))
    pick = list(range(0, len(prompts), max(1, len(prompts) // n)))[:n]
    rows = [[res["images"][i] for i in pick[r: r + 6]] for r in range(0, len(pick), 6)]
    image_grid(rows).save(out / "eval_grid.png")
    print("eval: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items() if k != "n"))
    return acc


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m nunchaku_lite.mini.train", description=__doc__.split("\n\n")[0])
    defaults = TrainConfig(out="")
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            p.add_argument(flag, type=type(value), default=value, required=name == "out")
    args = p.parse_args(argv)
    cfg = TrainConfig(**vars(args))
    if cfg.tiny:  # shrink everything not set explicitly on the command line
        argv = sys.argv[1:] if argv is None else argv
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        for k, v in dict(num_images=256, captions_per_image=2, vae_steps=6, vae_batch=4, dit_steps=6,
                         dit_batch=4, warmup=2, ckpt_every=4, log_every=1, default_steps=2, eval_single=4,
                         eval_double=2).items():
            if k not in given:
                setattr(cfg, k, v)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but no CUDA device is available; use --device cpu")
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    result = run(cfg)
    if result is None or result["dit_steps_done"] < cfg.dit_steps:
        return 3  # stopped at the time limit; rerun with the same arguments to resume
    return 0


if __name__ == "__main__":
    sys.exit(main())
