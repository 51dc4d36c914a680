"""Full-size model benchmark without downloads: the real FLUX.1 architecture with random weights.

    python -m nunchaku_lite.bench model --arch flux-dev --size 1024 --batch 1 [--json out.json]

Phases, in one process on one device (weights built on the meta device, then filled in place with random
values on the target device: no CPU detour):
  dit-16bit   our 16-bit DiT: per-step latency (median over --steps timed steps, CUDA events), weights, peak
  dit-w4a4    the same DiT quickly quantized (no calibration): block linears W4A4 with identity smoothing,
              a rank-r truncated SVD of the weight (torch.svd_lowrank, on the device) as the low-rank branch
              and the INT4 residual; modulation linears W4A16 (QUANT's defaults). Kernel time does not depend
              on the values, so this times what a calibrated checkpoint would. --quick random skips the SVD
              (random codes), for when the 16-bit model does not fit beside the 4-bit one.
  text        T5-XXL 16-bit and W4A16 (quantized in place), CLIP-L: one batch of prompts each
  vae         decode of one batch of latents, one image at a time (as the pipeline does): full and tiled
  pipeline    whole generations (--pipeline-steps steps) with the W4A4 DiT in each memory mode:
              "resident" (everything on the device, 16-bit T5, full decode) and "offload" (Flux.enable_model_
              offload, W4A16 T5, VAE tiling "auto"): peak device memory and wall time of each
The 16-bit DiT is freed before the other phases. Memory: on CUDA torch.cuda.max_memory_allocated per phase
(reset at its start, so it includes whatever stays resident from earlier phases, e.g. the W4A4 DiT during
"text"), plus resident_gib (allocated after the phase: kernels' cached weight copies show there); on CPU only
the weight bytes are meaningful. --weights-only prints every component's and memory mode's weight bytes from
meta-device models (any machine, seconds). --arch tiny is a tiny FLUX for smoke tests on a CPU.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import sampling
from ..memory import module_bytes, quantize_w4a16_
from ..models.clip import CLIPConfig, CLIPTextModel
from ..models.dit import Flux as FluxDiT
from ..models.dit import FluxParams
from ..models.t5 import T5Config, T5Encoder
from ..models.vae import AutoEncoder, AutoEncoderParams
from ..quant.modules import W4A4Linear
from ..quant.svdquant import is_modulation

GiB = 2**30


@dataclass
class Arch:
    dit: FluxParams
    t5: T5Config
    clip: CLIPConfig
    vae: AutoEncoderParams
    txt_len: int  # T5 tokens per prompt (dev 512, schnell 256)
    kind: str

    @classmethod
    def named(cls, name: str) -> "Arch":
        if name == "flux-dev":
            return cls(FluxParams.dev(), T5Config(), CLIPConfig(), AutoEncoderParams(), 512, "dev")
        if name == "flux-schnell":
            return cls(FluxParams.schnell(), T5Config(), CLIPConfig(), AutoEncoderParams(), 256, "schnell")
        if name == "tiny":  # every dimension a multiple of 64 (the quantized GEMMs' group), one block of each kind
            dit = FluxParams(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=64, hidden_size=128,
                             num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(16, 24, 24), guidance_embed=True)
            t5 = T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2)
            clip = CLIPConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2)
            vae = AutoEncoderParams(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
            return cls(dit, t5, clip, vae, 32, "dev")
        raise ValueError(f"--arch must be flux-dev, flux-schnell or tiny, got {name!r}")


# ---------------------------------------------------------------------------------------------------------
# Building random models on the device


@torch.no_grad()
def random_fill_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter in place: matrices and conv kernels N(0, 1/fan_in) (embedding tables N(0, 1)),
    norm gains 1 (the only 1-D weights/scales), biases 0. Keeps activations near unit variance at any depth;
    the values only matter for the W4A4-vs-16-bit sanity figure."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    tables = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, nn.Embedding)}
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, 1.0 if name in tables else 1.0 / math.sqrt(p[0].numel()), generator=gen)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)
    return module


def build(make, device, dtype, seed=0) -> nn.Module:
    """make() on the meta device, cast there, allocated on `device` (never materialized elsewhere), filled."""
    with torch.device("meta"):
        module = make()
    module = module.to(dtype).to_empty(device=device)
    return random_fill_(module, seed).eval().requires_grad_(False)


@torch.no_grad()
def quick_w4a4_(dit: nn.Module, rank: int = 32, mode: str = "svd", seed: int = 0) -> nn.Module:
    """Quantize a DiT's block linears to W4A4 without calibration, in place, one layer at a time on its device.

    mode "svd": smooth = 1, low-rank branch = rank-r truncated SVD of W (torch.svd_lowrank, 2 power
    iterations), INT4 residual W - L1 L2 (round to nearest). mode "random": random codes, scales and low-rank
    factors of plausible magnitude (no 16-bit weight read; timing only). mode "empty": the modules only (for
    a model on the meta device: sizes without memory). Modulation linears become W4A16."""
    if mode not in ("svd", "random", "empty"):
        raise ValueError(f"quick quantization mode must be 'svd', 'random' or 'empty', got {mode!r}")
    device = next(dit.parameters()).device
    gen = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)
    blocks = [(f"double_blocks.{i}", b) for i, b in enumerate(dit.double_blocks)] + \
             [(f"single_blocks.{i}", b) for i, b in enumerate(dit.single_blocks)]
    for _, block in blocks:
        quantize_w4a16_(block, select=is_modulation)
        for name, lin in [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]:
            w = lin.weight
            if mode == "svd":
                u, s, v = torch.svd_lowrank(w.float(), q=rank, niter=2)
                up, down = u * s, v.T  # [N, r], [r, K]
                q = W4A4Linear.from_linear(lin, w.float() - up @ down, lora_down=down, lora_up=up)
            elif mode in ("random", "empty"):
                q = W4A4Linear(lin.in_features, lin.out_features, rank, bias=lin.bias is not None, dtype=w.dtype,
                               device=w.device)
            if mode == "random":
                q.qweight.copy_(torch.randint(0, 256, q.qweight.shape, generator=gen, device=w.device,
                                              dtype=torch.int32).to(torch.uint8))
                q.wscales.fill_(1.0 / (4 * math.sqrt(lin.in_features)))  # codes ~U(-8, 7): std ~4.6 * scale
                q.lora_down.normal_(0, 1 / math.sqrt(lin.in_features), generator=gen)
                q.lora_up.normal_(0, 0.1 / math.sqrt(max(rank, 1)), generator=gen)
                if lin.bias is not None:
                    q.bias.copy_(lin.bias)
            block.set_submodule(name, q)
            del lin, w
    dit.quant_config = dict(method=f"quick-{mode}", rank=rank, modulation="w4a16")
    return dit


class RandomTokenizer:
    """Stand-in tokenizer: fixed pseudo-random ids [B, max_length] (the bench measures, it does not read)."""

    def __init__(self, vocab_size: int, max_length: int):
        self.vocab_size, self.max_length = vocab_size, max_length

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(len(prompts))
        return torch.randint(1, self.vocab_size, (len(prompts), self.max_length), generator=gen)


# ---------------------------------------------------------------------------------------------------------
# Timing and memory


class Clock:
    """Device-side timing: CUDA events on CUDA (no host sync inside the timed work), perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time_ms(self, fn, repeats: int, warmup: int = 1) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return times

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class Phase:
    name: str
    ms: float | None = None  # median per call
    ms_all: list[float] = field(default_factory=list)
    weight_bytes: int | None = None
    peak_bytes: int | None = None  # CUDA only
    extra: dict = field(default_factory=dict)


