"""Per-step DiT latency of the plain forward (models/dit.py) vs the fused one (nunchaku_lite/fused.py), for the
16-bit model and the W4A4 model (the real FLUX.1 architecture, random weights), plus a torch.profiler table of
one fused step of each.

    python -m nunchaku_lite.bench.fused --arch flux-dev --size 1024 [--batch 1] [--steps 10] [--profile DIR]
        [--pow2-scales [--pow2-act]]

One process, one device: the 16-bit DiT is timed both ways, then quantized in place (bench.model.quick_w4a4_,
mode "random": kernel time does not depend on the values) and timed both ways again. Medians over --steps
steps after 2 warmup steps (CUDA events). rel_diff: relative L2 difference of the fused output from the plain
one on the same weights and inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from .. import fused
from ..models.dit import Flux as FluxDiT
from .model import Arch, Clock, build, dit_inputs, quick_w4a4_


def _profile(fn, path: Path, label: str, log) -> None:
    """One step under torch.profiler: the top CUDA kernels by device time, written to `path`."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    # device kernels only (the aten ops and runtime calls that launched them report the same time again)
    kernels = sorted((e for e in events if getattr(e, key, 0) > 0 and not e.key.startswith(("aten::", "cuda")))
                     , key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in kernels)
    lines = [f"# {label}: one step, {total / 1e3:.2f} ms of device time in {len(kernels)} distinct ops/kernels"]
    if torch.cuda.get_device_capability() >= (9, 0) and os.environ.get("NUNCHAKU_LITE_PDL", "1") != "0":
        lines.append("# (programmatic dependent launch on: a native kernel's time includes its wait for the one before;"
                     " NUNCHAKU_LITE_PDL=0 gives per-kernel times)")
    lines.append(f"{'ms':>8} {'%':>6} {'calls':>6}  name")
    for e in kernels[:40]:
        t = getattr(e, key)
        lines.append(f"{t / 1e3:8.3f} {100 * t / total:6.1f} {e.count:6d}  {e.key[:150]}")
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    log(text)


def run(arch_name="flux-dev", size=1024, batch=1, steps=10, rank=32, profile_dir=None, log=print,
        device="cuda", pow2=False, pow2_act=False) -> dict:
    device, dtype = torch.device(device), torch.bfloat16
    cuda = device.type == "cuda"
    arch, clock = Arch.named(arch_name), Clock(device)
    inputs = dit_inputs(arch, size, batch, device, dtype)
    tokens = inputs["img"].shape[1] + arch.txt_len
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    log(f"# {arch_name} {size}x{size} batch {batch}, {tokens} tokens, {name}, torch {torch.__version__}; "
        f"fused kernels: {fused._fused_lib() is not None}; cuBLASLt GELU epilogue is tanh: "
        f"{cuda and fused._lt_gelu_is_tanh(device)}")
    dit = build(lambda: FluxDiT(arch.dit), device, dtype)
    rows = []
    for kind in ("16bit", "w4a4"):
        if kind == "w4a4":
            quick_w4a4_(dit, rank, "random", pow2=pow2, pow2_act=pow2_act)
        outs = {}
        with torch.inference_mode():
            for path in ("plain", "fused", "fused+graph"):
                dit.set_fast(path != "plain")
                dit.enable_cuda_graph(path == "fused+graph" and cuda)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    times = clock.time_ms(lambda: dit(**inputs), steps, warmup=2)
                except Exception as e:  # report and go on with the other rows
                    log(f"{kind:<6} {path:<11} failed: {type(e).__name__}: {e}")
                    continue
                outs[path] = dit(**inputs).float()
                row = dict(model=kind, path=path, ms=statistics.median(times), ms_min=min(times),
                           peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0)
                rows.append(row)
                if path == "plain":
                    plain_ms = row["ms"]
                elif "plain" in outs:
                    row["rel_diff_vs_plain"] = float((outs[path] - outs["plain"]).norm() / outs["plain"].norm())
                    row["speedup_vs_plain"] = plain_ms / row["ms"]
                log(f"{kind:<6} {path:<11} {row['ms']:8.2f} ms/step (min {row['ms_min']:.2f})  peak "
                    f"{row['peak_gib']:.2f} GiB  rel_diff_vs_plain {row.get('rel_diff_vs_plain', 0):.2e}  "
                    f"speedup {row.get('speedup_vs_plain', 1.0):.2f}x")
            dit.enable_cuda_graph(False)
            if profile_dir is not None and cuda:
                dit.set_fast(True)
                _profile(lambda: dit(**inputs), Path(profile_dir) / f"profile_{kind}_fused.txt",
                         f"{kind} fused", log)
        del outs
    return dict(arch=arch_name, size=size, batch=batch, tokens=tokens, device=name,
                torch=torch.__version__, pow2_scales=pow2, pow2_act=pow2_act, rows=rows)


PROMPTS = ["a red circle on a blue background", "a large yellow star at the top left on a purple background",
           "a small white triangle at the bottom right on a black background",
           "a green cross at the center on an orange background"]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def fidelity(device="cuda", steps=None, log=print) -> dict:
    """Images of the embedded mini models ("mini" 16-bit, "mini-w4a4") from the fused path against the plain
    path (same seeds): PSNR per setting, and for W4A4 with the GELU epilogue on and off."""
    from ..pipeline import Flux
    res = {}
    for name in ("mini", "mini-w4a4"):
        pipe = Flux.from_pretrained(name, device=device, dtype=torch.bfloat16)
        seeds = list(range(len(PROMPTS)))
        run = lambda: pipe(PROMPTS, seed=seeds, steps=steps, output_type="pt", progress=False)  # noqa: E731
        pipe.transformer.set_fast(False)
        plain = run()
        pipe.transformer.set_fast(True)
        for epi in ((True, False) if name == "mini-w4a4" else (True,)):
            fused.W4A4_GELU_EPILOGUE = epi
            key = name + ("" if name == "mini" else f" gelu_epilogue={epi}")
            res[key] = psnr(run(), plain)
            log(f"fidelity {key}: PSNR fused vs plain {res[key]:.1f} dB")
        fused.W4A4_GELU_EPILOGUE = True
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nunchaku_lite.bench.fused", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="flux-dev", choices=["flux-dev", "flux-schnell", "tiny"])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--pow2-scales", action="store_true", help="power-of-two W4A4 weight group scales (the "
                    "folded sm_90 GEMM)")
    ap.add_argument("--pow2-act", action="store_true", help="power-of-two activation scales too (with "
                    "--pow2-scales: the sm_90 integer GEMM)")
    ap.add_argument("--profile", default=None, help="folder for the profiler tables of one fused step")
    ap.add_argument("--json", default=None)
    ap.add_argument("--fidelity", action="store_true", help="only the image PSNR of the fused path against the "
                    "plain one on the embedded mini models")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    if args.fidelity:
        result = fidelity(log=lambda s: print(s, flush=True))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return 0
    result = run(args.arch, args.size, args.batch, args.steps, args.rank, args.profile,
                 log=lambda s: print(s, flush=True), pow2=args.pow2_scales, pow2_act=args.pow2_act)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
