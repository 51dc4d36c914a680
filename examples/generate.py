"""Generate images with nunchaku_lite.

    python examples/generate.py                          # embedded mini model: a few prompts, 16-bit vs W4A4 grid
    python examples/generate.py --prompt "a green star on a black background" --seed 3
    python examples/generate.py --model FLUX.1-schnell --prompt "a red fox in the snow" --out fox.png

Without --model/--transformer it draws with the embedded default model "mini" (a 128x128 FLUX-architecture
model trained on synthetic shapes) and its SVDQuant W4A4 version "mini-w4a4", and writes one PNG grid with
the two side by side (default mini_grid.png; runs on the CPU in seconds). With a model it behaves like
`python -m nunchaku_lite generate` (same options, see --help) and writes one PNG per prompt.
"""
import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from nunchaku_lite.cli import add_generate_args, run_generate  # noqa: E402
from nunchaku_lite.loading.files import CheckpointError, write_atomic  # noqa: E402
from nunchaku_lite.pipeline import ASSETS  # noqa: E402

DEFAULT_MODEL = "mini"
QUANTIZED_MODEL = "mini-w4a4"
# Prompts inside the mini model's caption grammar (see nunchaku_lite/assets/mini/README.md).
DEFAULT_PROMPTS = [
    "a red circle on a blue background",
    "a large yellow star at the top left on a purple background",
    "a small white triangle at the bottom right on a black background",
    "a green cross at the center on an orange background",
]


def run_mini_grid(args) -> int:
    """16-bit and W4A4 mini model side by side, one row per prompt, written as one PNG grid."""
    import io

    import torch

    from nunchaku_lite import Flux
    from nunchaku_lite.mini.grid import image_grid

    prompts = args.prompt or DEFAULT_PROMPTS
    seed = 1 if args.seed is None else args.seed
    seeds = [seed + i for i in range(len(prompts))]
    device = args.device or "cpu"
    out = Path(args.out if args.out != "flux.png" else "mini_grid.png")
    columns, timings = [], []
    for name in (DEFAULT_MODEL, QUANTIZED_MODEL):
        t0 = time.perf_counter()
        pipe = Flux.from_pretrained(name, device=device, dtype=args.dtype or torch.bfloat16)
        images = pipe(prompts, seed=seeds, steps=args.steps, width=args.width, height=args.height)
        timings.append(f"{name}: {time.perf_counter() - t0:.1f}s")
        columns.append(images)
    grid = image_grid([list(row) for row in zip(*columns)], column_titles=["16-bit", "SVDQuant W4A4"],
                      row_titles=[f"{p} (seed {s})" for p, s in zip(prompts, seeds)])
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    write_atomic(out, buf.getvalue())
    if not args.quiet:
        print(f"{len(prompts)} prompts, {', '.join(timings)} -> {out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generate_args(parser)
    for action in parser._actions:  # the example needs no arguments: defaults below
        if action.dest == "prompt":
            action.required = False
    args = parser.parse_args(argv)
    try:
        if args.model is None and args.transformer is None:
            missing = [n for n in (DEFAULT_MODEL, QUANTIZED_MODEL) if not (ASSETS / n).exists()]
            if missing:
                print(f"No model given and the embedded default model is missing ({ASSETS / missing[0]}).\n"
                      "Pass a FLUX model, e.g.\n"
                      "  python examples/generate.py --model path/to/FLUX.1-schnell --prompt 'a red fox'\n"
                      "(a diffusers-layout folder), or BFL single files with --transformer flux1-schnell.safetensors "
                      "--vae ae.safetensors --t5 T5_FOLDER_OR_FILE --clip CLIP_FOLDER_OR_FILE --tokenizers FOLDER.",
                      file=sys.stderr)
                return 2
            return run_mini_grid(args)
        if args.prompt is None:
            parser.error("--prompt is required with --model/--transformer")
        return run_generate(args)
    except (CheckpointError, ValueError, TypeError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
