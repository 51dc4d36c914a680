"""Full-size model benchmark without downloads: the real FLUX.1 architecture with random weights.

    python -m nunchaku_lite.bench model --arch flux-dev --size 1024 --batch 1 [--json out.json]
    python -m nunchaku_lite.bench model --arch flux-dev --sizes 512,1024,2048 --batches 1,4 --json out.json

One process, one device; weights are built on the meta device and allocated and filled with random values
on the target device (no CPU detour). Every model is built once and reused across sizes and batches (sizes are
side lengths in pixels, or WIDTHxHEIGHT, multiples of 16). Phases, in this order:
  dit-16bit   our 16-bit DiT, one row per (size, batch): per-step latency (median over timed steps, CUDA
              events), weights, peak. The outputs are kept (in CPU memory) for the W4A4 comparison.
  dit-w4a4    the same DiT quickly quantized in place (no calibration; 16-bit weights freed layer by layer):
              block linears W4A4 with identity smoothing, a rank-r truncated SVD of the weight (torch.svd_lowrank,
              on the device) as the low-rank branch and the INT4 residual; modulation linears W4A16 (QUANT's
              defaults). Then, on CUDA, native.prepare_model_ converts every layer once to the kernels' layout,
              keeping one copy of each weight (--keep-canonical skips it: the kernels then cache a second copy).
              Kernel time does not depend on the values, so this times what a calibrated checkpoint would.
              --skip-16bit builds the W4A4 DiT directly with random codes (never the 16-bit one: ~7 GiB cards).
  t5-16bit, clip   one batch of prompts per batch size; t5-w4a16 the same T5 quantized in place (later)
  vae-decode, vae-decode-tiled   one image per size (the pipeline decodes a batch one image at a time)
  pipeline-resident / pipeline-offload   whole generations (--pipeline-steps sampler steps) with the W4A4 DiT,
              at --pipeline-sizes (default 1024 if listed, else the first size) and the smallest batch:
              "resident" (everything on the device, 16-bit T5, full decode) and "offload" (issue 5's small-memory
              mode: Flux.enable_model_offload, W4A16 T5 and CLIP lent from pinned CPU memory while they run, VAE
              tiling "auto"): peak device memory and wall time of each.
Memory (CUDA): peak_gib = torch.cuda.max_memory_allocated during the phase (reset at its start, so it includes
whatever stays resident, e.g. the W4A4 DiT during "text"); resident_gib = allocated after it; weight_gib =
nunchaku_lite.memory.module_bytes of the phase's model (the kernels' prepared tensors included). `checks` in
the JSON compares the results with issue 5's targets (DiT resident <= 7 GiB, offload peak < 10 GiB at
1024x1024, per-image latency at batch > 1 no worse than at batch 1). The JSON is rewritten after every phase,
so an interrupted run keeps what it measured. --weights-only prints every component's and memory mode's weight
bytes from meta-device models (any machine, seconds). --arch tiny is a tiny FLUX for smoke tests on a CPU.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
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
from ..quant import ops
from ..quant.modules import SplitInputLinear, W4A4Linear, W4A16Linear
from ..quant.svdquant import _linear_part, is_modulation, remove_shift_term_

GiB = 2**30
DIT_BUDGET_LIMIT_GIB = 7.0      # issue 5: the quantized FLUX.1-dev DiT resident in at most 7 GiB
OFFLOAD_PEAK_LIMIT_GIB = 10.0   # issue 5: 1024x1024 generation in the small-memory mode under 10 GiB


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
def random_quantized_fill_(module: nn.Module, seed: int = 0, pow2: bool = False) -> nn.Module:
    """Random codes, scales and low-rank factors of plausible magnitude in every W4A4Linear / W4A16Linear
    (timing only: the values are not a quantization of anything); smooth 1, biases 0. W4A4 group scales vary
    per group: by up to 25% (plain) or by powers of two (pow2: ops.pow2_split form, the folded sm_90 GEMM)."""
    gen = None
    for _, m in module.named_modules():
        if not isinstance(m, (W4A4Linear, W4A16Linear)):
            continue
        if gen is None:
            gen = torch.Generator(device=m.qweight.device).manual_seed(seed)
        m.qweight.copy_(torch.randint(0, 256, m.qweight.shape, generator=gen, device=m.qweight.device,
                                      dtype=torch.int32).to(torch.uint8))
        m.wscales.fill_(1.0 / (4 * math.sqrt(m.in_features)))  # codes ~U(-8, 7): std ~4.6 * scale
        if isinstance(m, W4A4Linear):
            dev = m.wscales.device
            if pow2:
                e = torch.randint(0, 3, m.wscales.shape, generator=gen, device=dev)
                e[:, 0] = 0
                m.wscales.mul_(torch.exp2(-e.float()).to(m.wscales.dtype))
            else:
                m.wscales.mul_(1 + 0.25 * torch.rand(m.wscales.shape, generator=gen, device=dev).to(m.wscales.dtype))
        if m.bias is not None:
            m.bias.zero_()
        if isinstance(m, W4A4Linear):
            m.smooth.fill_(1.0)
            m.lora_down.normal_(0, 1 / math.sqrt(m.in_features), generator=gen)
            m.lora_up.normal_(0, 0.1 / math.sqrt(max(m.rank, 1)), generator=gen)
        elif m.wzeros is not None:
            m.wzeros.zero_()
    return module


@torch.no_grad()
def quick_w4a4_(dit: nn.Module, rank: int = 32, mode: str = "svd", seed: int = 0, pow2: bool = False,
                pow2_act: bool = False) -> nn.Module:
    """Quantize a DiT's block linears to W4A4 without calibration, in place, one layer at a time on its device.

    mode "svd": smooth = 1, low-rank branch = rank-r truncated SVD of W (torch.svd_lowrank, 2 power
    iterations), INT4 residual W - L1 L2 (round to nearest). mode "random": random codes, scales and low-rank
    factors of plausible magnitude (no 16-bit weight read; timing only). mode "empty": the modules only (for
    a model on the meta device: sizes without memory; `to_empty` + `random_quantized_fill_` then give a
    random W4A4 model without ever allocating the 16-bit one). Modulation linears become W4A16; the single
    blocks' linear2 becomes a SplitInputLinear (signed attention part, unsigned MLP part) and the MLP output
    linears take unsigned inputs, as in the quantizer's checkpoints. pow2:
    power-of-two weight group scales (ops.quantize_weight(pow2=True)), which the sm_90 GEMM folds; pow2_act:
    power-of-two activation scales too (W4A4Linear.act_pow2: with pow2, the sm_90 integer GEMM)."""
    if mode not in ("svd", "random", "empty"):
        raise ValueError(f"quick quantization mode must be 'svd', 'random' or 'empty', got {mode!r}")

    def one(lin: nn.Linear, unsigned: bool = False) -> W4A4Linear:
        w = lin.weight
        shift = ops.UNSIGNED_SHIFT if unsigned else 0.0
        if mode == "svd":
            u, s, v = torch.svd_lowrank(w.float(), q=rank, niter=2)
            up, down = u * s, v.T  # [N, r], [r, K]
            q = W4A4Linear.from_linear(lin, w.float() - up @ down, lora_down=down, lora_up=up, pow2=pow2,
                                       act_unsigned=unsigned, act_shift=shift, act_pow2=pow2_act)
            if unsigned and q.bias is not None:
                remove_shift_term_(q)
            return q
        return W4A4Linear(lin.in_features, lin.out_features, rank, bias=lin.bias is not None, dtype=w.dtype,
                          device=w.device, act_unsigned=unsigned, act_shift=shift, act_pow2=pow2_act)

    for kind, blocks in (("double", dit.double_blocks), ("single", dit.single_blocks)):
        for block in blocks:
            quantize_w4a16_(block, select=is_modulation)
            for name, lin in [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]:
                if kind == "single" and name == "linear2":
                    # [attn | gelu(mlp)] inputs: signed attention part + unsigned MLP part, the layout of the
                    # quantizer's checkpoints (svdquant.quantize_block), so the fused path needs no concatenation
                    hid = lin.out_features
                    q = SplitInputLinear([one(_linear_part(lin, 0, hid, False)),
                                          one(_linear_part(lin, hid, lin.in_features, True), unsigned=True)])
                else:
                    q = one(lin, unsigned=name.endswith("mlp.2"))
                block.set_submodule(name, q)
                del lin
    if mode == "random":
        for block in [*dit.double_blocks, *dit.single_blocks]:
            random_quantized_fill_(block, seed, pow2)
    dit.quant_config = dict(method=f"quick-{mode}", rank=rank, modulation="w4a16", pow2_scales=pow2,
                            pow2_act=pow2_act)
    return dit


def build_w4a4_dit(arch: "Arch", device, dtype, rank: int = 32, seed: int = 0, pow2: bool = False,
                   pow2_act: bool = False) -> nn.Module:
    """A random W4A4 DiT allocated straight on `device` (the 16-bit model exists only on the meta device)."""
    with torch.device("meta"):
        dit = FluxDiT(arch.dit)
    quick_w4a4_(dit.to(dtype), rank, "empty", pow2_act=pow2_act)
    dit = dit.to_empty(device=device)
    random_fill_(dit, seed)  # the 16-bit leftovers: embedders, norms, final layer
    random_quantized_fill_(dit, seed, pow2)
    dit.quant_config.update(method="quick-random", pow2_scales=pow2, pow2_act=pow2_act)
    return dit.eval().requires_grad_(False)


def to_native_layout_(dit: nn.Module, dtype: torch.dtype) -> int:
    """The load-time step of a quantized DiT on CUDA (as Flux.from_pretrained does): one copy of each weight, in
    the kernels' layout. Returns the layers converted (0 off CUDA or without the kernels)."""
    if next(dit.parameters()).device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return 0
    from .. import native
    return native.prepare_model_(dit, dtype)


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
    """Device-side timing: CUDA events on CUDA (no host sync inside the timed work), perf_counter elsewhere.

    time_ms runs `warmup` untimed calls, then timed ones: `repeats` of them, or with `budget_ms` as many as
    fit that budget at the first call's speed (at least `min_repeats`), so 2048x2048 at batch 4 does not take
    minutes while small sizes still get many samples."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def once_ms(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def time_ms(self, fn, repeats: int, warmup: int = 1, budget_ms: float | None = None,
                min_repeats: int = 1) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        times = [self.once_ms(fn)]
        if budget_ms is not None:
            repeats = max(min_repeats, min(repeats, math.ceil(budget_ms / max(times[0], 1e-3))))
        while len(times) < repeats:
            times.append(self.once_ms(fn))
        return times

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class Phase:
    name: str
    size: tuple[int, int] | None = None  # (width, height) pixels
    batch: int | None = None
    ms: float | None = None  # median per call
    ms_all: list[float] = field(default_factory=list)
    weight_bytes: int | None = None
    peak_bytes: int | None = None  # CUDA only
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        size = "" if self.size is None else f" {self.size[0]}x{self.size[1]}"
        return f"{self.name}{size}" + ("" if self.batch is None else f" b{self.batch}")


def _reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def measure(name, device, clock, fn, repeats, warmup=1, weight_bytes=None, size=None, batch=None,
            budget_ms=None, min_repeats=1, **extra) -> Phase:
    """Time fn; a phase that runs out of device memory is reported as such (the run goes on)."""
    _reset_peak(device)
    try:
        times = clock.time_ms(fn, repeats, warmup, budget_ms, min_repeats)
    except torch.OutOfMemoryError:
        _reset_peak(device)
        return Phase(name, size, batch, weight_bytes=weight_bytes, extra=dict(extra, error="out of memory"))
    if device.type == "cuda":  # what stays allocated after the phase
        extra = dict(extra, resident_gib=round(torch.cuda.memory_allocated(device) / GiB, 3))
    return Phase(name, size, batch, statistics.median(times), times, weight_bytes, _peak(device), extra)


# ---------------------------------------------------------------------------------------------------------
# The benchmark


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"512,1024,1536x640" -> [(512, 512), (1024, 1024), (1536, 640)] as (width, height); multiples of 16."""
    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        try:
            w, h = (int(v) for v in item.split("x")) if "x" in item else (int(item),) * 2
        except ValueError:
            raise ValueError(f"size {item!r}: expected a side in pixels (1024) or WIDTHxHEIGHT (1536x640)") from None
        if w < 16 or h < 16 or w % 16 or h % 16:
            raise ValueError(f"size {item!r}: width and height must be positive multiples of 16 pixels "
                             "(FLUX packs 2x2 latent cells of an 8x VAE)")
        sizes.append((w, h))
    if not sizes:
        raise ValueError("no size given")
    return sizes


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"batches {text!r}: expected comma-separated positive ints") from None
    if not batches or min(batches) < 1:
        raise ValueError(f"batches {text!r}: expected comma-separated positive ints")
    return batches


