"""Generate an image with nunchaku_lite.

    python examples/generate.py                         # the embedded default model ("mini"), default prompt
    python examples/generate.py --model FLUX.1-schnell --prompt "a red fox in the snow" --out fox.png

Takes the same options as `python -m nunchaku_lite generate` (see --help) and writes a PNG.
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from nunchaku_lite.cli import add_generate_args, run_generate  # noqa: E402
from nunchaku_lite.loading.files import CheckpointError  # noqa: E402
from nunchaku_lite.pipeline import ASSETS  # noqa: E402

DEFAULT_MODEL = "mini"
DEFAULT_PROMPT = "a red circle above a blue square on a white background"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generate_args(parser)
    for action in parser._actions:  # the example needs no arguments: defaults below
        if action.dest == "prompt":
            action.required = False
    args = parser.parse_args(argv)
    if args.prompt is None:
        args.prompt = [DEFAULT_PROMPT]
    if args.model is None and args.transformer is None:
        if not (ASSETS / DEFAULT_MODEL).is_dir():
            print(f"No model given and the embedded default model is missing ({ASSETS / DEFAULT_MODEL}).\n"
                  "Pass a FLUX model, e.g.\n"
                  "  python examples/generate.py --model path/to/FLUX.1-schnell --prompt 'a red fox'\n"
                  "(a diffusers-layout folder), or BFL single files with --transformer flux1-schnell.safetensors "
                  "--vae ae.safetensors --t5 T5_FOLDER_OR_FILE --clip CLIP_FOLDER_OR_FILE --tokenizers FOLDER.",
                  file=sys.stderr)
            return 2
        args.model = DEFAULT_MODEL
    try:
        return run_generate(args)
    except (CheckpointError, ValueError, TypeError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
