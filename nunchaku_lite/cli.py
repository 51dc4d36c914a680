"""Command line: `python -m nunchaku_lite generate --model PATH --prompt TEXT ...` (console script: nunchaku-lite).

Subcommands live in SUBCOMMANDS as (name, help, add_args(parser), run(args) -> exit code). The quantization
subcommands come from `nunchaku_lite.quant.cli.SUBCOMMANDS` when that module exists (imported only here, when
the parser is built). Errors a user can fix (bad paths, options, checkpoints) print one line and exit with 2.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import sys
import time
from pathlib import Path


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="diffusers-layout FLUX folder, a BFL transformer .safetensors file, or an "
                                   "embedded model name ('mini')")
    p.add_argument("--prompt", action="append", required=True,
                   help="text prompt; repeat for a batch (writes OUT_0.png, OUT_1.png, ...)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's; 4 schnell, 50 dev)")
    p.add_argument("--guidance", type=float, help="guidance strength for dev models (default 3.5)")
    p.add_argument("--width", type=int, help="pixels (default: the model's, 1024 for FLUX; rounded down to a "
                                             "multiple of 16)")
    p.add_argument("--height", type=int, help="pixels (default: the model's, 1024 for FLUX; rounded down to a "
                                              "multiple of 16)")
    p.add_argument("--seed", type=int, help="noise seed (default: random, printed)")
    p.add_argument("--out", default="flux.png", help="output PNG path (default flux.png)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: the transformer's stored dtype)")
    p.add_argument("--transformer", help="transformer folder or .safetensors file (BFL, diffusers, quantized)")
    p.add_argument("--vae", help="VAE folder or file (e.g. ae.safetensors)")
    p.add_argument("--t5", help="T5 encoder folder or file (e.g. t5xxl_fp16.safetensors)")
    p.add_argument("--clip", help="CLIP text encoder folder or file (e.g. clip_l.safetensors)")
    p.add_argument("--tokenizers", help="folder with tokenizer/ and tokenizer_2/ (or with vocab.json, merges.txt "
                                        "and spiece.model side by side)")
    p.add_argument("--transformer-config", help="JSON config for a transformer file whose RoPE axes cannot be "
                                                "read from its shapes (BFL FluxParams or diffusers names)")
    p.add_argument("--kind", choices=("dev", "schnell"), help="override the detected model kind")
    p.add_argument("--max-sequence-length", type=int, help="T5 tokens (default: the model's; 256 schnell, 512 dev)")
    p.add_argument("--offload", choices=("none", "model"), default="none",
                   help="model: keep only the DiT on the GPU; text encoders and VAE are lent to it while they run")
    p.add_argument("--t5-quant", choices=("w4a16",), help="load T5 with 4-bit weights (quantized while loading)")
    p.add_argument("--vae-tiling", choices=("auto", "on", "off"), default="auto",
                   help="tiled VAE decoding (auto: above 1024x1024 pixels, 512x512 with --offload model)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or timings")


def _tokenizer_folders(folder: str | None) -> tuple[Path | None, Path | None]:
    if folder is None:
        return None, None
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--tokenizers: folder not found: {root}")
    if (root / "tokenizer").is_dir() and (root / "tokenizer_2").is_dir():
        return root / "tokenizer", root / "tokenizer_2"
    return root, root


def _png_bytes(image, info: dict) -> bytes:
    from PIL.PngImagePlugin import PngInfo
    meta = PngInfo()
    for k, v in info.items():
        meta.add_text(k, str(v))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def output_paths(out: str, n: int) -> list[Path]:
    """OUT for one image; OUT_0.png, OUT_1.png, ... (same folder and stem) for a batch."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        out = out.with_name(out.name + ".png")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def run_generate(args) -> int:
    from .loading.files import write_atomic
    from .pipeline import Flux, progress_bar

    clip_tok, t5_tok = _tokenizer_folders(args.tokenizers)
    if args.model is None and args.transformer is None:
        raise ValueError("pass --model PATH (a FLUX folder) or --transformer FILE with --vae, --t5, --clip and "
                         "--tokenizers")
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    pipe = Flux.from_pretrained(args.model, device=args.device, dtype=args.dtype, transformer=args.transformer,
                                vae=args.vae, text_encoder=args.clip, text_encoder_2=args.t5, tokenizer=clip_tok,
                                tokenizer_2=t5_tok, kind=args.kind,
                                configs={"transformer": args.transformer_config} if args.transformer_config else None,
                                offload=args.offload, t5_quant=args.t5_quant,
                                vae_tiling={"auto": "auto", "on": True, "off": False}[args.vae_tiling])
    log(f"loaded {pipe} in {time.perf_counter() - t0:.1f}s")

    def progress(step, num_steps):
        print(f"\rdenoising {progress_bar(step, num_steps)} {time.perf_counter() - start:.1f}s",
              end="\n" if step == num_steps else "", file=sys.stderr, flush=True)

    start = time.perf_counter()
    images = pipe(args.prompt, steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
                  seed=args.seed, progress=None if args.quiet else progress,
                  max_sequence_length=args.max_sequence_length)
    t = pipe.last_timings
    log(f"seed {pipe.last_seeds[0]} | text encoding {t['text_encoding']:.2f}s | denoising {t['denoising']:.2f}s "
        f"| decoding {t['decoding']:.2f}s | total {t['total']:.2f}s")
    for path, image, prompt, seed in zip(output_paths(args.out, len(images)), images, args.prompt, pipe.last_seeds):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, _png_bytes(image, {"prompt": prompt, "seed": seed, "model": args.model or args.transformer}))
        print(path)
    return 0


SUBCOMMANDS: list[tuple] = [
    ("generate", "generate images from text prompts", add_generate_args, run_generate),
]


def _all_subcommands() -> list[tuple]:
    subs = list(SUBCOMMANDS)
    if importlib.util.find_spec("nunchaku_lite.quant.cli") is None:
        return subs
    try:
        quant_cli = importlib.import_module("nunchaku_lite.quant.cli")
    except ImportError as e:  # present but broken: say so instead of silently hiding the commands
        print(f"warning: quantization commands unavailable ({e})", file=sys.stderr)
        return subs
    return subs + [s if len(s) == 4 else (s[0], None, s[1], s[2]) for s in getattr(quant_cli, "SUBCOMMANDS", [])]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nunchaku-lite", description="FLUX.1 text-to-image (16-bit and "
                                     "SVDQuant W4A4) in plain PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_args, run in _all_subcommands():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .loading.files import CheckpointError
    try:
        return args.run(args) or 0
    except (CheckpointError, ValueError, TypeError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
