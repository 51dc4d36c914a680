"""How long SVDQuant takes on the full-size FLUX.1 architecture (random weights: time does not depend on values).

    python -m nunchaku_lite.bench.quantize_time --samples 4 --budget-s 400 --out results/

Builds FluxParams.dev() (11.9 B parameters) in bf16 in CPU RAM (each block is filled with N(0, 1/fan_in) on the
GPU, then moved to the CPU), makes `--samples` calibration inputs of realistic size (default 1024x1024: 4096
image + 512 text tokens), and runs `quantize()` block by block on the GPU with the default settings (alpha grid
20, rank 32, refinement 4, GPTQ, W4A16 modulation). One line per block; when `--budget-s` runs out the run
stops and the total is extrapolated from the mean double- and single-block times (and says so). A JSON summary
(per-block seconds, peak GPU memory, extrapolation) goes to OUT/quantize_time.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..models.dit import Flux, FluxParams
from ..quant.svdquant import quantize


class _OutOfTime(Exception):
    pass


def random_flux(params: FluxParams, device: str, dtype=torch.bfloat16, seed: int = 0) -> Flux:
    """Flux(params) with random weights in `dtype` on the CPU, initialized module by module on `device`."""
    with torch.device("meta"):
        model = Flux(params)
    gen = torch.Generator(device=device).manual_seed(seed)
    for child in model.children():
        parts = list(child) if isinstance(child, nn.ModuleList) else [child]
        for part in parts:
            part.to_empty(device=device)
            with torch.no_grad():
                for name, p in part.named_parameters():
                    if p.ndim == 2:
                        p.normal_(0, p.shape[1] ** -0.5, generator=gen)
                    elif name.endswith("scale"):
                        p.fill_(1.0)
                    else:
                        p.normal_(0, 0.02, generator=gen)
            part.to(dtype=dtype, device="cpu")
    return model.to(dtype)


def calibration_samples(params: FluxParams, n: int, img_tokens: int, txt_tokens: int, dtype) -> list[dict]:
    side = int(math.isqrt(img_tokens))
    img_ids = torch.zeros(1, img_tokens, 3)
    img_ids[0, :, 1] = torch.arange(img_tokens) // side
    img_ids[0, :, 2] = torch.arange(img_tokens) % side
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        out.append(dict(img=torch.randn(1, img_tokens, params.in_channels, generator=g).to(dtype), img_ids=img_ids,
                        txt=torch.randn(1, txt_tokens, params.context_in_dim, generator=g).to(dtype),
                        txt_ids=torch.zeros(1, txt_tokens, 3), timesteps=torch.tensor([(i + 0.5) / n], dtype=dtype),
                        y=torch.randn(1, params.vec_in_dim, generator=g).to(dtype),
                        guidance=torch.tensor([3.5], dtype=dtype) if params.guidance_embed else None))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--img-tokens", type=int, default=4096)
    ap.add_argument("--txt-tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop quantizing after this many seconds")
    ap.add_argument("--depth", type=int, help="double blocks to build (default 19: full model)")
    ap.add_argument("--depth-single", type=int, help="single blocks to build (default 38)")
    ap.add_argument("--hidden", type=int, help="hidden size (default 3072; smaller for a CPU dry run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=".", help="folder for quantize_time.json")
    args = ap.parse_args(argv)

    params = FluxParams.dev()
    if args.depth is not None:
        params.depth = args.depth
    if args.depth_single is not None:
        params.depth_single_blocks = args.depth_single
    if args.hidden is not None:
        params.hidden_size, params.num_heads = args.hidden, args.hidden // 128 or 1
        params.context_in_dim = args.hidden
        head = params.hidden_size // params.num_heads
        params.axes_dim = (head - 2 * (head * 7 // 16), head * 7 // 16, head * 7 // 16)
    dev = torch.device(args.device)
    info = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", torch=torch.__version__,
                params=str(params), samples=args.samples, img_tokens=args.img_tokens, txt_tokens=args.txt_tokens,
                rank=args.rank)
    print(json.dumps(info), flush=True)

    t0 = time.perf_counter()
    model = random_flux(params, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    info["build_s"] = time.perf_counter() - t0
    print(f"built {n_params / 1e9:.2f} B params in {info['build_s']:.1f}s", flush=True)
    cal = calibration_samples(params, args.samples, args.img_tokens, args.txt_tokens, torch.bfloat16)

    blocks, start = [], time.perf_counter()

    def progress(name, seconds, records):
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
        errs = [r["rel_err"] for r in records if "rel_err" in r]
        blocks.append(dict(block=name, seconds=seconds, peak_gib=peak, layers=len(records),
                           mean_rel_err=sum(errs) / max(1, len(errs))))
        print(f"{name}: {seconds:.2f}s (peak GPU {peak:.1f} GiB, mean layer rel err "
              f"{blocks[-1]['mean_rel_err']:.4f}) elapsed {time.perf_counter() - start:.0f}s", flush=True)
        if time.perf_counter() - start > args.budget_s:
            raise _OutOfTime

    finished = True
    try:
        quantize(model, cal, rank=args.rank, device=dev, progress=progress)
    except _OutOfTime:
        finished = False
    total = time.perf_counter() - start
    dbl = [b["seconds"] for b in blocks if b["block"].startswith("double")]
    sgl = [b["seconds"] for b in blocks if b["block"].startswith("single")]
    first = blocks[0]["seconds"] if blocks else 0.0
    # the first block's time includes capturing the embedder outputs; count it once, then the means
    mean_d = sum(dbl[1:]) / len(dbl[1:]) if len(dbl) > 1 else (dbl[0] if dbl else float("nan"))
    mean_s = sum(sgl) / len(sgl) if sgl else float("nan")
    if finished:
        estimate = total
    else:
        rest_d = params.depth - len(dbl)
        rest_s = params.depth_single_blocks - len(sgl)
        if not sgl:  # no single block timed: assume the ratio of their work (2 vs 8 linears, similar FLOPs/2)
            mean_s = mean_d * 0.45
        estimate = total + rest_d * mean_d + rest_s * mean_s
    info.update(finished=finished, quantize_s=total, blocks=blocks, mean_double_s=mean_d, mean_single_s=mean_s,
                first_block_s=first, estimated_total_s=estimate, extrapolated=not finished,
                peak_gib=max((b["peak_gib"] for b in blocks), default=0.0))
    what = "measured" if finished else (f"EXTRAPOLATED from {len(dbl)} double + {len(sgl)} single blocks")
    print(f"quantization of {params.depth} double + {params.depth_single_blocks} single blocks: "
          f"{estimate:.0f}s ({what}); mean double block {mean_d:.2f}s, single block {mean_s:.2f}s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantize_time.json").write_text(json.dumps(info, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
