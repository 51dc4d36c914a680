"""Quality of quantization methods against the 16-bit model: per-layer errors and final-image PSNR / SSIM.

    from nunchaku_lite import Flux
    from nunchaku_lite.quant.evaluate import evaluate, format_table
    pipe = Flux.from_pretrained("path/to/FLUX.1-schnell")
    rows = evaluate(pipe, ["a red circle"], methods=("naive", "svdquant"), ranks=(32,), seeds=(0, 1))
    print(format_table(rows))

For every (method, rank), a CPU copy of the 16-bit transformer is quantized with the same calibration inputs
(captured once from the 16-bit pipeline), swapped into the pipeline, and its images for the same prompts and
seeds are compared with the 16-bit model's: PSNR (dB, images in [0, 1]) and SSIM (Gaussian window 11, sigma
1.5, per RGB channel, averaged). The per-layer figures are the quantizer's relative output errors on sampled
calibration tokens (`quant_report`). An optional `scorer(image, prompt) -> {name: bool}` adds accuracy columns
(fraction of images for which each check holds), for the 16-bit model too. Memory: the 16-bit transformer is
kept on the CPU while a copy of it is quantized (two 16-bit copies in CPU RAM at the peak).
"""
from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .svdquant import METHODS, collect_pipeline_inputs, quantize

