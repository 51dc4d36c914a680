"""Measure the quantization methods on the mini model: prompt adherence (checker) on the held-out prompt set and
PSNR / SSIM against the 16-bit model's images (same prompts, same seeds), and optionally write the shipped
SVDQuant W4A4 transformer.

    python -m nunchaku_lite.mini.quant_table --out runs/quant            # table.md, table.json, grid.png
    python -m nunchaku_lite.mini.quant_table --out runs/quant --save-w4a4 nunchaku_lite/assets/mini-w4a4/transformer.safetensors

Uses quant.evaluate.evaluate (the `eval-quant` machinery) with this package's scorer, held-out prompts and
in-domain calibration captions (quantization calibrates on training-distribution captions, never on the
benchmark prompts).
"""
import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path


from .checker import score
from .data import parse_caption
from .eval import calibration_prompts, heldout_prompts

CONFIGS = (("svdquant", 32), ("svdquant", 16), ("smooth", 0), ("naive", 0), ("w4a16", 0))


def split_scorer(image, prompt: str) -> dict:
    """checker.score plus the headline split by prompt kind (one-shape / two-shape prompts)."""
    r = score(image, prompt)
    kind = "one" if len(parse_caption(prompt)["shapes"]) == 1 else "two"
    r[f"{kind}_shape_color_shape"] = r["color_shape"]
    return r


def table_markdown(rows: list[dict]) -> str:
    cols = [("method", "method"), ("rank", "rank"), ("acc:color_shape", "color+shape"),
            ("acc:one_shape_color_shape", "color+shape (1 shape)"), ("acc:two_shape_color_shape", "(2 shapes)"),
            ("acc:background", "background"), ("acc:position", "position"), ("acc:size", "size"),
            ("psnr", "PSNR dB vs 16-bit"), ("ssim", "SSIM vs 16-bit"), ("layer_err_mean", "layer rel. err")]
    out = "| " + " | ".join(c[1] for c in cols) + " |\n|" + "---|" * len(cols) + "\n"
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key)
            if v is None:
                cells.append("-")
            elif key.startswith("acc:"):
                cells.append(f"{100 * v:.1f}%")
            elif key == "psnr":
                cells.append("ref" if math.isinf(v) else f"{v:.2f}")
            elif key == "ssim":
                cells.append("ref" if r["method"] == "16-bit" else f"{v:.4f}")
            elif key == "layer_err_mean":
                cells.append("-" if r["method"] == "16-bit" else f"{v:.4f}")
            else:
                cells.append(str(v))
        out += "| " + " | ".join(cells) + " |\n"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nunchaku_lite.mini.quant_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for table.md, table.json and grid.png")
    p.add_argument("--model", default="mini")
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--n-single", type=int, default=84)
    p.add_argument("--n-double", type=int, default=24)
    p.add_argument("--calibration", type=int, default=32, help="number of calibration captions")
    p.add_argument("--configs", default=",".join(f"{m}:{r}" for m, r in CONFIGS),
                   help="comma-separated method:rank list")
    p.add_argument("--save-w4a4", default="", help="also write SVDQuant rank-32 W4A4 (our format) here")
    p.add_argument("--pow2-scales", action="store_true", help="power-of-two W4A4 weight group scales for every "
                   "quantized configuration (the Hopper GEMM's folded format)")
    p.add_argument("--pow2-act", action="store_true", help="power-of-two W4A4 activation group scales per token "
                   "(with --pow2-scales: the Hopper integer GEMM's format)")
    args = p.parse_args(argv)

    from ..pipeline import Flux
    from ..quant.evaluate import evaluate
    from ..quant.format import save_quantized
    from ..quant.svdquant import collect_pipeline_inputs, quantize

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = Flux.from_pretrained(args.model, device=args.device)
    prompts = [q["prompt"] for q in heldout_prompts(args.n_single, args.n_double)]
    calib = calibration_prompts(args.calibration)
    configs = [(m, int(r)) for m, r in (c.split(":") for c in args.configs.split(",") if c)]
    methods = tuple(dict.fromkeys(m for m, _ in configs))
    ranks = tuple(r for m, r in configs if m == "svdquant") or (32,)
    t0 = time.time()
    rows = evaluate(pipe, prompts, methods=methods, ranks=ranks, seeds=(0,), steps=args.steps,
                    calibration_prompts=calib, scorer=split_scorer, grid=out / "grid.png",
                    quantize_kwargs=dict(pow2_scales=args.pow2_scales, pow2_act=args.pow2_act))
    md = table_markdown(rows)
    (out / "table.md").write_text(md)
    (out / "table.json").write_text(json.dumps({"prompts": len(prompts), "seconds": time.time() - t0,
                                                "steps": args.steps or pipe.defaults.steps, "rows": rows},
                                               indent=1, default=str) + "\n")
    print(md)
    if args.save_w4a4:
        dit = copy.deepcopy(pipe.transformer)
        inputs = collect_pipeline_inputs(pipe, calib, args.steps)
        quantize(dit, inputs, method="svdquant", rank=32, progress=False)
        print(save_quantized(dit.to("cpu"), args.save_w4a4, method="svdquant"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
