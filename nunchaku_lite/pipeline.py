"""Text-to-image pipeline: tokenize -> T5 + CLIP -> Euler flow sampling with the FLUX DiT -> VAE decode.

    pipe = Flux.from_pretrained("FLUX.1-schnell", device="cuda", dtype=torch.bfloat16)   # diffusers layout
    pipe = Flux.from_pretrained(None, transformer="flux1-dev.safetensors", vae="ae.safetensors",
                                text_encoder="clip_l.safetensors", text_encoder_2="t5xxl_fp16.safetensors",
                                tokenizer="FLUX.1-dev/tokenizer", tokenizer_2="FLUX.1-dev/tokenizer_2")
    images = pipe("a red fox in the snow", seed=0)            # list of PIL images
    pipe = Flux.from_pretrained("FLUX.1-dev", transformer="flux1-dev-w4a4.safetensors", device="cuda",
                                offload="model", t5_quant="w4a16")                 # small-GPU mode

Memory modes: offload="model" keeps only the DiT resident on the GPU; the text encoders and the VAE wait in
(pinned) CPU memory and are lent to the GPU only while they run. t5_quant="w4a16" loads T5 with 4-bit weights,
quantized one layer at a time as the checkpoint streams in. vae_tiling ("auto", True, False) decodes large
images in overlapping tiles (models/vae.py decode_tiled); "auto" tiles images of more than `vae_tile_above`
pixels (1024x1024, or 512x512 when offloading) or when a full decode would not fit the free memory.
Images of a batch are decoded one at a time, so the decoder's memory does not grow with the batch.

Defaults follow the model kind, detected from the weights (guidance embedding present -> dev):
schnell 4 steps, T5 length 256, no schedule shift, guidance unused; dev 50 steps, T5 length 512, resolution-
dependent shift, guidance 3.5. A folder's scheduler/scheduler_config.json decides the shift (as in diffusers),
and model_index.json may carry a "_nunchaku_lite" entry with defaults that win over both.
"""
from __future__ import annotations

import functools
import math
import numbers
import os
import secrets
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import sampling
from .memory import CPUOffload, load_t5_w4a16, on_device, quantize_w4a16_
from .loading import load_clip, load_clip_tokenizer, load_t5, load_t5_tokenizer, load_transformer, load_vae
from .loading.files import read_json
from .loading.options import resolve_config, resolve_device, resolve_dtype

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_MODELS = ("mini", "mini-w4a4")
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
OFFLOAD_MODES = ("none", "model")
T5_QUANT = (None, "w4a16")
OFFLOADED = ("text_encoder", "text_encoder_2", "vae")


@dataclass
class SamplingDefaults:
    """Per-model defaults of a call. `shift` selects the resolution-dependent (dynamic) schedule shift, with
    mu interpolated linearly from base_shift at base_image_seq_len tokens to max_shift at max_image_seq_len;
    `static_shift` != 1 applies diffusers' fixed shift s*t / (1 + (s-1)*t) instead (no FLUX config uses it)."""
    kind: str = "schnell"
    steps: int = 4
    guidance: float | None = None
    max_sequence_length: int = 256
    shift: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    static_shift: float = 1.0
    default_size: int = 1024

    @classmethod
    def for_kind(cls, kind: str) -> "SamplingDefaults":
        if kind == "dev":
            return cls(kind="dev", steps=50, guidance=3.5, max_sequence_length=512, shift=True)
        if kind == "schnell":
            return cls()
        raise ValueError(f"kind must be 'dev' or 'schnell', got {kind!r}")

    def with_scheduler_config(self, cfg: dict) -> "SamplingDefaults":
        """Apply a diffusers FlowMatchEulerDiscreteScheduler config (only the fields that shape the schedule)."""
        out = replace(self, shift=bool(cfg.get("use_dynamic_shifting", self.shift)))
        for name in ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len"):
            if cfg.get(name) is not None:
                setattr(out, name, type(getattr(self, name))(cfg[name]))
        if not out.shift and cfg.get("shift") is not None:
            out.static_shift = float(cfg["shift"])
        return out

    def with_overrides(self, overrides: dict) -> "SamplingDefaults":
        """Apply model_index.json's "_nunchaku_lite" entry: kind, default_steps, shift, max_sequence_length,
        default_size, guidance."""
        out = replace(self)
        if "kind" in overrides and overrides["kind"] != self.kind:
            out = replace(SamplingDefaults.for_kind(overrides["kind"]), default_size=self.default_size)
        for src, dst in (("default_steps", "steps"), ("shift", "shift"), ("max_sequence_length", "max_sequence_length"),
                         ("default_size", "default_size"), ("guidance", "guidance")):
            if src in overrides:
                setattr(out, dst, overrides[src])
        return out


