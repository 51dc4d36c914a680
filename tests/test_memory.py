"""Memory modes: T5 with 4-bit weights loaded layer by layer, CPU offload of the text encoders and VAE, VAE tiling."""
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from nunchaku_lite import Flux
from nunchaku_lite.loading import load_t5
from nunchaku_lite.memory import CPUOffload, load_t5_w4a16, module_bytes, quantize_w4a16_
from nunchaku_lite.models.t5 import T5Config, T5Encoder
from nunchaku_lite.pipeline import OFFLOADED
from nunchaku_lite.quant.modules import W4A16Linear



@pytest.fixture
def schnell(golden_pipe):
    return golden_pipe


def _linears(module):
    return {n: type(m) for n, m in module.named_modules() if isinstance(m, (nn.Linear, W4A16Linear))}


def _random_t5(tmp_path, d_model=128, d_ff=256):
    torch.manual_seed(0)
    t5 = T5Encoder(T5Config(vocab_size=64, d_model=d_model, d_kv=32, d_ff=d_ff, num_heads=4, num_layers=2))
    with torch.no_grad():
        for name, p in t5.named_parameters():
            if p.ndim == 2 and "shared" not in name and "relative" not in name:
                p.normal_(0, p.shape[1] ** -0.5)
    path = tmp_path / "t5.safetensors"
    save_file({k: v.contiguous() for k, v in t5.state_dict().items()}, str(path))
    return t5.eval(), path


def test_t5_w4a16_streaming_load_equals_in_place_quantization(golden):
    path = golden("pipeline", "text_encoder_2")
    streamed = load_t5_w4a16(path)
    in_place = quantize_w4a16_(load_t5(path))
    kinds = _linears(streamed)
    assert kinds and set(kinds.values()) == {W4A16Linear}  # no 16-bit linear left
    a, b = streamed.state_dict(), in_place.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed(ids), in_place(ids))


def test_t5_w4a16_is_t5_with_4bit_weights_and_smaller(tmp_path):
    dense, path = _random_t5(tmp_path)
    quant = load_t5_w4a16(path)
    emulated = T5Encoder(dense.cfg)
    emulated.load_state_dict(dense.state_dict())
    for name, q in quant.named_modules():
        if isinstance(q, W4A16Linear):
            w = dense.get_submodule(name).weight
            rel = ((q.dense_weight() - w).norm() / w.norm()).item()
            assert 0.02 < rel < 0.12, (name, rel)  # round-to-nearest INT4, groups of 64: ~9% on Gaussians
            emulated.get_submodule(name).weight.data = q.dense_weight()
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(quant(ids), emulated(ids), atol=1e-4, rtol=1e-4)
    # float32 linears (4 bytes/weight) -> 0.5 byte/weight + one bf16 scale per 64 weights
    lin_dense = sum(m.weight.numel() * 4 for m in dense.modules() if isinstance(m, nn.Linear))
    lin_quant = sum(module_bytes(m) for m in quant.modules() if isinstance(m, W4A16Linear))
    assert lin_quant * 7 < lin_dense


