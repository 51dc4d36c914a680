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


# ---------------------------------------------------------------------------------------------------------
# One weight copy: native.prepare_model_ replaces the canonical buffers by the kernels' layout.
# On a CPU the kernels cannot run, so these tests give native a stand-in conversion (same dataclasses, plain
# torch ops, every tensor a new allocation like the real one) and check the storage management around it.

import copy  # noqa: E402

from nunchaku_lite import native  # noqa: E402
from nunchaku_lite.quant.modules import SplitInputLinear, W4A4Linear  # noqa: E402


def _fake_prepare_w4a4(qweight, wscales, lora_down=None, lora_up=None, bias=None, smooth=None, act_unsigned=False,
                       act_shift=0.0, dtype=torch.bfloat16, act_pow2=False):
    rank = 0 if lora_down is None else lora_down.shape[0]
    return native.PreparedW4A4(
        w_tiled=qweight.flip(0).contiguous(), w_scales=wscales.float().t().contiguous(),
        bias=None if bias is None else bias.float(), smooth=None if smooth is None else smooth.float(),
        lora_down=lora_down.to(dtype) if rank else None, lora_up=lora_up.to(dtype) if rank else None,
        n=qweight.shape[0], k=qweight.shape[1] * 2, rank=rank, act_unsigned=act_unsigned, act_shift=act_shift,
        fast_ok=True, act_pow2=act_pow2)


def _fake_prepare_w4a16(qweight, wscales, bias=None, wzeros=None):
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    return native.PreparedW4A16(qweight, f32(wscales), f32(wzeros), f32(bias), qweight.shape[0], qweight.shape[1] * 2)


@pytest.fixture
def fake_native(monkeypatch):
    """native as if a GPU and the library were there: CPU tensors count as convertible."""
    calls = []
    monkeypatch.setattr(native, "available", lambda device=None: True)
    monkeypatch.setattr(native, "_convertible", lambda t: True)
    monkeypatch.setattr(native, "prepare_w4a16", _fake_prepare_w4a16)

    def prepare(*args, **kwargs):
        prep = _fake_prepare_w4a4(*args, **kwargs)
        calls.append(prep)
        return prep
    monkeypatch.setattr(native, "prepare_w4a4", prepare)
    return calls


def _quantized_model():
    """W4A4 (rank 16, bias; unsigned shifted), W4A16, a split-input composite, a 16-bit linear; random buffers."""
    gen = torch.Generator().manual_seed(0)
    a = W4A4Linear(128, 256, 16, dtype=torch.bfloat16)
    b = W4A16Linear(256, 128, dtype=torch.bfloat16)
    c = SplitInputLinear([W4A4Linear(64, 64, 16, dtype=torch.bfloat16),
                          W4A4Linear(64, 64, 16, act_unsigned=True, act_shift=0.17, bias=False, dtype=torch.bfloat16)])
    model = nn.Sequential(a, b, c, nn.Linear(64, 32, dtype=torch.bfloat16))
    with torch.no_grad():
        for m in (a, b, *c.parts):
            m.qweight.copy_(torch.randint(0, 256, m.qweight.shape, generator=gen, dtype=torch.uint8))
            m.wscales.copy_(torch.rand(m.wscales.shape, generator=gen) * 0.02 + 0.01)
            if isinstance(m, W4A4Linear):
                m.smooth.copy_(torch.rand(m.smooth.shape, generator=gen) + 0.5)
                m.lora_down.normal_(0, 0.05, generator=gen)
                m.lora_up.normal_(0, 0.05, generator=gen)
            if m.bias is not None:
                m.bias.normal_(generator=gen)
    return model.eval()


def _tensor_bytes(*objs):
    return sum(t.numel() * t.element_size() for o in objs for t in vars(o).values() if isinstance(t, torch.Tensor))