def _reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def measure(name, device, clock, fn, repeats, warmup=1, weight_bytes=None, **extra) -> Phase:
    _reset_peak(device)
    try:
        times = clock.time_ms(fn, repeats, warmup)
    except torch.OutOfMemoryError:
        _reset_peak(device)
        return Phase(name, weight_bytes=weight_bytes, extra=dict(extra, error="out of memory"))
    if device.type == "cuda":  # what stays allocated after the phase (e.g. kernels' cached weight copies)
        extra = dict(extra, resident_gib=round(torch.cuda.memory_allocated(device) / GiB, 3))
    return Phase(name, statistics.median(times), times, weight_bytes, _peak(device), extra)


# ---------------------------------------------------------------------------------------------------------
# The benchmark


def latent_side(arch: Arch, size: int) -> int:
    return 2 * math.ceil(size / (2 * arch.vae.downsample_factor))


def dit_inputs(arch: Arch, size: int, batch: int, device, dtype) -> dict:
    lat_h = lat_w = latent_side(arch, size)
    gen = torch.Generator().manual_seed(0)
    img = sampling.pack(torch.randn(batch, arch.dit.in_channels // 4, lat_h, lat_w, generator=gen))
    img_ids, txt_ids = sampling.prepare_ids(batch, lat_h, lat_w, arch.txt_len)
    x = dict(img=img.to(dtype), img_ids=img_ids, txt=torch.randn(batch, arch.txt_len, arch.dit.context_in_dim,
             generator=gen).to(dtype), txt_ids=txt_ids, y=torch.randn(batch, arch.dit.vec_in_dim, generator=gen).to(dtype),
             timesteps=torch.full((batch,), 0.7, dtype=dtype))
    if arch.dit.guidance_embed:
        x["guidance"] = torch.full((batch,), 3.5, dtype=dtype)
    return {k: v.to(device) for k, v in x.items()}


def compile_blocks(dit: nn.Module) -> None:
    """torch.compile every block in place (as Flux.compile_transformer does)."""
    for block in [*dit.double_blocks, *dit.single_blocks]:
        block.compile()


def run(arch_name="flux-dev", size=1024, batch=1, device=None, dtype=torch.bfloat16, steps=5, rank=32,
        quick="svd", pipeline_steps=2, skip_16bit=False, compile=False, log=print) -> dict:
    """Run every phase; returns the JSON-able result (see the module docstring)."""
    from ..pipeline import Flux, SamplingDefaults

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    arch, clock = Arch.named(arch_name), Clock(device)
    if quick == "svd" and skip_16bit:
        quick = "random"  # the SVD reads the 16-bit weights
    phases: list[Phase] = []
    inputs = dit_inputs(arch, size, batch, device, dtype)
    tokens = inputs["img"].shape[1] + arch.txt_len
    log(f"# {arch_name} {size}x{size} batch {batch} on {_device_name(device)}, {dtype}, {tokens} tokens per image")

    def step(dit):
        return lambda: dit(**inputs)

    # -- DiT: 16-bit, then W4A4 (the 16-bit model is the SVD source, then freed)
    dit = build(lambda: FluxDiT(arch.dit), device, dtype)
    if compile:
        compile_blocks(dit)  # the warmup steps of each DiT phase compile
    ref = None
    if not skip_16bit:
        with torch.inference_mode():
            p = measure("dit-16bit", device, clock, step(dit), steps, warmup=2, weight_bytes=module_bytes(dit))
            if p.ms is not None:
                ref = dit(**inputs).float()
        phases.append(p)
        log(_row(p))
    t0 = time.perf_counter()
    quick_w4a4_(dit, rank, quick)
    if compile:
        compile_blocks(dit)
    clock.sync()
    quant_s = time.perf_counter() - t0
    _reset_peak(device)
    with torch.inference_mode():
        p = measure("dit-w4a4", device, clock, step(dit), steps, warmup=2, weight_bytes=module_bytes(dit),
                    quantize_s=round(quant_s, 2), native_kernels=_native_available(device))
        if ref is not None and p.ms is not None:
            out = dit(**inputs).float()
            p.extra["rel_l2_vs_16bit"] = float((out - ref).norm() / ref.norm())
    phases.append(p)
    log(_row(p))
    del ref

    # -- text encoders and VAE (16-bit), each alone on the device beside the W4A4 DiT
    t5 = build(lambda: T5Encoder(arch.t5), device, dtype, seed=1)
    clip = build(lambda: CLIPTextModel(arch.clip), device, dtype, seed=2)
    vae = build(lambda: AutoEncoder(arch.vae), device, dtype, seed=3)
    t5_ids = RandomTokenizer(arch.t5.vocab_size, arch.txt_len)([""] * batch).to(device)
    clip_ids = RandomTokenizer(arch.clip.vocab_size, arch.clip.max_position_embeddings)([""] * batch).to(device)
    reps = max(2, steps // 2)
    with torch.inference_mode():
        for p in (measure("t5-16bit", device, clock, lambda: t5(t5_ids), reps, weight_bytes=module_bytes(t5)),
                  measure("clip", device, clock, lambda: clip(clip_ids), reps, weight_bytes=module_bytes(clip))):
            phases.append(p)
            log(_row(p))
        side = latent_side(arch, size)
        lat = sampling.unpack(inputs["img"], side * 8, side * 8)  # unpack takes 8x-VAE pixel sizes
        # one image at a time, as the pipeline decodes
        for name, fn in (("vae-decode", lambda: [vae.decode(z) for z in lat.split(1)]),
                         ("vae-decode-tiled", lambda: [vae.decode_tiled(z) for z in lat.split(1)])):
            p = measure(name, device, clock, fn, reps, weight_bytes=module_bytes(vae))
            phases.append(p)
            log(_row(p))

    # -- whole generations in each memory mode (W4A4 DiT)
    defaults = SamplingDefaults.for_kind(arch.kind)
    defaults.max_sequence_length = arch.txt_len
    tok = RandomTokenizer(arch.clip.vocab_size, arch.clip.max_position_embeddings)
    tok2 = RandomTokenizer(arch.t5.vocab_size, arch.txt_len)
    prompts = ["a benchmark"] * batch

    def generate(pipe):
        return lambda: pipe(prompts, steps=pipeline_steps, height=size, width=size, seed=0, output_type="pt")

    pipe = Flux(dit, vae, clip, t5, tok, tok2, defaults, device=device, dtype=dtype)
    pipe.vae_tiling = False
    p = measure("pipeline-resident", device, clock, generate(pipe), 1, warmup=1,
                weight_bytes=sum(module_bytes(m) for m in (dit, t5, clip, vae)), steps=pipeline_steps,
                t5="16bit", vae_tiling=False)
    phases.append(p)
    log(_row(p))
    quantize_w4a16_(t5)
    with torch.inference_mode():
        p = measure("t5-w4a16", device, clock, lambda: t5(t5_ids), reps, weight_bytes=module_bytes(t5))
    phases.append(p)
    log(_row(p))
    pipe = Flux(dit, vae, clip, t5, tok, tok2, defaults, device=device, dtype=dtype).enable_model_offload()
    p = measure("pipeline-offload", device, clock, generate(pipe), 1, warmup=1, weight_bytes=module_bytes(dit),
                steps=pipeline_steps, t5="w4a16", vae_tiling="auto",
                vae_tiled=pipe._tiled(lat.shape[2], lat.shape[3]))
    phases.append(p)
    log(_row(p))

    return _summary(arch_name, size, batch, device, dtype, tokens, phases, compile)


def weight_plan(arch_name: str, dtype=torch.bfloat16, rank: int = 32) -> dict:
    """Weight bytes of every component and of each memory mode, from modules built on the meta device (no
    memory, any machine). resident: everything on the device (16-bit T5); offload: the W4A4 DiT resident plus
    the largest component lent at a time (W4A16 T5). Activations come on top (measured by `run` on CUDA)."""
    arch = Arch.named(arch_name)
    with torch.device("meta"):
        dit, t5 = FluxDiT(arch.dit).to(dtype), T5Encoder(arch.t5).to(dtype)
        clip, vae = CLIPTextModel(arch.clip).to(dtype), AutoEncoder(arch.vae).to(dtype)
    b = {"dit-16bit": module_bytes(dit), "t5-16bit": module_bytes(t5), "clip": module_bytes(clip),
         "vae": module_bytes(vae)}
    b["dit-w4a4"] = module_bytes(quick_w4a4_(dit, rank, "empty"))
    b["t5-w4a16"] = module_bytes(quantize_w4a16_(t5))
    b["mode-resident-16bit-dit"] = b["dit-16bit"] + b["t5-16bit"] + b["clip"] + b["vae"]
    b["mode-resident"] = b["dit-w4a4"] + b["t5-16bit"] + b["clip"] + b["vae"]
    b["mode-offload"] = b["dit-w4a4"] + max(b["t5-w4a16"], b["clip"], b["vae"])
    return dict(arch=arch_name, dtype=str(dtype).replace("torch.", ""), rank=rank,
                weight_gib={k: v / GiB for k, v in b.items()})


def _native_available(device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from .. import native
        return bool(native.available())
    except Exception:
        return False


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _summary(arch_name, size, batch, device, dtype, tokens, phases: list[Phase], compile=False) -> dict:
    by = {p.name: p for p in phases}
    ratios = {}
    a, b = by.get("dit-16bit"), by.get("dit-w4a4")
    if a and b and a.ms and b.ms:
        ratios["dit_step_speedup_w4a4"] = a.ms / b.ms
        ratios["dit_weight_ratio_16bit_over_w4a4"] = a.weight_bytes / b.weight_bytes
        if a.peak_bytes and b.peak_bytes:
            ratios["dit_peak_ratio_16bit_over_w4a4"] = a.peak_bytes / b.peak_bytes
    a, b = by.get("t5-16bit"), by.get("t5-w4a16")
    if a and b and a.ms and b.ms:
        ratios["t5_time_ratio_w4a16_over_16bit"] = b.ms / a.ms
        ratios["t5_weight_ratio_16bit_over_w4a16"] = a.weight_bytes / b.weight_bytes
    return dict(arch=arch_name, size=size, batch=batch, compile=compile, device=_device_name(device),
                dtype=str(dtype).replace("torch.", ""), tokens_per_image=tokens, torch=torch.__version__,
                phases=[dict(name=p.name, ms=p.ms, ms_per_image=None if p.ms is None else p.ms / batch, ms_all=p.ms_all,
                             weight_gib=None if p.weight_bytes is None else p.weight_bytes / GiB,
                             peak_gib=None if p.peak_bytes is None else p.peak_bytes / GiB, **p.extra) for p in phases],
                ratios=ratios)


def _row(p: Phase) -> str:
    ms = "   error" if p.ms is None else f"{p.ms:8.2f}"
    w = "" if p.weight_bytes is None else f"{p.weight_bytes / GiB:7.2f}"
    peak = "      -" if p.peak_bytes is None else f"{p.peak_bytes / GiB:7.2f}"
    extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.extra.items())
    return f"{p.name:<20} {ms} ms  weights {w:>7} GiB  peak {peak} GiB  {extra}"


def print_table(result: dict, file=None):
    file = file or sys.stdout
    print(f"\n{result['arch']} {result['size']}x{result['size']} batch {result['batch']} on {result['device']} "
          f"({result['dtype']}, {result['tokens_per_image']} tokens/image)", file=file)
    print(f"{'phase':<20} {'median ms':>10} {'ms/image':>9} {'weights GiB':>12} {'peak GiB':>9}", file=file)
    for p in result["phases"]:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"{p['name']:<20} {fmt(p['ms'], '10.2f')} {fmt(p['ms_per_image'], '9.2f')} "
              f"{fmt(p['weight_gib'], '12.3f')} {fmt(p['peak_gib'], '9.2f')}"
              + (f"  {p['error']}" if "error" in p else ""), file=file)
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.2f}", file=file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nunchaku_lite.bench model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="flux-dev", choices=["flux-dev", "flux-schnell", "tiny"])
    ap.add_argument("--size", type=int, default=1024, help="square image side in pixels (512, 1024, 2048; tiny: any "
                    "multiple of 16)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default=None, help="default cuda when available")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--steps", type=int, default=None, help="timed DiT steps (median; default 10 on CUDA, 2 on CPU)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--quick", default="svd", choices=["svd", "random"], help="how the W4A4 weights are made")
    ap.add_argument("--pipeline-steps", type=int, default=2, help="sampler steps of the whole-generation phases")
    ap.add_argument("--skip-16bit", action="store_true", help="no 16-bit DiT phase (implies --quick random)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (both paths)")
    ap.add_argument("--plain", action="store_true", help="the plain DiT forward (models/dit.py) instead of the "
                    "fused CUDA path (nunchaku_lite/fused.py, the default where it can run)")
    ap.add_argument("--weights-only", action="store_true", help="only the weight memory of each component and "
                    "mode, from models built on the meta device (no device, no time)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.size < 16 or args.size % 16:
        ap.error(f"--size must be a positive multiple of 16, got {args.size}")
    if args.batch < 1 or (args.steps is not None and args.steps < 1) or args.pipeline_steps < 1:
        ap.error("--batch, --steps and --pipeline-steps must be >= 1")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.plain:  # class-level switch: every DiT built below runs the plain path
        from ..models import dit
        dit.Flux.fast = dit.DoubleStreamBlock.fast = dit.SingleStreamBlock.fast = False
    if args.weights_only:
        result = weight_plan(args.arch, dtype, args.rank)
        print(f"{args.arch} weights ({args.dtype}, W4A4 rank {args.rank})")
        for k, v in result["weight_gib"].items():
            print(f"  {k:<26} {v:8.3f} GiB")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    steps = args.steps or (10 if device.type == "cuda" else 2)
    result = run(args.arch, args.size, args.batch, device, dtype, steps, args.rank, args.quick, args.pipeline_steps,
                 args.skip_16bit, args.compile, log=lambda s: print(s, file=sys.stderr, flush=True))
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