def test_cpu_offload_lends_weights_and_restores_them():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8))
    model[2].weight = model[0].weight  # tied weights must stay one tensor
    model.register_buffer("table", torch.arange(4.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    off = CPUOffload(model, "meta")  # "meta" stands in for a GPU: a device distinct from the CPU copy
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert not off.lent
    with off as m:
        assert m is model and off.lent
        assert {t.device.type for t in model.state_dict().values()} == {"meta"}
        object.__setattr__(model[0], "_native_prepared", ("key", "device copy"))  # a kernel's cache
        with off:  # nested: nothing moves again
            assert model[0].weight.device.type == "meta"
        assert model[2].weight is model[0].weight
        assert off.lent
        assert model(torch.zeros(2, 8, device="meta")).shape == (2, 8)
    assert not off.lent
    after = model.state_dict()
    assert {k: v.data_ptr() for k, v in after.items()} == ptrs  # the CPU copies themselves, nothing copied back
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert "_native_prepared" not in model[0].__dict__
    assert model[2].weight is model[0].weight
    assert isinstance(model[0].weight, nn.Parameter) and not model[0].weight.requires_grad


def test_pipeline_lends_each_component_only_while_it_runs(golden):
    io_prompts = ("a fox", "a cat")
    root = golden("pipeline")
    pipe = Flux.from_pretrained(root, device="cpu")
    ref = pipe(list(io_prompts), height=32, width=48, steps=2, seed=[1, 2], output_type="np")
    # CPU -> CPU lenders do not move anything but count: check the pipeline borrows at the right moments
    pipe._offloaded = {name: CPUOffload(getattr(pipe, name), "cpu") for name in OFFLOADED}
    seen = {}

    def spy(name):
        def hook(module, args, out):
            seen[name] = {n: off.lent for n, off in pipe._offloaded.items()}
        return hook

    pipe.text_encoder.register_forward_hook(spy("text_encoder"))
    pipe.text_encoder_2.register_forward_hook(spy("text_encoder_2"))
    pipe.vae.decoder.register_forward_hook(spy("vae"))
    out = pipe(list(io_prompts), height=32, width=48, steps=2, seed=[1, 2], output_type="np")
    assert seen == {name: {n: n == name for n in OFFLOADED} for name in OFFLOADED}
    assert not any(off.lent for off in pipe._offloaded.values())
    torch.testing.assert_close(torch.from_numpy(out), torch.from_numpy(ref))


def test_memory_options_are_checked(golden):
    root = golden("pipeline")
    with pytest.raises(ValueError, match="offload"):
        Flux.from_pretrained(root, device="cpu", offload="sequential")
    with pytest.raises(ValueError, match="t5_quant"):
        Flux.from_pretrained(root, device="cpu", t5_quant="int8")
    with pytest.raises(ValueError, match="vae_tiling"):
        Flux.from_pretrained(root, device="cpu", vae_tiling="yes")
    pipe = Flux.from_pretrained(root, device="cpu", offload="model")  # nothing to offload to on a CPU
    assert pipe.offload == "none" and not pipe._offloaded


def test_t5_quant_option_file_and_module_agree(golden):
    root = golden("pipeline")
    from_file = Flux.from_pretrained(root, device="cpu", t5_quant="w4a16")
    assert set(_linears(from_file.text_encoder_2).values()) == {W4A16Linear}
    module = load_t5(root / "text_encoder_2")
    from_module = Flux.from_pretrained(root, device="cpu", t5_quant="w4a16", text_encoder_2=module)
    assert set(_linears(module).values()) == {W4A16Linear}  # quantized in place
    a, _ = from_file.encode_prompt(["a red fox"])
    b, _ = from_module.encode_prompt(["a red fox"])
    assert torch.equal(a, b)
    images = from_file("a red fox", height=32, width=32, steps=2, seed=0, output_type="np")
    assert images.shape == (1, 32, 32, 3)


def test_vae_tiling_modes(golden):
    pipe = Flux.from_pretrained(golden("pipeline"), device="cpu")
    pipe.vae_tile, pipe.vae_tile_overlap = 16, 8  # latent cells; tiny VAE factor 2 -> 32-pixel tiles
    kw = dict(height=64, width=96, steps=1, seed=3, output_type="pt")
    images = {}
    for mode in (False, True, "auto"):
        pipe.vae_tiling = mode
        images[mode] = pipe("a", **kw)
    assert torch.equal(images["auto"], images[False])  # 64x96 is far below the auto threshold
    rel = ((images[True] - images[False]).norm() / images[False].norm()).item()
    assert 0 < rel < 0.1, rel  # tiles are approximate (per-tile GroupNorm statistics), but close
    pipe.vae_tiling, pipe.vae_tile_above = "auto", 64 * 64
    assert torch.equal(pipe("a", **kw), images[True])  # above the threshold: tiled


def test_batch_decodes_like_single_images(schnell):
    z = torch.randn(3, 16, 12, 20, generator=torch.Generator().manual_seed(0))
    whole = schnell.decode(z)
    for i in range(3):
        torch.testing.assert_close(whole[i:i + 1], schnell.vae.decode(z[i:i + 1]), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_model_offload_peak_and_placement(golden):
    root = golden("pipeline")
    kw = dict(height=64, width=64, steps=2, seed=[4, 5], output_type="np")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    resident = Flux.from_pretrained(root, device="cuda", dtype=torch.bfloat16)
    ref = resident(["a", "b"], **kw)
    resident_peak = torch.cuda.max_memory_allocated()
    del resident
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    pipe = Flux.from_pretrained(root, device="cuda", dtype=torch.bfloat16, offload="model")
    assert pipe.offload == "model"
    for name in OFFLOADED:  # loaded straight into CPU memory
        assert {p.device.type for p in getattr(pipe, name).parameters()} == {"cpu"}
    assert {p.device.type for p in pipe.transformer.parameters()} == {"cuda"}
    out = pipe(["a", "b"], **kw)
    for name in OFFLOADED:  # lent during the call, back on the CPU after it
        assert {p.device.type for p in getattr(pipe, name).parameters()} == {"cpu"}
    assert abs(out - ref).max() < 1e-2
    assert torch.cuda.max_memory_allocated() < resident_peak
    # 4-bit T5 quantized on the GPU layer by layer, kept in CPU memory
    quant = Flux.from_pretrained(root, device="cuda", dtype=torch.bfloat16, offload="model", t5_quant="w4a16")
    assert {b.device.type for b in quant.text_encoder_2.buffers()} == {"cpu"}
    assert set(_linears(quant.text_encoder_2).values()) == {W4A16Linear}
    assert quant(["a", "b"], **kw).shape == (2, 64, 64, 3)


def test_w4a16_loader_errors_name_the_file(golden, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_t5_w4a16(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="vae.*T5"):
        load_t5_w4a16(golden("pipeline", "vae"))
