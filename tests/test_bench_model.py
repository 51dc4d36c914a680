"""`python -m nunchaku_lite.bench model` on the tiny architecture (CPU smoke test), and its building blocks."""
import json

import pytest
import torch
from torch import nn

from nunchaku_lite.bench import model as bench
from nunchaku_lite.bench.__main__ import main as bench_main
from nunchaku_lite.models.dit import Flux as FluxDiT
from nunchaku_lite.quant.modules import W4A4Linear, W4A16Linear
from nunchaku_lite.quant.svdquant import is_modulation


@pytest.fixture
def one_thread():
    """Tiny models run best on one thread, and do not stall when other processes load the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_model_bench_tiny_runs_and_writes_json(tmp_path, capsys, one_thread):
    out = tmp_path / "bench.json"
    assert bench_main(["model", "--arch", "tiny", "--size", "64", "--batch", "2", "--steps", "2",
                       "--json", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    names = [p["name"] for p in result["phases"]]
    assert names == ["dit-16bit", "dit-w4a4", "t5-16bit", "clip", "vae-decode", "vae-decode-tiled",
                     "pipeline-resident", "t5-w4a16", "pipeline-offload"]
    for p in result["phases"]:
        assert p["ms"] > 0 and len(p["ms_all"]) >= 1 and p["weight_gib"] > 0, p
        assert p["ms_per_image"] == p["ms"] / 2
        assert p["name"] in table
    assert result["tokens_per_image"] == 4 * 4 + 32  # 64 px / 8 / 2 = 4x4 patches, 32 text tokens
    r = result["ratios"]
    assert r["dit_weight_ratio_16bit_over_w4a4"] > 1.3  # bf16 block linears -> 4-bit (tiny: embedders dominate)
    assert r["t5_weight_ratio_16bit_over_w4a16"] > 1.5
    w4a4 = result["phases"][1]
    assert 0 < w4a4["rel_l2_vs_16bit"] < 0.5 and w4a4["native_kernels"] is False


def test_quick_w4a4_replaces_block_linears_and_stays_close():
    arch = bench.Arch.named("tiny")
    dit = bench.build(lambda: FluxDiT(arch.dit), torch.device("cpu"), torch.float32)
    dense = {n: m.weight.detach().clone() for n, m in dit.named_modules() if isinstance(m, nn.Linear)}
    bench.quick_w4a4_(dit, rank=16, mode="svd")
    for name, m in dit.named_modules():
        if name.startswith(("double_blocks.", "single_blocks.")) and name in dense:
            assert isinstance(m, W4A16Linear if is_modulation(name) else W4A4Linear), name
            rel = ((m.dense_weight() - dense[name]).norm() / dense[name].norm()).item()
            assert rel < 0.15, (name, rel)  # INT4 residual of a random matrix: ~10%
        elif name in dense:
            assert isinstance(m, nn.Linear), name  # embedders and final layer stay 16-bit
    assert dit.quant_config["method"] == "quick-svd"


def test_random_build_fills_everything():
    arch = bench.Arch.named("tiny")
    dit = bench.build(lambda: FluxDiT(arch.dit), torch.device("cpu"), torch.bfloat16, seed=0)
    params = dict(dit.named_parameters())
    assert all(not p.is_meta and p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params.values())
    w = params["double_blocks.0.img_attn.qkv.weight"].float()
    assert abs(w.std().item() - w.shape[1] ** -0.5) < 0.2 * w.shape[1] ** -0.5
    assert torch.equal(params["double_blocks.0.img_attn.norm.query_norm.scale"].float(), torch.ones(64))
    assert not params["img_in.bias"].any()


def test_weight_plan_of_the_real_architecture(tmp_path, capsys):
    """Sizes from meta-device models: the 16-bit FLUX.1-dev DiT is the 22.17 GiB that HARDWARE.md measured with
    diffusers' model; the W4A4 one must fit issue 5's 7 GiB; the offload mode's weights stay under 10 GiB."""
    out = tmp_path / "plan.json"
    assert bench_main(["model", "--arch", "flux-dev", "--weights-only", "--json", str(out)]) == 0
    gib = json.loads(out.read_text())["weight_gib"]
    assert abs(gib["dit-16bit"] - 22.17) < 0.01
    assert 5.5 < gib["dit-w4a4"] < 7.0
    # t5xxl_fp16.safetensors is 9.79 GB: 4.89 B parameters, minus its duplicate 32128 x 4096 embedding table
    assert abs(gib["t5-16bit"] - (9.79e9 - 2 * 32128 * 4096) / 2**30) < 0.05
    assert gib["t5-w4a16"] < gib["t5-16bit"] / 3
    assert gib["mode-offload"] < 10 < gib["mode-resident"]
    assert "dit-w4a4" in capsys.readouterr().out
