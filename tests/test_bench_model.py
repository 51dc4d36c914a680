"""`python -m nunchaku_lite.bench model` on the tiny architecture (CPU smoke test), and its building blocks."""
import json

import pytest
import torch
from torch import nn

from nunchaku_lite.bench import model as bench
from nunchaku_lite.bench.__main__ import main as bench_main
from nunchaku_lite.models.dit import Flux as FluxDiT
from nunchaku_lite.quant.modules import SplitInputLinear, W4A4Linear, W4A16Linear
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
        assert p["ms_per_image"] == p["ms"] / p["batch"]
        assert p["name"] in table
    vae = [p for p in result["phases"] if p["name"].startswith("vae")]
    assert all(p["batch"] == 1 and p["size"] == "64x64" for p in vae)  # one image: the pipeline decodes one at a time
    assert result["phases"][0]["tokens_per_image"] == 4 * 4 + 32  # 64 px / 8 / 2 = 4x4 patches, 32 text tokens
    r = result["ratios"]
    assert r["dit_weight_ratio_16bit_over_w4a4"] > 1.3  # bf16 block linears -> 4-bit (tiny: embedders dominate)
    assert r["t5_weight_ratio_16bit_over_w4a16"] > 1.5
    w4a4 = result["phases"][1]
    assert 0 < w4a4["rel_l2_vs_16bit"] < 0.5 and w4a4["native_kernels"] is False
    assert result["layers_converted"] == 0  # on a CPU the layers stay canonical (reference ops)


def test_model_bench_sizes_and_batches_in_one_run(tmp_path, one_thread):
    """--sizes/--batches: every (size, batch) of each DiT, non-square sizes, the JSON rewritten after each phase,
    whole generations only at the pipeline sizes, and the batch-vs-single per-image check."""
    out = tmp_path / "bench.json"
    writes = []
    real = bench._write_json
    bench._write_json = lambda path, result: (writes.append(len(result["phases"])), real(path, result))
    try:
        assert bench_main(["model", "--arch", "tiny", "--sizes", "64,96x48", "--batches", "1,3", "--steps", "1",
                           "--pipeline-sizes", "96x48", "--json", str(out)]) == 0
    finally:
        bench._write_json = real
    result = json.loads(out.read_text())
    rows = [(p["name"], p["size"], p["batch"]) for p in result["phases"]]
    for name in ("dit-16bit", "dit-w4a4"):
        assert [r for r in rows if r[0] == name] == [(name, s, b) for s in ("64x64", "96x48") for b in (1, 3)]
    assert [r for r in rows if r[0].startswith("pipeline")] == [("pipeline-resident", "96x48", 1),
                                                              ("pipeline-offload", "96x48", 1)]
    assert [r for r in rows if r[0] == "t5-w4a16"] == [("t5-w4a16", None, 1), ("t5-w4a16", None, 3)]
    wide = next(p for p in result["phases"] if p["name"] == "dit-w4a4" and p["size"] == "96x48")
    assert wide["tokens_per_image"] == 6 * 3 + 32 and "rel_l2_vs_16bit" in wide
    assert writes == list(range(1, len(rows) + 1)) + [len(rows)]  # after every phase, then the final result
    assert set(result["checks"]) == {f"w4a4 per-image latency at batch 3 <= batch 1, {s}" for s in ("64x64", "96x48")}
    assert result["sizes"] == ["64x64", "96x48"] and result["batches"] == [1, 3]


@pytest.mark.parametrize("args, message", [
    (["--sizes", "1000"], "multiples of 16"),
    (["--sizes", "1024x1000"], "multiples of 16"),
    (["--sizes", "big"], "WIDTHxHEIGHT"),
    (["--batches", "1,0"], "positive ints"),
    (["--pipeline-sizes", "8"], "multiples of 16"),
    (["--phase-seconds", "0"], "phase-seconds"),
])
def test_model_bench_rejects_bad_sizes_and_batches(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench_main(["model", "--arch", "tiny", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_skip_16bit_builds_the_w4a4_dit_directly(one_thread):
    arch = bench.Arch.named("tiny")
    dit = bench.build_w4a4_dit(arch, torch.device("cpu"), torch.bfloat16, rank=16)
    kinds = {type(m) for n, m in dit.named_modules() if n.startswith(("double_blocks.", "single_blocks."))}
    assert W4A4Linear in kinds and W4A16Linear in kinds and nn.Linear not in kinds
    assert all(not t.is_meta for t in [*dit.parameters(), *dit.buffers()])
    x = bench.dit_inputs(arch, (96, 48), 2, "cpu", torch.bfloat16)
    with torch.no_grad():
        y = dit(**x)
    assert y.shape == (2, 18, 64) and torch.isfinite(y).all() and y.float().std() > 0.01


def test_summary_checks_issue_5_targets():
    """checks: the W4A4 DiT's resident bytes, the offload mode's peak at 1024x1024, per-image latency at batch > 1."""
    opts = bench.Options(arch="flux-dev", sizes=[(1024, 1024)], batches=[1, 4])
    mk = lambda name, batch, ms, peak, **kw: bench.Phase(name, (1024, 1024), batch, ms, [ms], 2**30, peak, kw)  # noqa
    phases = [mk("dit-16bit", 1, 180.0, 23 * 2**30), mk("dit-w4a4", 1, 80.0, 8 * 2**30),
              mk("dit-w4a4", 4, 300.0, 9 * 2**30), mk("pipeline-offload", 1, 5e3, 10.5 * 2**30)]
    info = dict(dit_w4a4_weight_gib=6.4, dit_w4a4_resident_gib=6.5)
    result = bench.summarize(opts, torch.device("cpu"), phases, info)
    checks = result["checks"]
    assert checks["W4A4 DiT resident <= 7 GiB"] == dict(value=6.5, limit=7.0, ok=True)
    assert checks["offload pipeline peak at 1024x1024 < 10 GiB"]["ok"] is False
    assert checks["w4a4 per-image latency at batch 4 <= batch 1, 1024x1024"] == dict(value=0.938, limit=1.0, ok=True)
    assert result["ratios"]["dit_step_speedup_w4a4 1024x1024 b1"] == pytest.approx(180 / 80)


def test_quick_w4a4_replaces_block_linears_and_stays_close():
    arch = bench.Arch.named("tiny")
    dit = bench.build(lambda: FluxDiT(arch.dit), torch.device("cpu"), torch.float32)
    dense = {n: m.weight.detach().clone() for n, m in dit.named_modules() if isinstance(m, nn.Linear)}
    bench.quick_w4a4_(dit, rank=16, mode="svd")
    for name, m in dit.named_modules():
        if name.startswith(("double_blocks.", "single_blocks.")) and name in dense:
            if name.endswith("linear2"):  # [attn | gelu(mlp)]: signed + unsigned parts, as the quantizer builds it
                assert isinstance(m, SplitInputLinear) and [p.act_unsigned for p in m.parts] == [False, True]
            else:
                assert isinstance(m, W4A16Linear if is_modulation(name) else W4A4Linear), name
                assert m.act_unsigned == name.endswith("mlp.2") if isinstance(m, W4A4Linear) else True
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
