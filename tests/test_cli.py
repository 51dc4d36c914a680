"""Command line and example script: end to end on the golden tiny pipeline, writing PNGs to tmp_path."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nunchaku_lite import cli

REPO = Path(__file__).resolve().parent.parent


def _generate(golden, tmp_path, *extra):
    out = tmp_path / "out" / "cat.png"
    argv = ["generate", "--model", str(golden("pipeline")), "--prompt", "A photo of a cat", "--width", "32",
            "--height", "32", "--seed", "3", "--steps", "2", "--out", str(out), "--device", "cpu", *extra]
    return cli.main(argv), out


def test_generate_writes_png_with_progress_and_timings(golden, tmp_path, capsys):
    rc, out = _generate(golden, tmp_path)
    assert rc == 0 and out.is_file()
    err = capsys.readouterr().err
    assert "denoising" in err and "2/2" in err and "\r" in err
    assert "text encoding" in err and "decoding" in err and "seed 3" in err
    image = Image.open(out)
    assert image.size == (32, 32) and image.format == "PNG" and image.text["seed"] == "3"
    assert sorted(p.name for p in out.parent.iterdir()) == ["cat.png"]  # no temp file left behind

    from nunchaku_lite import Flux
    pipe = Flux.from_pretrained(golden("pipeline"), device="cpu")
    expected = pipe("A photo of a cat", height=32, width=32, seed=3, steps=2)[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))


def test_batch_of_prompts_writes_numbered_files(golden, tmp_path):
    rc, out = _generate(golden, tmp_path, "--prompt", "a dog", "--quiet")
    assert rc == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["cat_0.png", "cat_1.png"]


def test_bfl_single_files_from_the_command_line(golden, tmp_path):
    import json
    g = golden("pipeline")
    cfg = tmp_path / "flux_tiny.json"
    cfg.write_text(json.dumps(json.loads((g / "bfl_params.json").read_text())["flux_tiny"]))
    out = tmp_path / "bfl.png"
    rc = cli.main(["generate", "--transformer", str(g / "flux_tiny.safetensors"), "--transformer-config", str(cfg),
                   "--vae", str(g / "ae_tiny.safetensors"), "--t5", str(g / "text_encoder_2"),
                   "--clip", str(g / "text_encoder"), "--tokenizers", str(g), "--prompt", "hi", "--width", "32",
                   "--height", "32", "--steps", "1", "--seed", "0", "--out", str(out), "--quiet", "--device", "cpu"])
    assert rc == 0 and Image.open(out).size == (32, 32)


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    rc = cli.main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing" in err and "Traceback" not in err
    rc = cli.main(["generate", "--prompt", "x"])
    assert rc == 2 and "--model" in capsys.readouterr().err


def test_subcommand_registry():
    names = [s[0] for s in cli._all_subcommands()]
    assert names[0] == "generate" and len(names) == len(set(names))
    parser = cli.build_parser()
    args = parser.parse_args(["generate", "--prompt", "a", "--prompt", "b", "--steps", "3"])
    assert args.prompt == ["a", "b"] and args.steps == 3 and args.run is cli.run_generate
    with pytest.raises(SystemExit):
        parser.parse_args(["generate"])  # --prompt is required


def test_output_paths():
    assert cli.output_paths("x/img.png", 1) == [Path("x/img.png")]
    assert cli.output_paths("img", 2) == [Path("img_0.png"), Path("img_1.png")]


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "nunchaku_lite", "generate", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--prompt" in r.stdout


def _example_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("generate_example", REPO / "examples" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_without_model_explains_what_is_missing(tmp_path, monkeypatch, capsys):
    example = _example_module()
    monkeypatch.setattr(example, "ASSETS", tmp_path / "no-assets")
    assert example.main([]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "mini" in err


def test_example_draws_the_embedded_model_grid(tmp_path):
    """The README's main command: no arguments -> the mini model, 16-bit and W4A4 side by side in one PNG."""
    if not (REPO / "nunchaku_lite" / "assets" / "mini").is_dir():
        pytest.skip("the embedded default model is not in this checkout")
    r = subprocess.run([sys.executable, str(REPO / "examples" / "generate.py"), "--prompt",
                        "a red circle on a blue background", "--prompt", "a green cross on an orange background"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    grid = Image.open(tmp_path / "mini_grid.png")
    assert grid.width > 2 * 128 and grid.height > 2 * 128  # two rows, two columns of 128x128 images


def test_memory_flags_reach_the_pipeline(golden, tmp_path, monkeypatch):
    from nunchaku_lite import Flux
    from nunchaku_lite.quant.modules import W4A16Linear
    seen = {}
    original = Flux.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        pipe = original(cls, *args, **kwargs)
        seen.update(kwargs, pipe=pipe)
        return pipe

    monkeypatch.setattr(Flux, "from_pretrained", classmethod(spy))
    rc, out = _generate(golden, tmp_path, "--t5-quant", "w4a16", "--vae-tiling", "off", "--quiet")
    assert rc == 0 and out.is_file()
    assert seen["t5_quant"] == "w4a16" and seen["vae_tiling"] is False and seen["offload"] == "none"
    assert any(isinstance(m, W4A16Linear) for m in seen["pipe"].text_encoder_2.modules())