def latent_hw(arch: Arch, width: int, height: int) -> tuple[int, int]:
    """(h, w) of the unpacked latent: even, in cells of the VAE's factor (2x2 cells make a DiT token)."""
    f = arch.vae.downsample_factor
    return 2 * math.ceil(height / (2 * f)), 2 * math.ceil(width / (2 * f))


def latent_side(arch: Arch, size: int) -> int:
    return latent_hw(arch, size, size)[0]


def dit_inputs(arch: Arch, size, batch: int, device, dtype) -> dict:
    """One DiT step's inputs for an image of size = (width, height) (or a square side) and `batch` images."""
    width, height = (size, size) if isinstance(size, int) else size
    lat_h, lat_w = latent_hw(arch, width, height)
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


@dataclass
class Options:
    """What `run` measures (the command line's flags)."""
    arch: str = "flux-dev"
    sizes: list = field(default_factory=lambda: [(1024, 1024)])  # (width, height)
    batches: list = field(default_factory=lambda: [1])
    device: str | None = None
    dtype: torch.dtype = torch.bfloat16
    steps: int = 10              # most timed DiT steps per (size, batch)
    min_steps: int = 3           # fewest timed DiT steps
    phase_seconds: float = 4.0   # timed-step budget per DiT (size, batch): repeats = budget / first step
    rank: int = 32
    quick: str = "svd"
    skip_16bit: bool = False
    keep_canonical: bool = False  # do not convert to the kernels' layout (measures the two-copy mode)
    compile: bool = False
    pipeline_sizes: list | None = None  # None: 1024x1024 if listed, else the first size; [] skips
    pipeline_steps: int = 2
    pow2: bool = False            # power-of-two W4A4 weight scales (folded sm_90 GEMM) + an unfolded A/B phase
    pow2_act: bool = False        # power-of-two activation scales too (sm_90 integer GEMM) + an fp8-kernel A/B phase
    text: bool = True             # text-encoder and VAE phases


