"""Batches and sizes on the tiny golden pipeline: a batch equals its images generated one at a time (same seeds),
non-square sizes, and a 2048x2048-equivalent token count.

Seed semantics: seed=[s0, s1, ...] gives image i the noise of a single-prompt call with seed s_i, so a batch
reproduces its images one by one (up to the rounding of batched matmuls). One int seed s for a batch draws all
the noise from one generator seeded with s (diffusers' way): image 0 equals a single call with seed s, the
others are not reproducible alone."""
import pytest
import torch

from nunchaku_lite import Flux

from conftest import shared_path

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture
def pipe(golden_pipe):
    return golden_pipe


@pytest.fixture(scope="module")
def dev():
    root = shared_path("golden", "pipeline")
    return Flux.from_pretrained(root, device="cpu", transformer=root / "transformer_dev",
                                scheduler=root / "scheduler_dev")


@pytest.mark.parametrize("batch", [2, 4])
def test_batch_equals_images_alone(pipe, batch):
    prompts = ["a red fox", "a blue car", "a green field at dawn", "text"][:batch]
    seeds = [11, 3, 7, 11][:batch]
    kw = dict(height=32, width=48, steps=2, output_type="np")
    together = pipe(prompts, seed=seeds, **kw)
    assert together.shape == (batch, 32, 48, 3)
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        torch.testing.assert_close(torch.from_numpy(together[i:i + 1]), torch.from_numpy(pipe(p, seed=s, **kw)), **TOL)
    # a batch is not one image repeated: different prompts/seeds give different images
    assert abs(together[0] - together[1]).max() > 1e-2


def test_dev_batch_with_guidance_and_shift(dev):
    kw = dict(height=48, width=32, steps=3, output_type="latent", guidance=4.0)
    together = dev(["a", "b"], seed=[5, 6], **kw)
    for i, s in enumerate([5, 6]):
        torch.testing.assert_close(together[i:i + 1], dev(["a", "b"][i], seed=s, **kw), **TOL)


def test_non_square_sizes(pipe):
    tall = pipe(["a", "b"], height=80, width=48, steps=1, seed=[1, 2], output_type="np")
    wide = pipe(["a", "b"], height=48, width=80, steps=1, seed=[1, 2], output_type="np")
    assert tall.shape == (2, 80, 48, 3) and wide.shape == (2, 48, 80, 3)
    # transposed sizes are different images (RoPE rows/cols are not interchangeable), not a reshape of one
    assert abs(tall.transpose(0, 2, 1, 3) - wide).max() > 1e-2
    torch.testing.assert_close(torch.from_numpy(wide[1:]),
                               torch.from_numpy(pipe("b", height=48, width=80, steps=1, seed=2, output_type="np")), **TOL)


def test_2048_equivalent_sequence(pipe):
    """FLUX at 2048x2048 has a 256x256 latent = 16384 image tokens; the tiny VAE (factor 2) reaches the same
    latent at 512x512 pixels. Latents only: the tiny VAE's full-latent mid-block attention is slow on a CPU."""
    lat = pipe("a", height=512, width=512, steps=1, seed=0, output_type="latent")
    assert lat.shape == (1, 128 * 128, 64) and torch.isfinite(lat).all()
    # non-square at the same scale (2048x1024 equivalent), batch 2
    lat2 = pipe(["a", "b"], height=512, width=256, steps=1, seed=[0, 1], output_type="latent")
    assert lat2.shape == (2, 128 * 64, 64) and torch.isfinite(lat2).all()
    assert (lat2[0] - lat2[1]).abs().max() > 0.1


def test_compiled_transformer_matches_eager(golden, pipe):
    """compile=True (torch.compile of every DiT block): same latents as eager, batch 2 (compiles once, ~20 s)."""
    compiled = Flux.from_pretrained(golden("pipeline"), device="cpu", compile=True)
    kw = dict(height=32, width=32, steps=1, seed=[1, 2], output_type="latent")
    torch.testing.assert_close(compiled(["a", "b"], **kw), pipe(["a", "b"], **kw), **TOL)


def test_sizes_that_no_tile_divides(pipe):
    """FLUX takes any multiple of 16 pixels, not only multiples of 64: 1000x600 -> 992x592 = 62x37 patches, token
    counts that no GEMM tile divides. The tiny VAE (factor 2) has the same rule at 4 pixels: 36x44 = 9x11 = 99
    patches. A batch there equals its images alone, and a size that needs rounding warns and gives the image of
    the rounded size."""
    m = 2 * pipe.vae_scale_factor
    h, w = 9 * m, 11 * m
    kw = dict(steps=1, output_type="np")
    together = pipe(["a", "b", "c"], height=h, width=w, seed=[1, 2, 3], **kw)
    assert together.shape == (3, h, w, 3)
    torch.testing.assert_close(torch.from_numpy(together[2:]),
                               torch.from_numpy(pipe("c", height=h, width=w, seed=3, **kw)), **TOL)
    with pytest.warns(UserWarning, match=f"rounded down to {w}x{h}"):
        rounded = pipe("a", height=h + m - 1, width=w + 1, seed=1, **kw)
    torch.testing.assert_close(torch.from_numpy(rounded), torch.from_numpy(together[:1]), **TOL)


def test_batch_errors_are_clear(pipe):
    with pytest.raises(ValueError, match=r"seed: a list of seeds needs one int per prompt \(3\)"):
        pipe(["a", "b", "c"], height=32, width=32, steps=1, seed=[1, 2])
    with pytest.raises(ValueError, match="batch size 2 does not match the 3 prompt"):
        pipe(["a", "b", "c"], steps=1, latents=torch.zeros(2, 16, 16, 24))
    with pytest.raises(ValueError, match="need height= and width="):  # packed latents of a non-square image
        pipe(["a", "b"], steps=1, latents=torch.zeros(2, 6, 64))
    with pytest.raises(ValueError, match=r"spatial size .* does not match 32x48"):
        pipe("a", height=32, width=48, steps=1, latents=torch.zeros(1, 16, 16, 16))


@pytest.fixture(scope="module")
def w4a4():
    """The embedded mini W4A4 pipeline (SVDQuant DiT; reference ops on a CPU). No ../shared needed."""
    return Flux.from_pretrained("mini-w4a4", device="cpu")


@pytest.mark.parametrize("size", [(80, 48), (2048, 256)])
def test_w4a4_batch_equals_images_alone(w4a4, size):
    """Activation quantization is per token: a batch of the W4A4 model is its images alone, at non-square
    sizes up to 2048 wide (2048x256 = 128x16 patches; the 16-bit tests above reach 2048x2048-equivalent)."""
    h, w = size
    kw = dict(height=h, width=w, steps=1, output_type="latent")
    together = w4a4(["a", "b", "c"], seed=[1, 2, 3], **kw)
    assert together.shape == (3, (h // 16) * (w // 16), 64) and torch.isfinite(together).all()
    torch.testing.assert_close(together[1:2], w4a4("b", seed=2, **kw), atol=1e-2, rtol=1e-2)
    assert (together[0] - together[1]).abs().max() > 0.1
