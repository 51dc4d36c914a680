"""Prompt-adherence benchmark for the mini model, and image-similarity metrics for quantized variants.

    prompts = heldout_prompts()                       # fixed list of {"prompt", "seed"} (deterministic)
    result = evaluate(generate, prompts)              # generate(list[str], list[int]) -> list of images
    result["accuracy"]    # {"color_shape": 0.95, "shape": ..., "color": ..., "background": ..., ...}
    image_metrics(reference_images, images)           # {"psnr": dB, "ssim": ...} against the 16-bit images

The single-shape prompts use only (color, shape, background) triples held out of training (data.HELD_OUT), in
the four background-naming caption templates, with sizes and positions drawn from a fixed seed. The two-shape
prompts are drawn from all combinations. Images are judged by checker.score (deterministic, no model).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from .checker import score
from .data import DOUBLE_TEMPLATES, HELD_OUT, POSITIONS, SINGLE_TEMPLATES, SIZES, Shape, caption_for, random_shapes

HEADLINE = "color_shape"  # the target metric: color and shape both right


def heldout_prompts(n_single: int = 84, n_double: int = 24, seed: int = 2024) -> list[dict]:
    """The benchmark's prompt list: [{"prompt": str, "seed": int, "shapes": 1|2}, ...] (always the same)."""
    rng = np.random.default_rng(seed)
    triples = sorted(HELD_OUT)
    templates = [t for t, _ in SINGLE_TEMPLATES if "{bg}" in t]
    out = []
    for i in range(n_single):
        color, shape, bg = triples[i % len(triples)]
        size, pos = list(SIZES)[rng.integers(len(SIZES))], POSITIONS[rng.integers(len(POSITIONS))]
        sh = [Shape(shape, color, size, pos, (0.0, 0.0), 0.0)]
        out.append({"prompt": caption_for(sh, bg, templates[(i // len(triples) + i) % len(templates)]),
                    "seed": 10_000 + i, "shapes": 1})
    for i in range(n_double):
        bg, shapes = random_shapes(rng, 2, exclude=frozenset())
        out.append({"prompt": caption_for(shapes, bg, DOUBLE_TEMPLATES[i % len(DOUBLE_TEMPLATES)][0]),
                    "seed": 20_000 + i, "shapes": 2})
    return out


def calibration_prompts(n: int = 32, seed: int = 777) -> list[str]:
    """In-domain captions for quantization calibration (the training distribution, not the benchmark's)."""
    from .data import make_captions

    return make_captions(n, seed=seed)


def scorer(image, prompt: str) -> dict:
    """`eval-quant`'s scorer hook: checker.score on one image (uint8, or float [0, 1] as output_type="np")."""
    return score(image, prompt)


def summarize(scores: list[dict], prompts: list[dict]) -> dict:
    """Mean of every score key over the prompts that have it; also split by one-shape / two-shape prompts."""
    out = {}
    groups = {"": range(len(scores)),
              "one_shape.": [i for i, p in enumerate(prompts) if p.get("shapes", 1) == 1],
              "two_shapes.": [i for i, p in enumerate(prompts) if p.get("shapes", 1) == 2]}
    for prefix, idx in groups.items():
        keys = sorted({k for i in idx for k in scores[i]})
        for k in keys:
            vals = [scores[i][k] for i in idx if k in scores[i]]
            if vals:
                out[prefix + k] = float(np.mean(vals))
    out["n"] = len(scores)
    return out


def score_images(images, prompts) -> dict:
    """Scorer hook for `eval-quant`: accuracy dict for images generated from prompts (str or heldout dicts)."""
    prompts = [p if isinstance(p, dict) else {"prompt": p} for p in prompts]
    if len(images) != len(prompts):
        raise ValueError(f"score_images: {len(images)} images for {len(prompts)} prompts")
    return summarize([score(im, p["prompt"]) for im, p in zip(images, prompts)], prompts)


def evaluate(generate, prompts: list[dict] | None = None, batch_size: int = 16) -> dict:
    """Run generate(prompts, seeds) -> images over the prompt set in batches and score every image.
    Returns {"accuracy": summary dict, "scores": per-prompt dicts, "images": the images, "prompts": prompts}."""
    prompts = heldout_prompts() if prompts is None else prompts
    images = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i: i + batch_size]
        images.extend(generate([p["prompt"] for p in chunk], [p["seed"] for p in chunk]))
    scores = [score(im, p["prompt"]) for im, p in zip(images, prompts)]
    return {"accuracy": summarize(scores, prompts), "scores": scores, "images": images, "prompts": prompts}


# ------------------------------------------------------------------------------------------- similarity
def _as_float_batch(images) -> torch.Tensor:
    arrs = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).double()  # [B, 3, H, W], 0..255


def psnr(reference, images) -> list[float]:
    """Per-image PSNR in dB (peak 255) of uint8 images against references; inf where identical."""
    a, b = _as_float_batch(reference), _as_float_batch(images)
    mse = ((a - b) ** 2).mean((1, 2, 3))
    return [math.inf if m == 0 else float(10 * torch.log10(255.0 ** 2 / m)) for m in mse]


def ssim(reference, images, window: int = 11, sigma: float = 1.5) -> list[float]:
    """Per-image SSIM (Wang et al. 2004: Gaussian window 11/1.5, K1 0.01, K2 0.03, L 255), averaged over the
    RGB channels and all valid window positions."""
    a, b = _as_float_batch(reference), _as_float_batch(images)
    x = torch.arange(window, dtype=torch.float64) - window // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(3, 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, groups=3)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean((1, 2, 3)).tolist()


def image_metrics(reference, images) -> dict:
    """Mean PSNR (identical pairs count as 100 dB) and mean SSIM of images against the references."""
    p = [min(v, 100.0) for v in psnr(reference, images)]
    return {"psnr": float(np.mean(p)), "ssim": float(np.mean(ssim(reference, images)))}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """rows of {column: value}; floats in [0, 1] for accuracy columns print as percentages."""
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    lines = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            if isinstance(v, float):
                v = f"{100 * v:.1f}%" if ("acc" in c or c in (HEADLINE, "shape", "color", "background", "position")) \
                    else f"{v:.2f}" if c != "ssim" else f"{v:.3f}"
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- sampling with bare modules
@torch.no_grad()
def generate_with_modules(flux, t5, clip, ae, clip_tokenizer, t5_tokenizer, prompts: list[str], seeds: list[int],
                          steps: int = 20, shift: bool = True, size: int = 128, dtype=torch.bfloat16,
                          device="cpu") -> list[np.ndarray]:
    """Text-to-image with the four modules, following FLUX's sampling (schnell-type: no guidance):
    per-seed noise from a CPU generator, Euler steps on the (optionally shifted) schedule, VAE decode,
    clamp, then uint8 by truncation. Returns uint8 [size, size, 3] arrays."""
    from ..sampling import denoise, get_noise, get_schedule, pack, prepare_ids, unpack

    txt = t5(t5_tokenizer(prompts).to(device)).to(dtype)
    _, vec = clip(clip_tokenizer(prompts).to(device))
    noise = torch.cat([get_noise(1, size, size, seed, dtype=dtype) for seed in seeds]).to(device)
    img = pack(noise)
    img_ids, txt_ids = prepare_ids(len(prompts), noise.shape[2], noise.shape[3], txt.shape[1], device=device)
    timesteps = get_schedule(steps, img.shape[1], shift=shift)
    img = denoise(flux, img, img_ids, txt, txt_ids, vec.to(dtype), timesteps, guidance=None)
    x = ae.decode(unpack(img.float(), size, size).to(ae.dtype)).float().clamp(-1, 1)
    x = (127.5 * (x + 1)).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(x)


def main(argv=None) -> int:
    """python -m nunchaku_lite.mini.eval [--model mini] [--steps 20] [--device cpu]: the benchmark, as JSON."""
    import argparse
    import json
    from pathlib import Path

    from ..loading import load_clip, load_t5, load_transformer, load_vae
    from ..pipeline import ASSETS
    from ..tokenizers import load_clip_tokenizer, load_t5_tokenizer

    p = argparse.ArgumentParser(prog="python -m nunchaku_lite.mini.eval", description=main.__doc__)
    p.add_argument("--model", default="mini", help="'mini' or a folder in its layout")
    p.add_argument("--transformer", default=None, help="another transformer (e.g. a quantized .safetensors)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    root = ASSETS / "mini" if args.model == "mini" else Path(args.model)
    dtype, dev = torch.bfloat16, torch.device(args.device)
    flux = load_transformer(args.transformer or root / "transformer", device=dev, dtype=dtype)
    t5 = load_t5(root / "text_encoder_2", device=dev, dtype=dtype)
    clip = load_clip(root / "text_encoder", device=dev, dtype=dtype)
    ae = load_vae(root / "vae", device=dev, dtype=dtype)
    max_len = json.loads((root / "model_index.json").read_text()).get("_nunchaku_lite", {}).get("max_sequence_length", 32)
    ct, tt = load_clip_tokenizer(root / "tokenizer"), load_t5_tokenizer(root / "tokenizer_2", max_len)

    def generate(prompts, seeds):
        return generate_with_modules(flux, t5, clip, ae, ct, tt, prompts, seeds, steps=args.steps, device=dev)

    print(json.dumps(evaluate(generate, batch_size=36)["accuracy"], indent=1))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