class Bench:
    """Runs the phases of one invocation, collecting Phase rows (see the module docstring)."""

    def __init__(self, opts: Options, log=print, on_phase=None):
        self.o, self.log, self.on_phase = opts, log, on_phase
        self.device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.arch, self.clock = Arch.named(opts.arch), Clock(self.device)
        self.phases: list[Phase] = []
        self.info: dict = {}
        self.configs = [(s, b) for s in opts.sizes for b in opts.batches]

    def add(self, p: Phase) -> Phase:
        self.phases.append(p)
        self.log(_row(p))
        if self.on_phase is not None:
            self.on_phase(self.result())
        return p

    def tokens(self, size) -> int:
        lat_h, lat_w = latent_hw(self.arch, *size)
        return (lat_h // 2) * (lat_w // 2) + self.arch.txt_len

    # -- DiT
    def dit_phase(self, name, dit, size, batch, refs=None, **extra) -> Phase:
        o = self.o
        inputs = dit_inputs(self.arch, size, batch, self.device, o.dtype)
        out = {}

        def step():
            out["y"] = dit(**inputs)
        with torch.inference_mode():
            p = measure(name, self.device, self.clock, step, o.steps, warmup=1, weight_bytes=module_bytes(dit),
                        size=size, batch=batch, budget_ms=1e3 * o.phase_seconds, min_repeats=o.min_steps,
                        tokens_per_image=self.tokens(size), **extra)
        y = out.pop("y", None)
        if y is not None and p.ms is not None and refs is not None:
            key = (size, batch)
            if name == "dit-16bit":
                refs[key] = y.float().cpu()
            elif key in refs:
                ref = refs[key]
                p.extra["rel_l2_vs_16bit"] = float((y.float().cpu() - ref).norm() / ref.norm())
        del y, inputs, out
        return self.add(p)

    def run(self) -> dict:
        o, dev, arch = self.o, self.device, self.arch
        shapes = ", ".join(f"{w}x{h}" for w, h in o.sizes)
        self.log(f"# {o.arch} sizes {shapes} batches {o.batches} on {_device_name(dev)}, {o.dtype}")
        refs: dict = {}
        quick = "random" if o.skip_16bit else o.quick  # the SVD reads the 16-bit weights
        if o.skip_16bit:
            t0 = time.perf_counter()
            dit = build_w4a4_dit(arch, dev, o.dtype, o.rank, pow2=o.pow2, pow2_act=o.pow2_act)
            self.clock.sync()
            quant_s = time.perf_counter() - t0
        else:
            dit = build(lambda: FluxDiT(arch.dit), dev, o.dtype)
            if o.compile:
                compile_blocks(dit)  # the warmup step of each DiT phase compiles
            for size, batch in self.configs:
                self.dit_phase("dit-16bit", dit, size, batch, refs)
            t0 = time.perf_counter()
            quick_w4a4_(dit, o.rank, quick, pow2=o.pow2, pow2_act=o.pow2_act)  # in place: the 16-bit weights go layer by layer
            self.clock.sync()
            quant_s = time.perf_counter() - t0
        dit = self.w4a4_ready(dit)
        self.info.update(quantize_s=round(quant_s, 2), quick=quick, rank=o.rank, pow2_scales=o.pow2,
                         pow2_act=o.pow2_act)
        for size, batch in self.configs:
            self.dit_phase("dit-w4a4", dit, size, batch, refs, native_kernels=_native_available(dev),
                           native_layout=self.info["layers_converted"] > 0)
        # A/B phases on the same weights: the fp8 kernel instead of the integer one (same codes), then unfolded
        ab = ([("dit-w4a4-nos8", "NUNCHAKU_LITE_S8")] if o.pow2 and o.pow2_act else []) + (
            [("dit-w4a4-nofold", "NUNCHAKU_LITE_FOLD")] if o.pow2 else [])
        for name, env in ab if _native_available(dev) else []:
            os.environ[env] = "0"
            try:
                for size, batch in self.configs:
                    self.dit_phase(name, dit, size, batch, refs)
            finally:
                del os.environ[env]
        refs.clear()
        if o.text:
            self.text_and_vae(dit)
        return self.result()

    def w4a4_ready(self, dit: nn.Module) -> nn.Module:
        """The W4A4 DiT's load-time steps: conversion to the kernels' layout (one copy), compile."""
        o, dev = self.o, self.device
        _reset_peak(dev)
        self.info["dit_w4a4_canonical_gib"] = module_bytes(dit) / GiB  # what a checkpoint holds
        t0 = time.perf_counter()
        converted = 0 if o.keep_canonical else to_native_layout_(dit, o.dtype)
        self.clock.sync()
        self.info.update(layers_converted=converted, convert_s=round(time.perf_counter() - t0, 2))
        if dev.type == "cuda":  # only the W4A4 DiT is allocated now: its true footprint
            self.info.update(dit_w4a4_resident_gib=torch.cuda.memory_allocated(dev) / GiB,
                             convert_peak_gib=torch.cuda.max_memory_allocated(dev) / GiB)
        self.info["dit_w4a4_weight_gib"] = module_bytes(dit) / GiB
        self.log(f"# W4A4 DiT: {self.info['dit_w4a4_weight_gib']:.3f} GiB of weights, {converted} layers in the "
                 f"kernels' layout ({self.info['convert_s']} s)")
        if o.compile:
            compile_blocks(dit)
        return dit

    # -- text encoders, VAE, whole generations
    def text_and_vae(self, dit):
        from ..pipeline import Flux, SamplingDefaults

        o, dev, arch, clock = self.o, self.device, self.arch, self.clock
        t5 = build(lambda: T5Encoder(arch.t5), dev, o.dtype, seed=1)
        clip = build(lambda: CLIPTextModel(arch.clip), dev, o.dtype, seed=2)
        vae = build(lambda: AutoEncoder(arch.vae), dev, o.dtype, seed=3)
        reps = max(2, o.steps // 2)
        budget = 1e3 * o.phase_seconds / 2

        def text_phases(t5_name):
            for batch in o.batches:
                t5_ids = RandomTokenizer(arch.t5.vocab_size, arch.txt_len)([""] * batch).to(dev)
                self.add(measure(t5_name, dev, clock, lambda: t5(t5_ids), reps, weight_bytes=module_bytes(t5),
                                 batch=batch, budget_ms=budget))
                if t5_name == "t5-16bit":
                    clip_ids = RandomTokenizer(arch.clip.vocab_size, arch.clip.max_position_embeddings)(
                        [""] * batch).to(dev)
                    self.add(measure("clip", dev, clock, lambda: clip(clip_ids), reps, weight_bytes=module_bytes(clip),
                                     batch=batch, budget_ms=budget))

        with torch.inference_mode():
            text_phases("t5-16bit")
            for size in o.sizes:  # one image: the pipeline decodes a batch one image at a time
                lat_h, lat_w = latent_hw(arch, *size)
                z = torch.randn(1, arch.vae.z_channels, lat_h, lat_w, device=dev, dtype=o.dtype)
                for name, fn in (("vae-decode", lambda: vae.decode(z)),
                                 ("vae-decode-tiled", lambda: vae.decode_tiled(z))):
                    self.add(measure(name, dev, clock, fn, reps, weight_bytes=module_bytes(vae), size=size, batch=1,
                                     budget_ms=budget))
                del z

        defaults = SamplingDefaults.for_kind(arch.kind)
        defaults.max_sequence_length = arch.txt_len
        tok = RandomTokenizer(arch.clip.vocab_size, arch.clip.max_position_embeddings)
        tok2 = RandomTokenizer(arch.t5.vocab_size, arch.txt_len)
        runs = self.pipeline_configs()

        def generations(name, pipe, weight_bytes, **extra):
            """Whole generations; weight_bytes: what the mode keeps on the device between calls."""
            for size, batch in runs:
                w, h = size

                def fn():
                    return pipe(["a benchmark"] * batch, steps=o.pipeline_steps, height=h, width=w, seed=0,
                                output_type="pt")
                lat_h, lat_w = latent_hw(arch, w, h)
                p = measure(name, dev, clock, fn, 1, warmup=1, weight_bytes=weight_bytes, size=size, batch=batch,
                            steps=o.pipeline_steps, vae_tiled=pipe._tiled(lat_h, lat_w), **extra)
                p.extra["stage_s"] = {k: round(v, 3) for k, v in pipe.last_timings.items()}
                self.add(p)

        if runs:
            pipe = Flux(dit, vae, clip, t5, tok, tok2, defaults, device=dev, dtype=o.dtype)
            pipe.vae_tiling = False
            generations("pipeline-resident", pipe, sum(module_bytes(m) for m in (dit, t5, clip, vae)), t5="16bit")
            del pipe
        quantize_w4a16_(t5)  # in place on the device: the 16-bit T5 goes layer by layer
        with torch.inference_mode():
            text_phases("t5-w4a16")
        if runs:
            pipe = Flux(dit, vae, clip, t5, tok, tok2, defaults, device=dev, dtype=o.dtype).enable_model_offload()
            lent = max(module_bytes(m) for m in (t5, clip, vae))
            generations("pipeline-offload", pipe, module_bytes(dit), t5="w4a16", vae_tiling="auto",
                        largest_lent_gib=round(lent / GiB, 3))

    def pipeline_configs(self) -> list:
        o = self.o
        batch = min(o.batches)
        if o.pipeline_sizes is None:
            sizes = [(1024, 1024)] if (1024, 1024) in o.sizes else o.sizes[:1]
        else:
            sizes = o.pipeline_sizes
        return [(s, batch) for s in sizes]

    def result(self) -> dict:
        return summarize(self.o, self.device, self.phases, self.info)


def run(arch_name="flux-dev", size=1024, batch=1, device=None, dtype=torch.bfloat16, steps=5, rank=32,
        quick="svd", pipeline_steps=2, skip_16bit=False, compile=False, log=print, **options) -> dict:
    """One (size, batch) or, through sizes=[...]/batches=[...] in `options`, many; returns the JSON-able result."""
    sizes = options.pop("sizes", None) or [(size, size) if isinstance(size, int) else tuple(size)]
    batches = options.pop("batches", None) or [batch]
    opts = Options(arch=arch_name, sizes=sizes, batches=batches, device=device, dtype=dtype, steps=steps, rank=rank,
                   quick=quick, pipeline_steps=pipeline_steps, skip_16bit=skip_16bit, compile=compile, **options)
    return Bench(opts, log).run()


def summarize(opts: Options, device, phases: list[Phase], info: dict) -> dict:
    """The JSON-able result: phases, ratios and issue 5's checks."""
    rows = [dict(name=p.name, size=None if p.size is None else f"{p.size[0]}x{p.size[1]}", batch=p.batch, ms=p.ms,
                 ms_per_image=None if p.ms is None or p.batch is None else p.ms / p.batch, ms_all=p.ms_all,
                 weight_gib=None if p.weight_bytes is None else p.weight_bytes / GiB,
                 peak_gib=None if p.peak_bytes is None else p.peak_bytes / GiB, **p.extra) for p in phases]
    by = {(r["name"], r["size"], r["batch"]): r for r in rows}
    ratios, checks = {}, {}
    for r in rows:
        if r["name"] != "dit-w4a4" or r["ms"] is None:
            continue
        key = f"{r['size']} b{r['batch']}"
        a = by.get(("dit-16bit", r["size"], r["batch"]))
        if a and a["ms"]:
            ratios[f"dit_step_speedup_w4a4 {key}"] = a["ms"] / r["ms"]
            ratios["dit_weight_ratio_16bit_over_w4a4"] = a["weight_gib"] / r["weight_gib"]
            if a["peak_gib"] and r["peak_gib"]:
                ratios[f"dit_peak_ratio_16bit_over_w4a4 {key}"] = a["peak_gib"] / r["peak_gib"]
        one = by.get(("dit-w4a4", r["size"], 1))
        if r["batch"] > 1 and one and one["ms"]:
            per = r["ms_per_image"] / one["ms_per_image"]
            ratios[f"w4a4_ms_per_image_b{r['batch']}_over_b1 {r['size']}"] = per
            checks[f"w4a4 per-image latency at batch {r['batch']} <= batch 1, {r['size']}"] = dict(
                value=round(per, 3), limit=1.0, ok=per <= 1.0)
    for r in rows:
        if r["name"] == "t5-w4a16" and r["ms"]:
            a = by.get(("t5-16bit", None, r["batch"]))
            if a and a["ms"]:
                ratios[f"t5_time_ratio_w4a16_over_16bit b{r['batch']}"] = r["ms"] / a["ms"]
                ratios["t5_weight_ratio_16bit_over_w4a16"] = a["weight_gib"] / r["weight_gib"]
    if opts.arch == "flux-dev" and "dit_w4a4_weight_gib" in info:
        resident = info.get("dit_w4a4_resident_gib", info["dit_w4a4_weight_gib"])
        checks["W4A4 DiT resident <= 7 GiB"] = dict(value=round(resident, 3), limit=DIT_BUDGET_LIMIT_GIB,
                                                     ok=resident <= DIT_BUDGET_LIMIT_GIB)
        off = by.get(("pipeline-offload", "1024x1024", 1))
        if off and off["peak_gib"] is not None:
            checks["offload pipeline peak at 1024x1024 < 10 GiB"] = dict(
                value=round(off["peak_gib"], 3), limit=OFFLOAD_PEAK_LIMIT_GIB,
                ok=off["peak_gib"] < OFFLOAD_PEAK_LIMIT_GIB)
    return dict(arch=opts.arch, sizes=[f"{w}x{h}" for w, h in opts.sizes], batches=opts.batches,
                compile=opts.compile, device=_device_name(device), dtype=str(opts.dtype).replace("torch.", ""),
                torch=torch.__version__, steps=opts.steps, min_steps=opts.min_steps, phase_seconds=opts.phase_seconds,
                **info, phases=rows, ratios=ratios, checks=checks)


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


def _row(p: Phase) -> str:
    ms = "   error" if p.ms is None else f"{p.ms:8.2f}"
    w = "" if p.weight_bytes is None else f"{p.weight_bytes / GiB:7.2f}"
    peak = "      -" if p.peak_bytes is None else f"{p.peak_bytes / GiB:7.2f}"
    extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.extra.items())
    return f"{p.label:<32} {ms} ms  weights {w:>7} GiB  peak {peak} GiB  {extra}"


def print_table(result: dict, file=None):
    file = file or sys.stdout
    print(f"\n{result['arch']} on {result['device']} ({result['dtype']}); W4A4 DiT "
          f"{result.get('dit_w4a4_weight_gib', float('nan')):.3f} GiB of weights, "
          f"{result.get('layers_converted', 0)} layers in the kernels' layout", file=file)
    print(f"{'phase':<20} {'size':>10} {'batch':>5} {'tokens':>6} {'median ms':>10} {'ms/image':>9} "
          f"{'weights GiB':>12} {'peak GiB':>9}", file=file)
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for p in result["phases"]:
        print(f"{p['name']:<20} {p['size'] or '-':>10} {fmt(p['batch'], '5d')} {fmt(p.get('tokens_per_image'), '6d')} "
              f"{fmt(p['ms'], '10.2f')} {fmt(p['ms_per_image'], '9.2f')} {fmt(p['weight_gib'], '12.3f')} "
              f"{fmt(p['peak_gib'], '9.2f')}" + (f"  {p['error']}" if "error" in p else ""), file=file)
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.2f}", file=file)
    for k, c in result["checks"].items():
        print(f"check {'PASS' if c['ok'] else 'FAIL'}: {k} (measured {c['value']}, limit {c['limit']})", file=file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nunchaku_lite.bench model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="flux-dev", choices=["flux-dev", "flux-schnell", "tiny"])
    ap.add_argument("--size", type=int, default=1024, help="square image side in pixels (default 1024)")
    ap.add_argument("--sizes", default=None, help="comma-separated sides or WIDTHxHEIGHT, multiples of 16 "
                    "(e.g. 512,1024,2048 or 1536x640); overrides --size")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (e.g. 1,4); overrides --batch")
    ap.add_argument("--device", default=None, help="default cuda when available")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--steps", type=int, default=None, help="most timed DiT steps per size and batch (median; "
                    "default 10 on CUDA, 2 on CPU)")
    ap.add_argument("--min-steps", type=int, default=None, help="fewest timed DiT steps (default 3 on CUDA, 1 on CPU)")
    ap.add_argument("--phase-seconds", type=float, default=4.0, help="timed-step budget of each DiT size/batch: "
                    "fewer steps (down to --min-steps) when one step is slow (default 4)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--quick", default="svd", choices=["svd", "random"], help="how the W4A4 weights are made")
    ap.add_argument("--pow2-scales", action="store_true", help="power-of-two W4A4 weight group scales (the folded "
                    "sm_90 GEMM); the W4A4 DiT is then also timed with folding off (dit-w4a4-nofold)")
    ap.add_argument("--pow2-act", action="store_true", help="power-of-two W4A4 activation scales too (with "
                    "--pow2-scales: the sm_90 integer GEMM); also timed on the fp8 kernel (dit-w4a4-nos8)")
    ap.add_argument("--pipeline-sizes", default=None, help="sizes of the whole-generation phases (default 1024 if "
                    "in --sizes, else the first size; 'none' skips them); run at the smallest batch")
    ap.add_argument("--pipeline-steps", type=int, default=2, help="sampler steps of the whole-generation phases")
    ap.add_argument("--skip-16bit", action="store_true", help="no 16-bit DiT phase; the W4A4 DiT is built directly "
                    "with random codes (implies --quick random; fits ~8 GB cards)")
    ap.add_argument("--keep-canonical", action="store_true", help="do not convert the W4A4 DiT to the kernels' "
                    "layout (the kernels then cache a second copy of every weight)")
    ap.add_argument("--dit-only", action="store_true", help="only the DiT phases (no text encoders, VAE, pipeline)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (both paths)")
    ap.add_argument("--plain", action="store_true", help="the plain DiT forward (models/dit.py) instead of the "
                    "fused CUDA path (nunchaku_lite/fused.py, the default where it can run)")
    ap.add_argument("--weights-only", action="store_true", help="only the weight memory of each component and "
                    "mode, from models built on the meta device (no device, no time)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file (after every phase)")
    args = ap.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes) if args.sizes else parse_sizes(str(args.size))
        batches = parse_batches(args.batches) if args.batches else parse_batches(str(args.batch))
        pipeline_sizes = None if args.pipeline_sizes is None else (
            [] if args.pipeline_sizes.lower() == "none" else parse_sizes(args.pipeline_sizes))
    except ValueError as e:
        ap.error(str(e))
    if (args.steps is not None and args.steps < 1) or (args.min_steps is not None and args.min_steps < 1) \
            or args.pipeline_steps < 1 or args.phase_seconds <= 0:
        ap.error("--steps, --min-steps and --pipeline-steps must be >= 1, --phase-seconds > 0")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.plain:  # class-level switch: every DiT built below runs the plain path
        from ..models import dit
        dit.Flux.fast = dit.DoubleStreamBlock.fast = dit.SingleStreamBlock.fast = False
    if args.weights_only:
        result = weight_plan(args.arch, dtype, args.rank)
        print(f"{args.arch} weights ({args.dtype}, W4A4 rank {args.rank}, canonical format)")
        for k, v in result["weight_gib"].items():
            print(f"  {k:<26} {v:8.3f} GiB")
        if args.json:
            _write_json(args.json, result)
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    cuda = device.type == "cuda"
    steps = args.steps or (10 if cuda else 2)
    opts = Options(arch=args.arch, sizes=sizes, batches=batches, device=str(device), dtype=dtype, steps=steps,
                   min_steps=min(steps, args.min_steps or (3 if cuda else 1)), phase_seconds=args.phase_seconds,
                   rank=args.rank, quick=args.quick, skip_16bit=args.skip_16bit, keep_canonical=args.keep_canonical,
                   compile=args.compile, pipeline_sizes=pipeline_sizes, pipeline_steps=args.pipeline_steps,
                   text=not args.dit_only, pow2=args.pow2_scales, pow2_act=args.pow2_act)
    save = (lambda r: _write_json(args.json, r)) if args.json else None
    result = Bench(opts, log=lambda s: print(s, file=sys.stderr, flush=True), on_phase=save).run()
    print_table(result)
    if args.json:
        _write_json(args.json, result)
    return 0


def _write_json(path, result):
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
