"""`quantize` / `eval-quant` subcommands and the evaluation API, on the tiny golden pipeline (CPU)."""
import math
import warnings

import numpy as np
import pytest
import torch

from nunchaku_lite.cli import main
from nunchaku_lite.quant.evaluate import evaluate, format_table, psnr, ssim

SMALL = ["--height", "32", "--width", "32", "--steps", "2", "--alpha-grid", "4", "--refine-iters", "1",
         "--dtype", "fp32", "--device", "cpu"]


@pytest.fixture
def pipeline_dir(golden):
    return str(golden("pipeline"))


@pytest.fixture(autouse=True)
def _quiet_padding_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not a multiple of 64.*")  # the tiny model's K = 48
        yield


def test_quantize_command_writes_loadable_file(tmp_path, pipeline_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na red house\n")
    out = tmp_path / "q.safetensors"
    rc = main(["quantize", "--model", pipeline_dir, "--out", str(out), "--prompts", str(prompts), "--rank", "8",
               *SMALL])
    assert rc == 0 and out.is_file()
    err = capsys.readouterr().err
    assert "captured 4 transformer inputs" in err  # 2 prompts x 2 steps
    assert "double_blocks.0:" in err and "single_blocks.0:" in err  # one progress line per block
    from nunchaku_lite.loading import load_transformer
    from nunchaku_lite.quant.format import read_metadata

    meta = read_metadata(out)
    assert meta["method"] == "svdquant" and meta["rank"] == "8"
    dit = load_transformer(out, device="cpu")
    assert dit.double_blocks[0].img_attn.qkv.rank == 8


def test_quantize_command_errors(tmp_path, pipeline_dir, capsys):
    rc = main(["quantize", "--model", pipeline_dir, "--out", str(tmp_path / "q.safetensors"),
               "--prompts", str(tmp_path / "missing.txt"), *SMALL])
    assert rc == 2 and "prompts file not found" in capsys.readouterr().err
    rc = main(["quantize", "--model", pipeline_dir, "--out", str(tmp_path / "q.bin"), *SMALL])
    assert rc == 2 and "--out: expected a .safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--model", pipeline_dir, "--out", "x.safetensors", "--method", "gptq"])


def test_eval_quant_command_table_and_grid(tmp_path, pipeline_dir, capsys):
    grid = tmp_path / "grid.png"
    (tmp_path / "eval.txt").write_text("a red circle\na blue square\n")
    (tmp_path / "calib.txt").write_text("a cat\na tree\n")
    rc = main(["eval-quant", "--model", pipeline_dir, "--methods", "naive", "svdquant", "--ranks", "4", "16",
               "--seeds", "0", "1", "--grid", str(grid), "--prompts", str(tmp_path / "eval.txt"),
               "--calibration-prompts", str(tmp_path / "calib.txt"), *SMALL])
    assert rc == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["method", "rank", "PSNR", "dB"]
    rows = {(line.split()[0], line.split()[1]): line.split() for line in table[2:]}
    assert set(rows) == {("16-bit", "-"), ("naive", "0"), ("svdquant", "4"), ("svdquant", "16")}
    assert float(rows[("svdquant", "16")][2]) > float(rows[("naive", "0")][2])  # PSNR
    from PIL import Image

    with Image.open(grid) as im:  # 2 prompts x 2 seeds rows of 32 px, 4 columns
        assert im.size == (4 * 32, 4 * 32)


def test_evaluate_api_with_scorer(pipeline_dir):
    from nunchaku_lite import Flux

    pipe = Flux.from_pretrained(pipeline_dir, device="cpu", dtype=torch.float32)
    base = pipe.transformer
    seen = []

    def scorer(image, prompt):
        seen.append(prompt)
        return {"bright": float(image.mean()) > 0.3, "is_cat": "cat" in prompt}

    rows = evaluate(pipe, ["a cat", "a dog"], methods=["naive"], seeds=[0], height=32, width=32, steps=2,
                    calibration_prompts=["a tree"], scorer=scorer, quantize_kwargs=dict(grid=4),
                    log=lambda *a: None)
    assert pipe.transformer is base  # restored, still 16-bit
    assert [r["method"] for r in rows] == ["16-bit", "naive"]
    assert rows[0]["acc:is_cat"] == 0.5 and rows[1]["acc:is_cat"] == 0.5
    assert 0 < rows[1]["psnr"] < math.inf and rows[1]["layer_err_mean"] > 0
    assert seen == ["a cat", "a dog"] * 2
    assert "acc:bright" in format_table(rows)
    with pytest.raises(ValueError, match="unknown method 'int8'"):
        evaluate(pipe, ["a cat"], methods=["int8"])


def test_psnr_and_ssim():
    rng = np.random.default_rng(0)
    a = rng.random((24, 24, 3)).astype(np.float32)
    assert psnr(a, a) == math.inf and ssim(a, a) == pytest.approx(1.0)
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-4)  # mse 0.01
    noisy = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    assert ssim(a, noisy) < ssim(a, np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)) < 1.0
    assert ssim(a, 1 - a) < 0  # anti-correlated structure


def test_eval_quant_on_the_mini_model_scores_attributes(tmp_path, capsys):
    """eval-quant defaults to the embedded mini model and adds the attribute checker's accuracy columns."""
    from nunchaku_lite import cli
    from nunchaku_lite.pipeline import ASSETS

    if not (ASSETS / "mini").is_dir():
        pytest.skip("the embedded mini model is not in this checkout")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on a blue background\na green cross at the center on an orange background\n")
    rc = cli.main(["eval-quant", "--prompts", str(prompts), "--calibration-prompts", str(prompts),
                   "--methods", "naive", "svdquant", "--ranks", "16", "--samples", "4", "--alpha-grid", "2",
                   "--steps", "3", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "acc:color_shape" in out and "acc:background" in out
    lines = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert set(lines) == {"16-bit", "naive", "svdquant"}