def test_prepare_model_keeps_only_the_kernel_layout(fake_native):
    model = _quantized_model()
    w4a16_storage = model[1].qweight.data_ptr()
    dense_bytes = module_bytes(model[3])
    layers = [m for m in model.modules() if isinstance(m, (W4A4Linear, W4A16Linear))]

    seen_at_call = []
    real = native.prepare_w4a4

    def spy(*args, **kwargs):  # converted one at a time: the earlier layers hold no canonical copy any more
        seen_at_call.append([("qweight" in dict(m.named_buffers())) for m in layers])
        return real(*args, **kwargs)
    native.prepare_w4a4 = spy
    assert native.prepare_model_(model) == 4
    assert seen_at_call == [[True, True, True, True], [False, False, True, True], [False, False, False, True]]
    assert native.prepare_model_(model) == 0  # idempotent

    for m in layers:
        assert m.native_converted and native.is_converted(m)
        names = {n for n, _ in m.named_buffers()}
        assert names and all(n.startswith("native_") for n in names), names
    # the W4A16 weight keeps its storage (the kernel reads the canonical order): only the float32 scales are new
    assert model[1].native_qweight.data_ptr() == w4a16_storage
    w4a4_bytes = _tensor_bytes(*fake_native)
    w4a16 = native._from_buffers(model[1])
    assert module_bytes(model) == w4a4_bytes + _tensor_bytes(w4a16) + dense_bytes
    # the kernels get the buffers themselves, not copies
    prep = native.prepared_for(model[0], torch.bfloat16)
    assert prep.w_tiled is model[0].native_w_tiled and prep.lora_up is model[0].native_lora_up
    assert (prep.n, prep.k, prep.rank, prep.fast_ok) == (256, 128, 16, True)
    part = native.prepared_for(model[2].parts[1], torch.bfloat16)
    assert part.act_unsigned and part.act_shift == pytest.approx(0.17) and part.bias is None


def test_converted_layers_refuse_the_canonical_uses(fake_native):
    model = _quantized_model()
    keep = copy.deepcopy(model)
    native.prepare_model_(model)
    with pytest.raises(RuntimeError, match=r"state_dict\(\) \('0\.\*'\).*converted to the native kernels' layout"):
        model.state_dict()
    with pytest.raises(RuntimeError, match="load_state_dict"):
        model.load_state_dict(keep.state_dict())
    with pytest.raises(RuntimeError, match=r"dense_weight\(\)"):
        model[1].dense_weight()
    with pytest.raises(RuntimeError, match="dequantized_weight"):
        model[0].dense_weight()
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="forward on cpu"):
        model[0](x)
    from nunchaku_lite.quant.modules import set_act_quant
    with pytest.raises(RuntimeError, match="set_act_quant"):
        set_act_quant(model, False)
    # the unconverted copy still runs the reference ops and saves the canonical format
    y = keep(x)
    assert y.shape == (3, 32) and torch.isfinite(y).all()
    assert "0.qweight" in keep.state_dict()


def test_converted_layers_move_but_keep_their_dtypes(fake_native):
    model = _quantized_model()
    native.prepare_model_(model, torch.bfloat16)
    model.half()  # a cast must not re-round the converted scales/bias, nor drop the layout
    lin = model[0]
    assert lin.native_w_scales.dtype == torch.float32 and lin.native_bias.dtype == torch.float32
    assert lin.native_lora_down.dtype == torch.bfloat16 and model[3].weight.dtype == torch.float16
    prep = native.prepared_for(lin, torch.float16)  # other activation dtype: low-rank factors cast on the fly
    assert prep.lora_down.dtype == torch.float16 and lin.native_lora_down.dtype == torch.bfloat16
    torch.testing.assert_close(prep.lora_up.float(), lin.native_lora_up.float(), atol=1e-3, rtol=1e-2)
    # CPUOffload lends converted layers like any other ("meta" stands in for the GPU)
    off = CPUOffload(model, "meta")
    with off:
        assert lin.native_w_tiled.is_meta and native.prepared_for(lin, torch.bfloat16).w_tiled.is_meta
    assert lin.native_converted and lin.native_w_tiled.device.type == "cpu"


def test_prepare_model_leaves_layers_the_kernels_do_not_take(fake_native, monkeypatch):
    fake = W4A4Linear(64, 64, 16)
    fake.act_quant = False
    odd_rank = W4A4Linear(64, 64, 8)
    ok = W4A4Linear(64, 64, 32, dtype=torch.float32)
    model = nn.Sequential(fake, odd_rank, ok)
    assert native.prepare_model_(model) == 1
    assert not fake.native_converted and not odd_rank.native_converted and ok.native_converted
    assert ok.native_lora_down.dtype == torch.bfloat16  # float32 factors: converted for bf16 activations
    monkeypatch.setattr(native, "_convertible", lambda t: t.is_cuda)  # the real rule: CPU layers stay canonical
    cpu = _quantized_model()
    assert native.prepare_model_(cpu) == 0 and not cpu[0].native_converted


