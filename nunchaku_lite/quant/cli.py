"""`python -m nunchaku_lite quantize ...` and `python -m nunchaku_lite eval-quant ...` (registered by cli.py).

    quantize    --model PATH --out FILE [--prompts FILE] [--steps N] [--samples N] [--rank 32]
                [--method svdquant] [--device cuda]
    eval-quant  [--model PATH] [--prompts FILE] [--methods naive smooth svdquant] [--ranks 32] [--seeds 0 1]
                [--grid out.png]     (--model defaults to the embedded mini model)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .svdquant import METHODS, MODULATION


def _read_prompts(path: str | None, what: str) -> list[str] | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: prompts file not found: {p}")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{what}: {p} holds no prompts (one per line)")
    return prompts


def _load_pipeline(args):
    from ..pipeline import Flux

    if args.model is None:
        raise ValueError("pass --model PATH (a FLUX folder or an embedded model name)")
    return Flux.from_pretrained(args.model, device=args.device, dtype=args.dtype)


def _common_args(p: argparse.ArgumentParser, model_default: str | None = None) -> None:
    if model_default is None:
        p.add_argument("--model", required=True, help="FLUX pipeline folder (diffusers layout) or embedded model name")
    else:
        p.add_argument("--model", default=model_default,
                       help=f"FLUX pipeline folder (diffusers layout) or embedded model name (default {model_default})")
    p.add_argument("--device", help="where blocks are quantized and the pipeline runs (default: cuda if available)")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: the transformer's stored dtype)")
    p.add_argument("--steps", type=int, help="sampler steps per calibration prompt (default: the model's)")
    p.add_argument("--samples", type=int, default=128,
                   help="keep at most N (prompt, step) calibration samples, a random subset (default 128)")
    p.add_argument("--height", type=int, help="image height for calibration/evaluation (default: the model's)")
    p.add_argument("--width", type=int, help="image width for calibration/evaluation (default: the model's)")
    p.add_argument("--alpha-grid", type=int, default=20, help="smoothing search: alpha steps of 1/N (default 20)")
    p.add_argument("--refine-iters", type=int, default=4, help="low-rank refinement iterations (default 4)")
    p.add_argument("--modulation", choices=MODULATION, default="w4a16", help="adaLN modulation linears")
    p.add_argument("--fc2-unsigned", dest="fc2_unsigned", action="store_const", const=True, default=None,
                   help="unsigned shifted activations for the MLP output linears (default for svdquant)")
    p.add_argument("--fc2-signed", dest="fc2_unsigned", action="store_const", const=False,
                   help="signed activations for the MLP output linears (default for smooth and naive)")
    p.add_argument("--no-gptq", action="store_true", help="round-to-nearest instead of GPTQ for the INT4 weights")
    p.add_argument("--max-tokens", type=int, default=1024, help="input tokens sampled per layer (default 1024)")
    p.add_argument("--pow2-scales", action="store_true",
                   help="power-of-two W4A4 weight group scales (channel scale * 2^-e): a slightly coarser grid "
                        "that the Hopper GEMM folds into its weight operand (faster on H100/H200)")
    p.add_argument("--pow2-act", action="store_true",
                   help="power-of-two W4A4 activation group scales per token; with --pow2-scales the layers run "
                        "the Hopper integer GEMM (fastest on H100/H200, slightly coarser)")


def _quant_kwargs(args) -> dict:
    return dict(modulation=args.modulation, grid=args.alpha_grid, refine_iters=args.refine_iters,
                fc2_unsigned=args.fc2_unsigned, gptq=not args.no_gptq, max_tokens=args.max_tokens,
                pow2_scales=args.pow2_scales, pow2_act=args.pow2_act)


def _size(args) -> dict:
    return {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    _common_args(p)
    p.add_argument("--out", required=True, help="output .safetensors (our quantized format)")
    p.add_argument("--prompts", help="calibration prompts, one per line (default: 16 built-in captions)")
    p.add_argument("--rank", type=int, default=32, help="low-rank branch rank (default 32; 0 allowed)")
    p.add_argument("--method", choices=METHODS, default="svdquant", help="quantization method")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration noise and token sampling")


def run_quantize(args) -> int:
    import torch

    from .evaluate import CALIBRATION_PROMPTS
    from .format import save_quantized
    from .svdquant import collect_pipeline_inputs, quantize

    prompts = _read_prompts(args.prompts, "--prompts") or CALIBRATION_PROMPTS
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out: expected a .safetensors file name, got {out}")
    t0 = time.perf_counter()
    pipe = _load_pipeline(args)
    print(f"[quantize] loaded {args.model} in {time.perf_counter() - t0:.1f}s; calibrating on {len(prompts)} "
          "prompts", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    calib = collect_pipeline_inputs(pipe, prompts, args.steps, seed=args.seed, **_size(args))
    print(f"[quantize] captured {len(calib)} transformer inputs in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr, flush=True)
    dit = pipe.transformer
    device = pipe.device
    pipe.transformer = None
    del pipe  # text encoders and VAE are no longer needed
    dit.to("cpu")  # blocks visit the device one at a time
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    quantize(dit, calib, method=args.method, rank=args.rank, device=device, samples=args.samples, seed=args.seed,
             **_quant_kwargs(args))
    print(f"[quantize] quantized in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    save_quantized(dit, out)
    print(out)
    return 0


def add_eval_args(p: argparse.ArgumentParser) -> None:
    _common_args(p, model_default="mini")
    p.add_argument("--prompts", help="evaluation prompts, one per line (default: 4 built-in captions; for the mini "
                                     "model its held-out prompt set, scored by the attribute checker)")
    p.add_argument("--calibration-prompts", help="calibration prompts file (default: 16 built-in captions; for the "
                                                 "mini model 32 training-distribution captions)")
    p.add_argument("--methods", nargs="+", choices=METHODS,
                   help="default: naive smooth svdquant (mini model: also w4a16)")
    p.add_argument("--ranks", nargs="+", type=int,
                   help="ranks tried for svdquant (default 32; mini model: 32 16)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="noise seeds (same for every method)")
    p.add_argument("--grid", help="write a side-by-side PNG (rows: images; columns: 16-bit, then each method)")


_EVAL_PROMPTS = ["a red apple on a wooden table", "a lighthouse on a cliff at sunset",
                 "a portrait of a smiling woman with curly hair", "a city street in the rain at night"]


def run_eval(args) -> int:
    from .evaluate import evaluate, format_table

    prompts = _read_prompts(args.prompts, "--prompts")
    calib = _read_prompts(args.calibration_prompts, "--calibration-prompts")
    methods, ranks, scorer = args.methods or ["naive", "smooth", "svdquant"], args.ranks or [32], None
    if args.model == "mini":
        # The embedded model knows its prompt grammar: held-out prompts judged by the attribute checker,
        # calibration on training-distribution captions (never on the benchmark prompts).
        from ..mini.eval import calibration_prompts, heldout_prompts
        from ..mini.quant_table import split_scorer

        prompts, scorer = prompts or [p["prompt"] for p in heldout_prompts()], split_scorer
        calib = calib or calibration_prompts(32)
        methods, ranks = args.methods or ["svdquant", "smooth", "naive", "w4a16"], args.ranks or [32, 16]
    prompts = prompts or _EVAL_PROMPTS
    pipe = _load_pipeline(args)
    rows = evaluate(pipe, prompts, methods=methods, ranks=ranks, seeds=args.seeds, steps=args.steps,
                    height=args.height, width=args.width, calibration_prompts=calib, samples=args.samples,
                    scorer=scorer, grid=args.grid, quantize_kwargs=_quant_kwargs(args))
    print(format_table(rows))
    if args.grid:
        print(f"grid: {args.grid}", file=sys.stderr)
    return 0


SUBCOMMANDS = [
    ("quantize", "quantize a FLUX transformer to SVDQuant W4A4 (writes our .safetensors format)",
     add_quantize_args, run_quantize),
    ("eval-quant", "compare quantization methods with the 16-bit model (layer errors, image PSNR/SSIM)",
     add_eval_args, run_eval),
]