# Generic captions for calibration (distinct from any evaluation prompts a user would pick).
CALIBRATION_PROMPTS = [
    "a photograph of an astronaut riding a horse on the moon",
    "a bowl of ramen with chopsticks, studio lighting",
    "a watercolor painting of a lighthouse at dawn",
    "a red sports car parked in front of a modern house",
    "a close-up portrait of an old fisherman with a grey beard",
    "a cozy library with wooden shelves and a fireplace",
    "an aerial view of a river winding through autumn forest",
    "a cat wearing sunglasses sitting on a beach chair",
    "a neon sign that says OPEN in a rainy street at night",
    "a bouquet of sunflowers in a blue ceramic vase",
    "a snowy mountain village under the northern lights",
    "a robot chef cooking pancakes in a small kitchen",
    "an oil painting of a stormy sea with a sailing ship",
    "a minimalist poster of a geometric fox, flat colors",
    "a plate of sushi on a black slate table, top view",
    "a child flying a kite in a green field, summer afternoon",
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images with values in [0, 1] (inf when identical)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two [H, W, C] images in [0, 1] (Wang et al. 2004; Gaussian window, per channel)."""
    x = torch.as_tensor(np.asarray(a, np.float64)).permute(2, 0, 1)[:, None]  # [C, 1, H, W]
    y = torch.as_tensor(np.asarray(b, np.float64)).permute(2, 0, 1)[:, None]
    window = min(window, x.shape[-1], x.shape[-2])
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :])[None, None]

    def blur(t):
        return F.conv2d(t, kernel)  # "valid" windows only, as in the reference implementation

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def _images(pipe, prompts, seeds, **kw) -> list[np.ndarray]:
    """Images [H, W, 3] in [0, 1] ordered seed-major: for each seed, every prompt."""
    out = []
    for seed in seeds:
        out += list(pipe(prompts, seed=seed, output_type="np", **kw))
    return out


def _scores(scorer, images, prompts_per_image) -> dict[str, float]:
    if scorer is None:
        return {}
    totals: dict[str, list[bool]] = {}
    for image, prompt in zip(images, prompts_per_image):
        for name, ok in scorer(image, prompt).items():
            totals.setdefault(name, []).append(bool(ok))
    return {f"acc:{k}": sum(v) / len(v) for k, v in totals.items()}


def _configs(methods, ranks) -> list[tuple[str, int]]:
    out = []
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"eval-quant: unknown method {m!r}; choose from {', '.join(METHODS)}")
        for r in ranks if m == "svdquant" else [0]:
            if (m, r) not in out:
                out.append((m, r))
    return out


@torch.no_grad()
def evaluate(pipe, prompts, methods=("naive", "smooth", "svdquant"), ranks=(32,), seeds=(0,), *, steps=None,
             height=None, width=None, calibration_prompts=None, calibration_steps=None, samples=None,
             scorer=None, grid=None, device=None, quantize_kwargs=None, log=None) -> list[dict]:
    """Compare quantization methods on `pipe` (a nunchaku_lite.Flux with a 16-bit transformer).

    Returns one row per configuration, the 16-bit model first: method, rank, psnr and ssim (means over the
    prompts x seeds images; inf / 1.0 for the 16-bit row), layer_err_mean / layer_err_max (relative output
    error over the W4A4 layers, or all quantized layers for w4a16), quant_seconds, and acc:<name> columns
    when `scorer` is given. `grid`: path of a PNG with one row per image and one column per configuration.
    The pipeline's own transformer is restored afterwards.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("evaluate: prompts must be a non-empty list of strings")
    configs = _configs(methods, ranks)
    log = log or (lambda *a: print(*a, file=sys.stderr, flush=True))
    kw = dict(steps=steps, height=height, width=width)
    size = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    base = pipe.transformer
    home = next(base.parameters()).device
    per_image_prompts = [p for _ in seeds for p in prompts]

    log(f"[eval-quant] 16-bit reference: {len(per_image_prompts)} images")
    ref_images = _images(pipe, prompts, seeds, **kw)
    calib = collect_pipeline_inputs(pipe, calibration_prompts or CALIBRATION_PROMPTS, calibration_steps, **size)
    rows = [dict(method="16-bit", rank=None, psnr=math.inf, ssim=1.0, layer_err_mean=0.0, layer_err_max=0.0,
                 quant_seconds=0.0, **_scores(scorer, ref_images, per_image_prompts))]
    columns = [ref_images]
    base.to("cpu")
    try:
        for method, rank in configs:
            log(f"[eval-quant] {method} rank {rank}: quantizing")
            qdit = copy.deepcopy(base)
            t0 = time.perf_counter()
            quantize(qdit, calib, method=method, rank=rank, device=device or home, samples=samples,
                     progress=False, **(quantize_kwargs or {}))
            seconds = time.perf_counter() - t0
            pipe.transformer = qdit.to(home)
            images = _images(pipe, prompts, seeds, **kw)
            errs = [r["rel_err"] for r in qdit.quant_report if "rel_err" in r]
            rows.append(dict(method=method, rank=rank,
                             psnr=float(np.mean([psnr(a, b) for a, b in zip(images, ref_images)])),
                             ssim=float(np.mean([ssim(a, b) for a, b in zip(images, ref_images)])),
                             layer_err_mean=float(np.mean(errs)) if errs else float("nan"),
                             layer_err_max=float(np.max(errs)) if errs else float("nan"),
                             quant_seconds=seconds, **_scores(scorer, images, per_image_prompts)))
            columns.append(images)
            pipe.transformer = None
            del qdit
    finally:
        pipe.transformer = base.to(home)
    if grid is not None:
        save_grid(columns, grid)
    return rows


def save_grid(columns: list[list[np.ndarray]], path) -> Path:
    """One row per image index, one column per configuration; written as PNG."""
    from PIL import Image

    rows = [np.concatenate([col[i] for col in columns], axis=1) for i in range(len(columns[0]))]
    array = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).round().astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def format_table(rows: list[dict]) -> str:
    """A plain-text table of evaluate()'s rows."""
    extra = sorted({k for r in rows for k in r if k.startswith("acc:")})
    head = ["method", "rank", "PSNR dB", "SSIM", "layer err mean", "layer err max", "quant s"] + extra
    lines = []
    for r in rows:
        cells = [r["method"], "-" if r["rank"] is None else str(r["rank"]),
                 "inf" if math.isinf(r["psnr"]) else f"{r['psnr']:.2f}", f"{r['ssim']:.4f}",
                 f"{r['layer_err_mean']:.4f}", f"{r['layer_err_max']:.4f}", f"{r['quant_seconds']:.1f}"]
        cells += [f"{r[k]:.3f}" if k in r else "-" for k in extra]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])