def test_module_bytes_counts_the_kernels_cached_copy():
    lin = W4A4Linear(128, 256, 16)
    before = module_bytes(lin)
    prep = _fake_prepare_w4a4(lin.qweight, lin.wscales, lin.lora_down, lin.lora_up, lin.bias, lin.smooth)
    object.__setattr__(lin, "_native_prepared", (None, prep))  # what prepared_for caches on an unconverted layer
    # smooth (float32) and the bf16 low-rank factors are the same tensors: only the new ones count
    new = [prep.w_tiled, prep.w_scales, prep.bias, prep.inv_smooth]
    assert module_bytes(lin) == before + sum(t.numel() * t.element_size() for t in new)


def _native_or_skip():
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.library_error() or 'no usable CUDA device'}")


@pytest.mark.gpu
def test_cuda_to_native_frees_the_canonical_copy_and_keeps_the_output():
    _native_or_skip()
    model = _quantized_model().cuda()
    canonical = module_bytes(model)
    x = torch.randn(77, 128, device="cuda", dtype=torch.bfloat16)
    ref = model(x)  # canonical buffers + the kernels' cached copy
    assert module_bytes(model) > canonical
    model_cached = module_bytes(model)
    assert native.prepare_model_(model) == 4
    torch.testing.assert_close(model(x), ref, atol=0, rtol=0)  # same kernels, same prepared tensors
    converted = module_bytes(model)
    assert converted < model_cached
    with pytest.raises(RuntimeError, match="state_dict"):
        model.state_dict()
    del ref, x, model
    # a FLUX-sized layer: after conversion the device holds what module_bytes counts, no hidden second copy
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    big = nn.Sequential(W4A4Linear(3072, 3072, 32, device="cuda"), W4A16Linear(3072, 9216, device="cuda"))
    canonical = module_bytes(big)
    y = big(torch.randn(3, 3072, device="cuda", dtype=torch.bfloat16))  # the kernels cache a converted copy
    del y
    assert torch.cuda.memory_allocated() - base > canonical + 4_000_000  # ... of the 4.7 MB weight
    native.prepare_model_(big)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    assert abs(held - module_bytes(big)) < 64 * 1024, (held, module_bytes(big))
    assert module_bytes(big) < canonical * 1.1  # float32 scales instead of bf16: +1/32 byte per weight


@pytest.mark.gpu
def test_cuda_pipeline_converts_once_batches_and_sizes():
    """The embedded mini W4A4 model on CUDA: from_pretrained converts the DiT, the output equals the unconverted
    pipeline's, a batch equals its images alone, and a non-square size that is not a multiple of 64 runs."""
    _native_or_skip()
    kw = dict(height=80, width=48, steps=2, output_type="latent")
    ref_pipe = Flux.from_pretrained("mini-w4a4", device="cuda", dtype=torch.bfloat16, native_layout=False)
    ref = ref_pipe(["a fox", "a cat"], seed=[1, 2], **kw)
    cached = module_bytes(ref_pipe.transformer)
    del ref_pipe
    pipe = Flux.from_pretrained("mini-w4a4", device="cuda", dtype=torch.bfloat16)
    layers = [m for m in pipe.transformer.modules() if isinstance(m, (W4A4Linear, W4A16Linear))]
    assert layers and all(m.native_converted for m in layers)
    assert module_bytes(pipe.transformer) < cached
    out = pipe(["a fox", "a cat"], seed=[1, 2], **kw)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    alone = pipe("a cat", seed=2, **kw)
    torch.testing.assert_close(out[1:], alone, atol=2e-2, rtol=2e-2)
    img = pipe(["a", "b", "c"], height=112, width=208, steps=1, seed=[1, 2, 3], output_type="np")
    assert img.shape == (3, 112, 208, 3) and (img >= 0).all() and (img <= 1).all()


def test_moving_a_layer_drops_the_kernels_cached_copy():
    """The cache holds the old device's tensors: after .to() (CPUOffload's first move included) it must not pin them."""
    lin = W4A16Linear(128, 64)
    object.__setattr__(lin, "_native_prepared", (None, _fake_prepare_w4a16(lin.qweight, lin.wscales, lin.bias)))
    CPUOffload(nn.Sequential(lin), "meta")
    assert "_native_prepared" not in lin.__dict__


def test_cached_copy_of_weights_lent_inside_inference_mode():
    """CPUOffload lends copies made inside the pipeline's inference_mode: the kernels' cache key must take them."""
    lin = W4A16Linear(128, 64)
    with torch.inference_mode():
        lent = lin.qweight.clone()
    lin._buffers["qweight"] = lent
    key = native._cache_key(lin, None, ("qweight", "wscales", "wzeros", "bias"))
    assert key[1][0] == lent.data_ptr() and key[1][1] is None and key[2][1] == lin.wscales._version