def schedule(num_steps: int, image_seq_len: int, d: SamplingDefaults) -> list[float]:
    """num_steps + 1 times from 1 to 0 (BFL get_schedule; identical to diffusers' FLUX sigmas plus the final 0)."""
    t = torch.linspace(1, 0, num_steps + 1)
    if d.shift:
        slope = (d.max_shift - d.base_shift) / (d.max_image_seq_len - d.base_image_seq_len)
        mu = d.base_shift + slope * (image_seq_len - d.base_image_seq_len)
        t = sampling.time_shift(mu, 1.0, t)
    elif d.static_shift != 1.0:
        t = d.static_shift * t / (1 + (d.static_shift - 1) * t)
    return t.tolist()


def to_images(decoded: torch.Tensor) -> np.ndarray:
    """Decoder output [B, 3, H, W] on the [-1, 1] scale -> float32 [B, H, W, 3] in [0, 1] (clamped)."""
    return ((decoded.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: np.ndarray) -> list:
    """[B, H, W, 3] floats in [0, 1] -> PIL images, rounding to the nearest of 256 levels (as diffusers;
    BFL's CLI truncates instead, which darkens by half a level on average)."""
    from PIL import Image
    return [Image.fromarray(np.round(im * 255).astype(np.uint8)) for im in images]


def _module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype most of a module's floating-point tensors have."""
    counts: dict[torch.dtype, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _module_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def _prompts(prompt) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, (list, tuple)) and not prompt:
        raise ValueError("prompt: the list of prompts is empty")
    raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}"
                    + (f" holding {type(next(p for p in prompt if not isinstance(p, str))).__name__}"
                       if isinstance(prompt, (list, tuple)) else ""))


