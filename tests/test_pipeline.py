"""The whole tiny pipeline against golden/pipeline (diffusers layout, dev via components, the pipeline_dev
repository folder, BFL single files), plus the call API: seeds, sizes, output types, defaults, timings."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nunchaku_lite import Flux
from nunchaku_lite.pipeline import SamplingDefaults, schedule

ATOL = 1e-4
_PIPES = {}


def _cached(key, make):
    if key not in _PIPES:
        _PIPES[key] = make()
    return _PIPES[key]


@pytest.fixture
def io(golden):
    return load_file(str(golden("pipeline", "expected", "io.safetensors")))


@pytest.fixture
def prompts(golden):
    return json.loads(golden("pipeline", "expected", "prompts.json").read_text())["prompts"]


@pytest.fixture
def schnell(golden):
    root = golden("pipeline")
    return _cached(("schnell", root), lambda: Flux.from_pretrained(root, device="cpu"))


@pytest.fixture
def dev(golden):
    root = golden("pipeline")
    return _cached(("dev", root), lambda: Flux.from_pretrained(
        root, device="cpu", transformer=root / "transformer_dev", scheduler=root / "scheduler_dev"))


def _bfl_parts(golden):
    g = lambda *p: golden("pipeline", *p)  # noqa: E731
    return dict(vae=g("ae_tiny.safetensors"), text_encoder=g("text_encoder"), text_encoder_2=g("text_encoder_2"),
                tokenizer=g("tokenizer"), tokenizer_2=g("tokenizer_2"))


def _close(a, b, atol=ATOL):
    a = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=1e-4)


# -- golden comparisons -----------------------------------------------------------------------------------------

def test_schnell_diffusers_layout(schnell, io, prompts):
    assert schnell.kind == "schnell" and schnell.defaults.steps == 4 and schnell.defaults.max_sequence_length == 256
    assert not schnell.defaults.shift
    lat = schnell(prompts, latents=io["latents_in_unpacked"], output_type="latent")
    assert lat.shape == io["schnell.final_latents"].shape
    _close(lat, io["schnell.final_latents"])
    images = schnell(prompts, latents=io["latents_in_unpacked"], output_type="np")
    assert images.dtype == np.float32 and images.shape == (3, 32, 32, 3)
    _close(images, io["schnell.images"])


def test_schnell_packed_latents_and_text_embeddings(schnell, io, prompts):
    images = schnell(prompts, latents=io["latents_in"], output_type="np")  # packed [B, L, 64]
    _close(images, io["schnell.images"])
    txt, vec = schnell.encode_prompt(prompts)
    _close(txt, io["schnell.prompt_embeds"], atol=2e-4)
    _close(vec, io["schnell.pooled_prompt_embeds"])


def test_dev_via_components(dev, io, prompts):
    assert dev.kind == "dev" and dev.defaults.shift and dev.defaults.max_sequence_length == 512
    assert dev.defaults.guidance == 3.5 and dev.defaults.steps == 50
    lat = dev(prompts, steps=6, latents=io["latents_in_unpacked"], output_type="latent")
    _close(lat, io["dev.final_latents"])
    images = dev(prompts, steps=6, latents=io["latents_in_unpacked"], output_type="np")
    _close(images, io["dev.images"])


def test_dev_repository_folder(golden, io, prompts):
    """pipeline_dev: a FLUX.1-dev-like download (dynamic-shift scheduler, `text_model.`-prefixed CLIP)."""
    pipe = Flux.from_pretrained(golden("pipeline_dev"), device="cpu")
    assert pipe.kind == "dev" and pipe.defaults.shift
    images = pipe(prompts, steps=6, guidance=3.5, latents=io["latents_in_unpacked"], output_type="np")
    _close(images, io["dev.images"])


def test_schedules_match_the_reference_sigmas(dev, schnell, io):
    L = io["latents_in"].shape[1]
    assert schedule(6, L, dev.defaults) == pytest.approx(io["dev.bfl_timesteps"].tolist(), abs=1e-6)
    assert schedule(6, L, dev.defaults) == pytest.approx(io["dev.sigmas"].tolist(), abs=1e-6)
    assert schedule(4, L, schnell.defaults) == pytest.approx(io["schnell.sigmas"].tolist(), abs=1e-6)


@pytest.mark.parametrize("kind", ["schnell", "dev"])
def test_bfl_single_files(golden, io, prompts, kind):
    name = "flux_tiny" if kind == "schnell" else "flux_tiny_dev"
    params = json.loads(golden("pipeline", "bfl_params.json").read_text())
    # schnell: the RoPE axes come from the sibling bfl_params.json; dev: given explicitly
    configs = {"transformer": params[name]} if kind == "dev" else None
    pipe = Flux.from_pretrained(golden("pipeline", f"{name}.safetensors"), device="cpu", configs=configs,
                                **_bfl_parts(golden))
    assert pipe.kind == kind
    steps = 4 if kind == "schnell" else 6
    assert pipe.vae_scale_factor == 2  # tiny VAE: ch_mult (1, 1)
    lat = pipe(prompts, steps=steps, latents=io["latents_in_unpacked"], output_type="latent")
    _close(lat, io[f"{kind}.bfl_final_latents"])
    images = pipe(prompts, steps=steps, latents=io["latents_in_unpacked"], output_type="np")
    _close(images, io[f"{kind}.bfl_images"])


def test_bfloat16_pipeline_close_to_float32(golden, io, prompts):
    pipe = Flux.from_pretrained(golden("pipeline"), device="cpu", dtype="bf16")
    assert pipe.dtype == torch.bfloat16
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    images = torch.from_numpy(pipe(prompts, latents=io["latents_in_unpacked"], output_type="np"))
    err = (images - io["schnell.images"]).abs()
    # bf16 everywhere (T5, CLIP, DiT, VAE): small on average, a few pixels near clamping edges move more
    assert err.mean() < 1e-2 and err.max() < 0.15, (err.mean(), err.max())


# -- call API ---------------------------------------------------------------------------------------------------

def test_output_types(schnell):
    kw = dict(height=32, width=48, seed=1, steps=2)
    pil = schnell(["a", "b"], **kw)
    assert len(pil) == 2 and pil[0].size == (48, 32) and pil[0].mode == "RGB"
    arr = schnell(["a", "b"], output_type="np", **kw)
    assert arr.shape == (2, 32, 48, 3) and arr.min() >= 0 and arr.max() <= 1
    assert np.array_equal(np.asarray(pil[1]), np.round(arr[1] * 255).astype(np.uint8))
    pt = schnell(["a", "b"], output_type="pt", **kw)
    assert pt.shape == (2, 3, 32, 48)
    lat = schnell(["a", "b"], output_type="latent", **kw)
    assert lat.shape == (2, (16 // 2) * (24 // 2), 64)  # tiny VAE factor 2: latent 16x24, 2x2 patches


def test_seeds(schnell):
    kw = dict(height=32, width=32, steps=1, output_type="latent")
    a = schnell("a cat", seed=7, **kw)
    assert torch.equal(a, schnell("a cat", seed=7, **kw))
    assert not torch.equal(a, schnell("a cat", seed=8, **kw))
    batch = schnell(["a cat", "a cat"], seed=7, **kw)  # one generator, consecutive noise: first image equals
    # (batched matmuls may round differently from single ones, hence a tolerance)
    torch.testing.assert_close(batch[:1], a, atol=1e-4, rtol=1e-4)
    assert (batch[0] - batch[1]).abs().max() > 0.1
    per_prompt = schnell(["a cat", "a cat"], seed=[8, 7], **kw)
    torch.testing.assert_close(per_prompt[1:], a, atol=1e-4, rtol=1e-4)
    schnell("a cat", seed=None, **kw)
    used = schnell.last_seeds
    assert len(used) == 1 and isinstance(used[0], int)


def test_seed_noise_is_the_reference_cpu_draw(schnell):
    """seed s gives the noise torch.randn([B, 16, h, w], generator=manual_seed(s)) on the CPU, as diffusers'
    prepare_latents and BFL's get_noise draw it."""
    kw = dict(height=32, width=48, steps=2, output_type="latent")
    noise = torch.randn(2, 16, 16, 24, generator=torch.Generator("cpu").manual_seed(11))
    torch.testing.assert_close(schnell(["a", "b"], seed=11, **kw), schnell(["a", "b"], latents=noise, **kw))


def test_random_seed_is_reported_and_reproducible(schnell):
    kw = dict(height=32, width=32, steps=1, output_type="latent")
    first = schnell("a dog", **kw)
    again = schnell("a dog", seed=schnell.last_seeds[0], **kw)
    assert torch.equal(first, again)


def test_size_rounding_warns(schnell):
    with pytest.warns(UserWarning, match="rounded"):
        arr = schnell("a", height=37, width=33, steps=1, seed=0, output_type="np")
    multiple = 2 * schnell.vae_scale_factor
    assert arr.shape[1:3] == (37 - 37 % multiple, 33 - 33 % multiple)


def test_timings_and_progress(schnell):
    calls = []
    schnell("a", height=32, width=32, steps=3, seed=0, progress=lambda step, total: calls.append((step, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    t = schnell.last_timings
    assert set(t) >= {"text_encoding", "denoising", "decoding", "total"}
    assert all(v >= 0 for v in t.values()) and t["total"] >= t["denoising"]


def test_defaults_per_kind():
    dev, schnell = SamplingDefaults.for_kind("dev"), SamplingDefaults.for_kind("schnell")
    assert (schnell.steps, schnell.max_sequence_length, schnell.shift) == (4, 256, False)
    assert (dev.steps, dev.max_sequence_length, dev.shift, dev.guidance) == (50, 512, True, 3.5)
    # the dev shift moves every interior time towards noise, more so for longer sequences
    plain, short, long = schedule(4, 1, schnell), schedule(4, 256, dev), schedule(4, 4096, dev)
    assert all(p < s < l for p, s, l in zip(plain[1:-1], short[1:-1], long[1:-1]))
    with pytest.raises(ValueError, match="kind"):
        SamplingDefaults.for_kind("pro")


def _linked_copy(src, dst, model_index):
    dst.mkdir()
    for child in src.iterdir():
        if child.name != "model_index.json":
            os.symlink(child, dst / child.name)
    (dst / "model_index.json").write_text(json.dumps(model_index))


def test_model_index_overrides(golden, tmp_path):
    index = json.loads(golden("pipeline", "model_index.json").read_text())
    index["_nunchaku_lite"] = {"kind": "schnell", "default_steps": 2, "max_sequence_length": 64,
                               "default_size": 48, "shift": True}
    _linked_copy(golden("pipeline"), tmp_path / "model", index)
    pipe = Flux.from_pretrained(tmp_path / "model", device="cpu")
    d = pipe.defaults
    assert (d.steps, d.max_sequence_length, d.default_size, d.shift) == (2, 64, 48, True)
    calls = []
    arr = pipe("a", seed=0, output_type="np", progress=lambda s, n: calls.append(n))
    assert arr.shape[1:3] == (48, 48) and calls[-1] == 2
    txt, _ = pipe.encode_prompt(["a"])
    assert txt.shape[1] == 64


def test_components_given_as_modules(schnell, io, prompts):
    pipe = Flux.from_pretrained(None, device="cpu", transformer=schnell.transformer, vae=schnell.vae,
                                text_encoder=schnell.text_encoder, text_encoder_2=schnell.text_encoder_2,
                                tokenizer=schnell.tokenizer, tokenizer_2=schnell.tokenizer_2)
    lat = pipe(prompts, latents=io["latents_in_unpacked"], output_type="latent")
    _close(lat, io["schnell.final_latents"])


def test_embedded_models_resolve_in_assets(golden, monkeypatch, tmp_path):
    import nunchaku_lite.pipeline as pipeline
    assets = tmp_path / "assets"
    monkeypatch.setattr(pipeline, "ASSETS", assets)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="embedded model 'mini'"):
        Flux.from_pretrained("mini")
    assets.mkdir()
    os.symlink(golden("pipeline"), assets / "mini")
    assert Flux.from_pretrained("mini", device="cpu").kind == "schnell"
    with pytest.raises(FileNotFoundError, match="mini-w4a4"):
        Flux.from_pretrained("mini-w4a4")
    # a transformer-only "mini-w4a4" (normally the quantized file) runs with mini's other components
    (assets / "mini-w4a4").mkdir()
    os.symlink(golden("pipeline", "transformer_dev"), assets / "mini-w4a4" / "transformer")
    pipe = Flux.from_pretrained("mini-w4a4", device="cpu")
    assert pipe.kind == "dev" and pipe.text_encoder is not None


@pytest.mark.gpu
def test_cuda_bfloat16_pipeline(golden, io, prompts):
    pipe = Flux.from_pretrained(golden("pipeline"), device="cuda", dtype=torch.bfloat16)
    assert pipe.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in pipe.transformer.parameters())
    images = torch.from_numpy(pipe(prompts, latents=io["latents_in_unpacked"], output_type="np"))
    err = (images - io["schnell.images"]).abs()
    assert err.mean() < 1e-2 and err.max() < 0.15, (err.mean(), err.max())
    # the same seed gives the same noise on any device (CPU generator)
    cpu = Flux.from_pretrained(golden("pipeline"), device="cpu", dtype=torch.bfloat16)
    a = pipe("a", seed=5, height=32, width=32, steps=1, output_type="latent").float().cpu()
    b = cpu("a", seed=5, height=32, width=32, steps=1, output_type="latent").float()
    assert (a - b).abs().mean() < 2e-2