def _available_memory(device: torch.device) -> int | None:
    """Bytes that a new allocation on `device` can still get (None when unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class Flux:
    """A FLUX.1 text-to-image pipeline (schnell or dev) in plain PyTorch. See the module docstring."""

    def __init__(self, transformer: nn.Module, vae: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module,
                 tokenizer, tokenizer_2, defaults: SamplingDefaults | None = None, device=None, dtype=None):
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.kind = _detect_kind(transformer)
        self.defaults = defaults or SamplingDefaults.for_kind(self.kind)
        self.device = torch.device(device) if device is not None else _module_device(transformer)
        self.dtype = dtype or _module_dtype(transformer)
        vae_params = getattr(vae, "params", None)
        # Pixels per latent cell: 8 for FLUX's VAE (2 ** (len(ch_mult) - 1)); the tiny test VAEs use 2.
        self.vae_scale_factor = getattr(vae_params, "downsample_factor", None) or 2 ** (len(vae_params.ch_mult) - 1)
        self.latent_channels = getattr(getattr(transformer, "params", None), "in_channels", 64) // 4
        self.last_timings: dict[str, float] = {}
        self.last_seeds: list[int] | None = None
        self.offload = "none"
        self._offloaded: dict[str, CPUOffload] = {}  # component name -> its lender, when offloaded
        self.vae_tiling = "auto"
        self.vae_tile_above = 1024 * 1024  # "auto" tiles images with more pixels than this (one image at a time)
        self.vae_tile, self.vae_tile_overlap = 64, 16  # latent cells (512 and 128 pixels for FLUX's VAE)

    def enable_model_offload(self) -> "Flux":
        """Keep only the DiT on the device: the text encoders and the VAE move to (pinned) CPU memory and are
        lent to the device only while they run. A no-op on a CPU pipeline. Returns self."""
        if self.device.type == "cpu":
            return self
        if not self._offloaded:
            for name in OFFLOADED:
                self._offloaded[name] = CPUOffload(getattr(self, name), self.device)
            self.vae_tile_above = min(self.vae_tile_above, 512 * 512)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.offload = "model"
        return self

    def compile_transformer(self, **compile_kwargs) -> "Flux":
        """torch.compile each DiT block in place (nn.Module.compile; kwargs such as mode="max-autotune" go to
        torch.compile). The first call at a new size compiles (tens of seconds), later calls reuse it. Quantized
        linears whose kernels are foreign calls run between compiled regions (graph breaks). Returns self."""
        blocks = [*getattr(self.transformer, "double_blocks", ()), *getattr(self.transformer, "single_blocks", ())]
        if not blocks:
            raise ValueError("compile: the transformer has no double_blocks/single_blocks to compile")
        for block in blocks:
            block.compile(**compile_kwargs)
        return self

    def _on_device(self, name: str):
        """`with self._on_device("vae") as vae:` the component, its weights on the pipeline device meanwhile."""
        return on_device(getattr(self, name), self._offloaded.get(name))

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path=None, device=None, dtype=None, *, transformer=None, vae=None, text_encoder=None,
                        text_encoder_2=None, tokenizer=None, tokenizer_2=None, scheduler=None, kind: str | None = None,
                        configs: dict | None = None, transformer_kwargs: dict | None = None,
                        offload: str = "none", t5_quant: str | None = None, vae_tiling="auto",
                        compile: bool = False, native_layout: bool = True) -> "Flux":
        """Load a pipeline.

        path: a diffusers-layout folder (model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/,
            tokenizer/, tokenizer_2/, scheduler/), a BFL single-file transformer (other parts as keywords), the
            name of an embedded model ("mini", "mini-w4a4"), or None when every component is given.
        transformer, vae, text_encoder (CLIP), text_encoder_2 (T5): a folder, a safetensors file, or a loaded
            module (moved to `device`; cast to `dtype` if given, except a transformer module, which keeps its
            dtype); each overrides the folder's component. tokenizer (CLIP) / tokenizer_2 (T5): a folder or a
            tokenizer object. scheduler: a scheduler folder, its JSON file, or a dict.
        device: default cuda when available, else cpu.
        dtype: the transformer and text encoders' dtype (default: the transformer's stored dtype); the VAE
            uses it too (float32 for float16), or its own stored dtype when dtype is None.
        kind: 'dev' or 'schnell' to override the kind detected from the weights (sampling defaults only).
        configs: {component: config dict or JSON path} for checkpoints whose sizes cannot be read from the
            shapes (e.g. RoPE axes of a non-standard BFL single file).
        transformer_kwargs: passed to load_transformer (e.g. {"act_quant": False} for quantized checkpoints).
        offload: "none" (everything resident on `device`) or "model" (only the DiT resident; the text encoders
            and VAE are loaded into CPU memory and lent to the device while they run: see enable_model_offload).
        t5_quant: None (16-bit T5) or "w4a16" (4-bit weights, per-row groups of 64, quantized at load time one
            layer at a time on `device`; a T5 module passed in is quantized in place).
        vae_tiling: "auto", True or False: decode in tiles (see the module docstring).
        compile: torch.compile the DiT blocks (see compile_transformer); off by default.
        native_layout: on CUDA with the native kernels, convert the quantized layers of the components
            resident on the device once to the kernels' layout (native.prepare_model_), so the GPU holds one
            copy of each weight; converted layers refuse state_dict(). False keeps the canonical buffers (the
            kernels then cache a converted copy beside them: about 4.7 GiB more for FLUX.1-dev).
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype)
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        if t5_quant not in T5_QUANT:
            raise ValueError(f"t5_quant must be None or 'w4a16', got {t5_quant!r}")
        if vae_tiling not in ("auto", True, False):
            raise ValueError(f"vae_tiling must be 'auto', True or False, got {vae_tiling!r}")
        configs = dict(configs or {})
        unknown = sorted(set(configs) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"configs: unknown component {unknown[0]!r} (use {', '.join(COMPONENTS[:4])})")
        given = dict(transformer=transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                     tokenizer=tokenizer, tokenizer_2=tokenizer_2)
        folder, model_index = _resolve_root(path, given)
        parts = {}
        for name in COMPONENTS:
            if given[name] is not None:
                parts[name] = given[name]
            elif folder is not None and (folder / name).exists():
                parts[name] = folder / name
            else:
                where = f" and {folder} has no '{name}/' folder" if folder is not None else ""
                raise ValueError(f"from_pretrained: component '{name}' is missing: pass {name}=...{where}")

        # Offloaded components are loaded straight into CPU memory: the device never holds them all at once.
        home = {name: torch.device("cpu") if offload == "model" and name in OFFLOADED else device for name in COMPONENTS}

        def load(name, loader, dtype, **kw):
            part = parts[name]
            if isinstance(part, nn.Module):  # already loaded: only move it
                return part.to(home[name]) if dtype is None else part.to(device=home[name], dtype=dtype)
            config = resolve_config(configs.get(name), f"configs['{name}']")
            return loader(part, device=home[name], dtype=dtype, config=config, **kw)

        if t5_quant == "w4a16" and isinstance(parts["text_encoder_2"], nn.Module):
            quantize_w4a16_(parts["text_encoder_2"])  # where it is, before any move: never 16-bit on the GPU

        dit = load("transformer", load_transformer, None if isinstance(parts["transformer"], nn.Module) else dtype,
                   **(transformer_kwargs or {}))
        # The VAE runs in the requested dtype, except float16 (whose range FLUX's VAE overflows, hence
        # diffusers' force_upcast), which decodes in float32; with no dtype requested it keeps its stored dtype
        # (as BFL, which never casts the autoencoder).
        ae = load("vae", load_vae, torch.float32 if dtype == torch.float16 else dtype)
        # The text encoders run in the pipeline dtype (default: the transformer's), as in diffusers.
        dit_dtype = _module_dtype(dit)
        dtype = dtype or dit_dtype
        clip = load("text_encoder", load_clip, dtype)
        # 4-bit T5: each layer is quantized on `device` (fast) and kept where T5 lives
        t5 = load("text_encoder_2", functools.partial(load_t5_w4a16, work_device=device) if t5_quant == "w4a16"
                  else load_t5, dtype)

        defaults = SamplingDefaults.for_kind(kind or _detect_kind(dit))
        if folder is not None and scheduler is None and (folder / "scheduler").is_dir():
            scheduler = folder / "scheduler"
        if scheduler is not None:
            defaults = defaults.with_scheduler_config(_scheduler_config(scheduler))
        if model_index and isinstance(model_index.get("_nunchaku_lite"), dict):
            defaults = defaults.with_overrides(model_index["_nunchaku_lite"])

        tok = parts["tokenizer"]
        tok = load_clip_tokenizer(tok) if isinstance(tok, (str, Path)) else tok
        tok2 = parts["tokenizer_2"]
        tok2 = load_t5_tokenizer(tok2, defaults.max_sequence_length) if isinstance(tok2, (str, Path)) else tok2
        if native_layout and device.type == "cuda":  # one weight copy on the GPU, converted once here
            _to_native_layout([dit, clip, t5], dit_dtype)
        # Latents and the DiT's inputs take the transformer's own dtype (a module passed in keeps its dtype).
        pipe = cls(dit, ae, clip, t5, tok, tok2, defaults, device=device, dtype=dit_dtype)
        pipe.vae_tiling = vae_tiling
        if compile:
            pipe.compile_transformer()
        return pipe.enable_model_offload() if offload == "model" else pipe

    # ----------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_prompt(self, prompts: list[str], max_sequence_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 hidden states [B, L, d], CLIP pooled [B, d_clip]) in the pipeline dtype; warns on truncation."""
        max_len = max_sequence_length or self.defaults.max_sequence_length
        t5_ids = self._tokenize(self.tokenizer_2, prompts, "T5", max_len)
        clip_ids = self._tokenize(self.tokenizer, prompts, "CLIP", None)
        with self._on_device("text_encoder_2") as t5:
            txt = t5(t5_ids.to(self.device))
        with self._on_device("text_encoder") as clip:
            _, vec = clip(clip_ids.to(self.device))
        return txt.to(self.dtype), vec.to(self.dtype)

    @staticmethod
    def _tokenize(tokenizer, prompts, name, max_length):
        if max_length is not None and getattr(tokenizer, "max_length", max_length) != max_length:
            tokenizer.max_length = max_length
        if not hasattr(tokenizer, "encode_with_lengths"):
            return tokenizer(prompts)
        ids, lengths = tokenizer.encode_with_lengths(prompts)
        for i, n in enumerate(lengths):
            if n > ids.shape[1]:
                warnings.warn(f"prompt {i} is {n} {name} tokens long; truncated to {ids.shape[1]} "
                              f"({n - ids.shape[1]} tokens dropped)", stacklevel=4)
        return ids

    # ----------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, prompt, steps: int | None = None, guidance: float | None = None, height: int | None = None,
                 width: int | None = None, seed=None, latents: torch.Tensor | None = None, output_type: str = "pil",
                 progress=None, max_sequence_length: int | None = None):
        """Generate one image per prompt.

        prompt: a string or a list of strings.
        steps, guidance: default per model kind (guidance is ignored by schnell-type models).
        height, width: pixels, default the model's default size (1024 for FLUX). Rounded down to a multiple of
            2 x the VAE factor (16 for FLUX) with a warning; below 16 is refused.
        seed: an int, a list with one int per prompt, or None (random; the seeds used are in self.last_seeds).
            A list gives image i the noise of a single-prompt call with seed[i], so a batch reproduces each of
            its images alone (up to the rounding of batched matmuls, ~1e-6). One int for several prompts draws
            their noise in one go from one CPU generator (as diffusers does): the first image equals a
            single-prompt call with that seed, the others cannot be reproduced alone. Noise is drawn in float32 on the CPU, then cast.
        latents: initial noise instead of a seed, unpacked [B, 16, h, w] (h = height / VAE factor) or packed
            [B, L, 64]; height/width default to the latent's size.
        output_type: "pil" -> list of PIL images; "np" -> float32 array [B, H, W, 3] in [0, 1]; "pt" -> float32
            tensor [B, 3, H, W] in [0, 1]; "latent" -> the final packed latent [B, L, 64] (the transformer's token
            layout, undecoded, as diffusers' output_type="latent").
        progress: None, True (a bar on stderr), or a callable(step, num_steps) called after every step.
        Timings per stage (seconds) are left in self.last_timings.
        """
        prompts = _prompts(prompt)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        d = self.defaults
        steps = _positive_int("steps", d.steps if steps is None else steps)
        if guidance is None:
            guidance = d.guidance if d.guidance is not None else 3.5
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number, got {guidance!r}")
        batch = len(prompts)
        f = self.vae_scale_factor
        lat = self._check_latents(latents, batch, height, width) if latents is not None else None
        if lat is not None and height is None:
            height = lat.shape[2] * f
        if lat is not None and width is None:
            width = lat.shape[3] * f
        height, width = self._round_size(d.default_size if height is None else height,
                                         d.default_size if width is None else width)
        lat_h, lat_w = height // f, width // f
        if lat is not None and tuple(lat.shape[2:]) != (lat_h, lat_w):
            raise ValueError(f"latents: spatial size {tuple(lat.shape[2:])} does not match {height}x{width} pixels "
                             f"(expected {(lat_h, lat_w)} for VAE factor {f})")
        max_len = _positive_int("max_sequence_length", max_sequence_length or d.max_sequence_length)
        self._check_memory(batch, lat_h, lat_w, max_len, height, width)

        callback = self._progress_callback(progress)
        timings, sync = {}, (torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None))
        start = time.perf_counter()
        txt, vec = self.encode_prompt(prompts, max_len)
        sync()
        timings["text_encoding"] = time.perf_counter() - start

        if lat is None:
            lat = self._noise(batch, lat_h, lat_w, seed)
        else:
            self.last_seeds = None
        img = sampling.pack(lat.to(device=self.device, dtype=self.dtype))
        img_ids, txt_ids = sampling.prepare_ids(batch, lat_h, lat_w, txt.shape[1], device=self.device)
        timesteps = schedule(steps, img.shape[1], d)
        t0 = time.perf_counter()
        img = sampling.denoise(self.transformer, img, img_ids, txt, txt_ids, vec, timesteps,
                               guidance=float(guidance) if self.kind == "dev" else None, callback=callback)
        sync()
        timings["denoising"] = time.perf_counter() - t0
        if progress is True:
            print(file=sys.stderr)

        if output_type == "latent":
            out = img
        else:
            t0 = time.perf_counter()
            # sampling.unpack takes pixel sizes of an 8x VAE; give it the equivalent so any VAE factor works.
            z = sampling.unpack(img.float(), lat_h * 8, lat_w * 8)
            decoded = self.decode(z)
            images = to_images(decoded)
            out = torch.from_numpy(images).permute(0, 3, 1, 2) if output_type == "pt" else \
                images if output_type == "np" else to_pil(images)
            sync()
            timings["decoding"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - start
        self.last_timings = timings
        return out

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unpacked latent [B, 16, h, w] -> image [B, 3, H, W] on the [-1, 1] scale, tiled per `vae_tiling`.
        Images are decoded one at a time: the decoder's activations (GBs per megapixel) then stay those of one
        image, a batch decodes exactly like its images alone, and one image already fills a GPU."""
        h, w = z.shape[2:]
        tiled = self._tiled(h, w)
        with torch.inference_mode(), self._on_device("vae") as vae:
            z = z.to(_module_dtype(vae))
            if tiled:
                return torch.cat([vae.decode_tiled(zi, tile=self.vae_tile, overlap=self.vae_tile_overlap)
                                  for zi in z.split(1)])
            return torch.cat([vae.decode(zi) for zi in z.split(1)])

    def _tiled(self, lat_h: int, lat_w: int) -> bool:
        """Whether to decode a latent of lat_h x lat_w in tiles: `vae_tiling` True/False, or "auto": an image of
        more than `vae_tile_above` pixels, or one whose full decode would not fit the memory available now."""
        if self.vae_tiling != "auto":
            return bool(self.vae_tiling)
        f = self.vae_scale_factor
        if lat_h * lat_w * f * f > self.vae_tile_above:
            return True
        avail = _available_memory(self.device)
        return avail is not None and self._decode_bytes(1, lat_h * f, lat_w * f) > avail

    def _decode_bytes(self, batch: int, height: int, width: int, tiled: bool = False) -> int:
        """Lower bound of the decoder's activation memory: four live maps of its full-resolution level (input,
        normed, conv output, residual); tiled: one tile's worth plus the float32 output image."""
        vp = getattr(self.vae, "params", None)
        ch = getattr(vp, "ch", 128) * (getattr(vp, "ch_mult", (1,))[0])
        size = torch.finfo(_module_dtype(self.vae)).bits // 8
        if tiled:
            side = self.vae_tile * self.vae_scale_factor
            return 4 * batch * ch * min(height, side) * min(width, side) * size + batch * 3 * height * width * 4
        return 4 * batch * ch * height * width * size

    # ----------------------------------------------------------------------------------------------------------
    def _round_size(self, height, width) -> tuple[int, int]:
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an int number of pixels, got {type(v).__name__}")
            if v < 16:
                raise ValueError(f"{name}={v}: images must be at least 16 pixels on each side")
        height, width = int(height), int(width)
        multiple = 2 * self.vae_scale_factor  # one 2x2 patch of latent cells
        h, w = height - height % multiple, width - width % multiple
        if (h, w) != (height, width):
            warnings.warn(f"image size {width}x{height} rounded down to {w}x{h} (a multiple of {multiple} pixels)",
                          stacklevel=3)
        return h, w

    def _check_latents(self, latents, batch, height, width) -> torch.Tensor:
        """Validate user latents; returns them unpacked [B, C, h, w]."""
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        c = self.latent_channels
        if latents.ndim == 3 and latents.shape[2] == 4 * c:  # packed [B, L, 4c]
            f, L = self.vae_scale_factor, latents.shape[1]
            if height is not None and width is not None:
                rows, cols = height // (2 * f), width // (2 * f)
            elif math.isqrt(L) ** 2 == L:
                rows = cols = math.isqrt(L)
            else:
                raise ValueError(f"latents: packed latents of {L} tokens need height= and width= (not square)")
            if rows * cols != L:
                raise ValueError(f"latents: {L} packed tokens do not fit {height}x{width} pixels ({rows}x{cols} patches)")
            latents = sampling.unpack(latents, rows * 16, cols * 16)
        elif latents.ndim != 4 or latents.shape[1] != c:
            raise ValueError(f"latents must be [B, {c}, h, w] (unpacked) or [B, L, {4 * c}] (packed), "
                             f"got {list(latents.shape)}")
        if latents.shape[0] != batch:
            raise ValueError(f"latents: batch size {latents.shape[0]} does not match the {batch} prompt(s)")
        if latents.shape[2] % 2 or latents.shape[3] % 2:
            raise ValueError(f"latents: height and width must be even, got {list(latents.shape)}")
        return latents

    def _noise(self, batch: int, lat_h: int, lat_w: int, seed) -> torch.Tensor:
        shape = (self.latent_channels, lat_h, lat_w)
        if seed is None:
            seed = secrets.randbelow(2**32)
        if isinstance(seed, (list, tuple)):
            if len(seed) != batch or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in seed):
                raise ValueError(f"seed: a list of seeds needs one int per prompt ({batch}), got {seed!r}")
            seeds = [int(s) for s in seed]
            noise = torch.cat([torch.randn(1, *shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])
        elif isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
            seed = int(seed)
            seeds = [seed] * batch
            noise = torch.randn(batch, *shape, generator=torch.Generator("cpu").manual_seed(seed))
        else:
            raise TypeError(f"seed must be an int, a list of ints, or None, got {type(seed).__name__}")
        self.last_seeds = seeds
        return noise

    def _check_memory(self, batch, lat_h, lat_w, txt_len, height, width) -> None:
        """Refuse sizes that cannot fit before allocating anything. A lower bound of the activation memory: the
        DiT's joint sequence (hidden + MLP activations of one block) and the VAE decoder's full-resolution
        feature maps (four live maps of its full-resolution level: input, normed, conv output, residual)."""
        bytes_per = torch.finfo(self.dtype).bits // 8
        p = getattr(self.transformer, "params", None)
        hidden = getattr(p, "hidden_size", 3072)
        mlp = getattr(p, "mlp_ratio", 4.0)
        seq = (lat_h // 2) * (lat_w // 2) + txt_len
        dit = batch * seq * hidden * (3 + mlp) * bytes_per
        f = self.vae_scale_factor
        vae = self._decode_bytes(1, lat_h * f, lat_w * f, self._tiled(lat_h, lat_w))  # one image at a time
        need = dit + vae
        avail = _available_memory(self.device)
        if avail is not None and need > avail:
            raise ValueError(f"{width}x{height} pixels (batch {batch}) needs at least {need / 2**30:.1f} GiB of "
                             f"activations on {self.device}, but only {avail / 2**30:.1f} GiB are available; "
                             "use a smaller width/height or batch")

    @staticmethod
    def _progress_callback(progress):
        if progress is None or progress is False:
            return None
        if progress is True:
            def bar(step, num_steps, t, img):
                print(f"\r  denoising {progress_bar(step + 1, num_steps)}", end="", file=sys.stderr, flush=True)
            return bar
        if callable(progress):
            return lambda step, num_steps, t, img: progress(step + 1, num_steps)
        raise TypeError(f"progress must be None, True or a callable(step, num_steps), got {type(progress).__name__}")

    def __repr__(self):
        return (f"Flux(kind={self.kind!r}, device={self.device}, dtype={self.dtype}, "
                f"steps={self.defaults.steps}, max_sequence_length={self.defaults.max_sequence_length}, "
                f"offload={self.offload!r})")


def progress_bar(done: int, total: int, width: int = 30) -> str:
    """'[#####.....] done/total', the bar drawn by progress=True and the command line."""
    filled = int(width * done / total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _to_native_layout(modules, dtype: torch.dtype) -> int:
    """native.prepare_model_ on each quantized module (only layers on a CUDA device convert: offloaded ones,
    in CPU memory, stay canonical and get a transient prepared copy while lent). Returns layers converted.
    Float32 pipelines stay canonical: the kernels take 16-bit activations, the reference ops run instead."""
    from .quant.modules import is_quantized
    quantized = [m for m in modules if is_quantized(m)]
    if not quantized or dtype not in (torch.bfloat16, torch.float16):
        return 0
    from . import native
    return sum(native.prepare_model_(m, dtype) for m in quantized)


def _detect_kind(transformer: nn.Module) -> str:
    """'dev' for a transformer with a guidance embedding, else 'schnell'."""
    params = getattr(transformer, "params", None)
    guidance = params.guidance_embed if hasattr(params, "guidance_embed") else hasattr(transformer, "guidance_in")
    return "dev" if guidance else "schnell"


def _scheduler_config(scheduler) -> dict:
    if isinstance(scheduler, dict):
        return scheduler
    p = Path(scheduler)
    if p.is_dir():
        p = p / "scheduler_config.json"
    return read_json(p, what="scheduler config")


def _embedded_model(name: str, given: dict) -> Path:
    """Folder of an embedded model in nunchaku_lite/assets. "mini-w4a4" is either a full folder of its own or
    just a quantized transformer (assets/mini-w4a4/transformer.safetensors or assets/mini-w4a4.safetensors)
    used with the other components of "mini"."""
    folder = ASSETS / name
    if (folder / "model_index.json").is_file() or name == "mini":
        if not folder.is_dir():
            raise FileNotFoundError(f"the embedded model '{name}' is not in this installation (expected {folder}); "
                                    "pass the path of a FLUX model folder instead")
        return folder
    quantized = [p for p in (folder / "transformer.safetensors", folder / "transformer", ASSETS / f"{name}.safetensors")
                 if p.exists()]
    if not quantized:
        raise FileNotFoundError(f"the embedded model '{name}' is not in this installation (expected {folder} "
                                f"with transformer.safetensors, or {ASSETS / (name + '.safetensors')}); pass the "
                                "path of a FLUX model folder instead")
    if given["transformer"] is None:
        given["transformer"] = quantized[0]
    return _embedded_model("mini", given)


def _resolve_root(path, given: dict) -> tuple[Path | None, dict | None]:
    """(diffusers-layout folder or None, its model_index.json or None) for from_pretrained's `path`."""
    if path is None:
        return None, None
    if isinstance(path, str) and path in EMBEDDED_MODELS and not Path(path).exists():
        path = _embedded_model(path, given)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            from .loading.files import PICKLE_SUFFIXES, refuse_pickle
            if path.suffix.lower() in PICKLE_SUFFIXES:
                refuse_pickle(path)
            raise ValueError(f"{path}: expected a diffusers-layout folder or a .safetensors transformer file")
        if given["transformer"] is None:
            given["transformer"] = path  # BFL single file; the other parts come as keywords
        return None, None
    if (path / "model_index.json").is_file():
        return path, read_json(path / "model_index.json", what="model_index.json")
    if (path / "transformer").is_dir():
        return path, None
    raise ValueError(f"{path}: neither a diffusers-layout folder (model_index.json with transformer/, vae/, "
                     "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/) nor a .safetensors file; for BFL "
                     "single files pass transformer=, vae=, text_encoder=, text_encoder_2=, tokenizer=, tokenizer_2=")
