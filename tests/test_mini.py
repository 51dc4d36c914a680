"""The embedded mini model: synthetic data, attribute checker, tokenizers, export layout, benchmark metrics,
the shipped weights, and a CPU smoke run of the training script."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nunchaku_lite.mini import data as D
from nunchaku_lite.mini.checker import analyze, connected_components, score, self_accuracy
from nunchaku_lite.mini.eval import heldout_prompts, image_metrics, psnr, score_images, ssim, summarize

ASSETS = Path(__file__).resolve().parent.parent / "nunchaku_lite" / "assets"


# ------------------------------------------------------------------------------------------------ data
def test_samples_are_deterministic_and_distinct():
    a, b, c = D.make_sample(3, 17), D.make_sample(3, 17), D.make_sample(3, 18)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (D.IMAGE_SIZE, D.IMAGE_SIZE, 3) and a.image.dtype == np.uint8


def test_captions_describe_their_images():
    for i in range(150):
        s = D.make_sample(11, i)
        spec = D.parse_caption(s.caption)
        assert spec["background"] in (None, s.background)
        assert len(spec["shapes"]) == len(s.shapes)
        for want, got in zip(spec["shapes"], s.shapes):
            for k in ("shape", "color", "size", "position"):
                assert want[k] in (None, getattr(got, k)), (s.caption, k)
        assert s.background not in {sh.color for sh in s.shapes}


def test_simplest_caption_form_is_generated():
    caps = {D.make_sample(5, i).caption for i in range(300)}
    pattern = [c for c in caps if D.parse_caption(c)["shapes"][0]["position"] is None and " and " not in c
               and "small" not in c and "large" not in c and "background" in c]
    assert pattern, "no 'a {color} {shape} on a {color} background' caption in 300 samples"
    assert any(c.startswith("an orange") for c in {D.make_sample(6, i).caption for i in range(300)})


def test_held_out_triples_never_drawn_for_training():
    assert len(D.HELD_OUT) >= 20
    for i in range(400):
        s = D.make_sample(0, i)
        for sh in s.shapes:
            assert (sh.color, sh.shape, s.background) not in D.HELD_OUT


def test_parse_caption_rejects_unknown_words():
    with pytest.raises(ValueError, match="unknown shape"):
        D.parse_caption("a red hexagon on a blue background")
    with pytest.raises(ValueError, match="cannot read"):
        D.parse_caption("two dogs playing")


# ---------------------------------------------------------------------------------------------- checker
def test_checker_accuracy_on_clean_held_out_images():
    acc = self_accuracy(n=150, seed=424242)
    for key in ("one.color", "one.shape", "one.background", "one.position", "one.size"):
        assert acc[key] >= 0.95, (key, acc[key])
    assert acc["two.color_shape"] >= 0.9, acc


def test_checker_survives_blur_and_noise():
    gen = torch.Generator().manual_seed(0)
    hits = []
    for i in range(60):
        s = D.make_sample(99, i, exclude=frozenset())
        t = torch.from_numpy(s.image).permute(2, 0, 1)[None].float()
        t = F.interpolate(F.avg_pool2d(t, 2), scale_factor=2, mode="bilinear") + 12 * torch.randn(t.shape, generator=gen)
        img = t[0].permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).numpy()
        hits.append(score(img, s.attrs)["color_shape"])
    assert np.mean(hits) >= 0.95


def test_checker_says_no_to_the_wrong_prompt():
    spec = D.parse_caption("a large red circle at the center on a blue background")
    img = D.sample_from_spec(spec, seed=1).image
    assert all(score(img, "a large red circle at the center on a blue background").values())
    wrong = score(img, "a small green square at the top left on a yellow background")
    assert not any(wrong[k] for k in ("shape", "color", "size", "position", "background"))
    assert score(img, "a red star on a blue background")["shape"] is False


def test_checker_does_not_take_an_oval_for_a_circle():
    y, x = np.mgrid[0:128, 0:128] + 0.5
    img = np.zeros((128, 128, 3), np.uint8) + np.array(D.COLORS["blue"], np.uint8)
    img[((x - 64) / 30) ** 2 + ((y - 64) / 16) ** 2 <= 1] = D.COLORS["red"]
    r = score(img, "a red circle on a blue background")
    assert r["color"] and r["background"] and not r["shape"]
    img[:] = D.COLORS["blue"]
    img[((x - 64) / 20) ** 2 + ((y - 64) / 20) ** 2 <= 1] = D.COLORS["red"]
    assert score(img, "a red circle on a blue background")["shape"]


def test_checker_finds_no_object_on_a_blank_image():
    blank = np.zeros((128, 128, 3), np.uint8) + np.array(D.COLORS["blue"], np.uint8)
    assert analyze(blank) == {"background": "blue", "objects": []}
    r = score(blank, "a red circle on a blue background")
    assert r["background"] and not r["shape"] and not r["color"] and not r["count"]


def test_connected_components_separates_blobs():
    m = np.zeros((10, 10), bool)
    m[1:3, 1:3] = True
    m[6:9, 5:9] = True
    m[6, 1] = True
    labels = connected_components(m)
    assert labels.max() == 3 and (labels[m] > 0).all() and (labels[~m] == 0).all()


# --------------------------------------------------------------------------------------------- tokenizers
@pytest.fixture(scope="module")
def trained_tokenizers(tmp_path_factory):
    from nunchaku_lite.mini.tokenizer import train_tokenizers

    out = tmp_path_factory.mktemp("tok")
    sizes = train_tokenizers(out, t5_max_length=32)
    return out, sizes


@pytest.mark.parametrize("source", ["trained", "shipped"])
def test_tokenizers_load_with_the_engine_and_keep_words_whole(source, trained_tokenizers):
    from nunchaku_lite.tokenizers import load_clip_tokenizer, load_t5_tokenizer

    folder = trained_tokenizers[0] if source == "trained" else ASSETS / "mini"
    if not (folder / "tokenizer").is_dir():
        pytest.skip("no shipped mini model")
    clip, t5 = load_clip_tokenizer(folder / "tokenizer"), load_t5_tokenizer(folder / "tokenizer_2", 32)
    vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text())
    assert clip.eos_id == max(vocab.values()) == len(vocab) - 1  # CLIP pools at the largest id: EOS
    assert clip.bos_id == len(vocab) - 2 and clip.pad_id == clip.eos_id
    assert (t5.pad_id, t5.eos_id) == (0, 1)
    caption = "a large orange star at the top left and a small purple cross at the bottom right on a white background"
    n_words = len(caption.split())
    ids, lengths = clip.encode_with_lengths(caption)
    assert lengths == [n_words + 2] and ids.shape == (1, 77)
    assert ids[0, 0] == clip.bos_id and ids[0, n_words + 1] == clip.eos_id
    ids5, lengths5 = t5.encode_with_lengths(caption.upper())  # lower-cased by the tokenizer itself
    assert lengths5 == [n_words + 1] and ids5[0, n_words] == 1 and (ids5[0, n_words + 1:] == 0).all()
    # words outside the captions still tokenize (as pieces), without unknown tokens for plain ASCII
    assert 2 not in t5("a cat holding a sign")[0].tolist()


# ------------------------------------------------------------------------------------------------ export
def test_export_names_round_trip_through_the_loaders():
    from nunchaku_lite.loading import keys_vae
    from nunchaku_lite.loading.keys_dit import convert_dit_state_dict, params_from_config
    from nunchaku_lite.mini.export import dit_config, dit_to_diffusers, vae_config, vae_to_diffusers
    from nunchaku_lite.mini.train import model_configs
    from nunchaku_lite.models.dit import Flux
    from nunchaku_lite.models.vae import AutoEncoder

    fp, _, _, ap = model_configs(100, 50)
    sd = {k: torch.randn(v.shape) for k, v in Flux(fp).state_dict().items()}
    layout, back = convert_dit_state_dict(dit_to_diffusers(sd, fp))
    assert layout == "diffusers" and back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert params_from_config(dit_config(fp)) == fp
    vsd = {k: torch.randn(v.shape) for k, v in AutoEncoder(ap).state_dict().items()}
    vback = keys_vae.to_native_keys(vae_to_diffusers(vsd, ap))
    assert vback.keys() == vsd.keys() and all(torch.equal(vback[k], vsd[k]) for k in vsd)
    assert keys_vae.params_from_config(vae_config(ap)) == ap


def test_every_w4a4_linear_has_k_multiple_of_128():
    from nunchaku_lite.mini.train import model_configs
    from nunchaku_lite.models.dit import Flux

    flux = Flux(model_configs(100, 50)[0])
    for name, mod in flux.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith(("double_blocks", "single_blocks")):
            assert mod.in_features % 128 == 0, name


# ------------------------------------------------------------------------------------------------- eval
def test_heldout_prompt_set_is_fixed_and_uses_held_out_triples():
    a, b = heldout_prompts(), heldout_prompts()
    assert a == b and len({p["seed"] for p in a}) == len(a)
    for p in a:
        spec = D.parse_caption(p["prompt"])
        assert len(spec["shapes"]) == p["shapes"]
        if p["shapes"] == 1:
            s = spec["shapes"][0]
            assert (s["color"], s["shape"], spec["background"]) in D.HELD_OUT


def test_psnr_ssim():
    rng = np.random.default_rng(0)
    ref = [D.make_sample(1, i).image for i in range(3)]
    noisy = [np.clip(im.astype(int) + rng.integers(-20, 21, im.shape), 0, 255).astype(np.uint8) for im in ref]
    assert psnr(ref, ref) == [float("inf")] * 3
    assert np.allclose(ssim(ref, ref), 1.0)
    p = psnr(ref, noisy)
    assert all(20 < v < 30 for v in p)  # uniform +-20 noise: rms 11.8 -> 26.7 dB
    assert all(0 < v < 0.95 for v in ssim(ref, noisy))
    m = image_metrics(ref, noisy)
    assert m["psnr"] < image_metrics(ref, ref)["psnr"] and m["ssim"] < 1


def test_score_images_and_summary():
    prompts = heldout_prompts(n_single=4, n_double=2)
    images = [D.sample_from_spec(D.parse_caption(p["prompt"]), seed=p["seed"]).image for p in prompts]
    acc = score_images(images, prompts)
    assert acc["color_shape"] == 1.0 and acc["n"] == 6 and acc["one_shape.background"] == 1.0
    shuffled = score_images(images[::-1], prompts)
    assert shuffled["color_shape"] < 1.0
    assert summarize([{"shape": True}, {"shape": False, "position": True}], [{"shapes": 1}, {"shapes": 2}]) == {
        "shape": 0.5, "position": 1.0, "one_shape.shape": 1.0, "two_shapes.shape": 0.0, "two_shapes.position": 1.0,
        "n": 2}


# ------------------------------------------------------------------------------------------ shipped model
def _asset_bytes(*names) -> int:
    return sum(f.stat().st_size for n in names if (ASSETS / n).exists() for f in (ASSETS / n).rglob("*") if f.is_file())


def test_shipped_model_is_small_and_complete():
    if not (ASSETS / "mini" / "model_index.json").is_file():
        pytest.skip("no shipped mini model")
    index = json.loads((ASSETS / "mini" / "model_index.json").read_text())
    assert index["_nunchaku_lite"]["kind"] == "schnell" and index["_nunchaku_lite"]["default_size"] == 128
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (ASSETS / "mini" / part).is_dir(), part
    assert _asset_bytes("mini", "mini-w4a4", "mini-w4a4.safetensors") <= 42 * 2 ** 20


def test_shipped_model_draws_what_it_is_asked(tmp_path):
    """End to end on CPU through the engine's pipeline: prompts outside the training triples."""
    if not (ASSETS / "mini" / "model_index.json").is_file():
        pytest.skip("no shipped mini model")
    from nunchaku_lite import Flux

    pipe = Flux.from_pretrained("mini", device="cpu", dtype=torch.float32)
    assert pipe.defaults.steps == 20 and pipe.defaults.max_sequence_length == 32
    prompts = [p["prompt"] for p in heldout_prompts()[:4]]
    images = pipe(prompts, seed=0, steps=8)  # 8 steps score like 20 here (training/eval.json), 2.5x cheaper
    acc = score_images(images, prompts)
    assert acc["color_shape"] >= 3 / 4 and acc["background"] == 1.0, acc


def test_shipped_w4a4_transformer_tracks_the_16bit_one():
    """The quantized transformer loads by name and its output stays close to the 16-bit model's."""
    path = ASSETS / "mini-w4a4" / "transformer.safetensors"
    if not path.is_file() or not (ASSETS / "mini").is_dir():
        pytest.skip("no shipped mini-w4a4 transformer")
    from nunchaku_lite.loading import load_transformer
    from nunchaku_lite.sampling import prepare_ids

    q = load_transformer(path, dtype=torch.float32)
    ref = load_transformer(ASSETS / "mini" / "transformer", dtype=torch.float32)
    kinds = {type(m).__name__ for m in q.double_blocks.modules()}
    assert "W4A4Linear" in kinds, kinds
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(2, 64, 64, generator=gen)
    txt = torch.randn(2, 32, ref.params.context_in_dim, generator=gen)
    y = torch.randn(2, ref.params.vec_in_dim, generator=gen)
    img_ids, txt_ids = prepare_ids(2, 16, 16, 32)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        a, b = ref(img, img_ids, txt, txt_ids, t, y), q(img, img_ids, txt, txt_ids, t, y)
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 0.25, rel


# ------------------------------------------------------------------------------------------- training
def test_training_script_smoke_and_resume(tmp_path):
    """Tiny CPU run: tokenizers, VAE, DiT, eval, export; then a rerun resumes from the checkpoints."""
    from nunchaku_lite.mini import train

    args = ["--out", str(tmp_path / "run"), "--tiny", "--device", "cpu", "--num-images", "24", "--vae-steps", "2",
            "--vae-batch", "2", "--dit-steps", "3", "--dit-batch", "2", "--eval-single", "2", "--eval-double", "1",
            "--workers", "1", "--export", str(tmp_path / "export")]
    assert train.main(args) == 0
    run = tmp_path / "run"
    for f in ("loss_vae.csv", "loss_dit.csv", "loss_vae.png", "loss_dit.png", "eval.json", "eval_grid.png",
              "vae_ckpt.pt", "dit_ckpt.pt", "tokenizer/vocab.json", "tokenizer_2/tokenizer.json"):
        assert (run / f).is_file(), f
    assert torch.load(run / "dit_ckpt.pt")["step"] == 3
    # the export is a diffusers folder the engine's loaders read
    from nunchaku_lite.loading import load_transformer, load_vae

    dit = load_transformer(tmp_path / "export" / "transformer", dtype=torch.float32)
    assert dit.params.hidden_size == 64
    ae = load_vae(tmp_path / "export" / "vae", dtype=torch.float32)
    assert ae.scale_factor != 0.3611  # measured on the data, not FLUX's
    # resume: one more DiT step continues the run instead of restarting it
    assert train.main(args[:-2] + ["--dit-steps", "4", "--eval-double", "0"]) == 0
    assert torch.load(run / "dit_ckpt.pt")["step"] == 4
    rows = list(csv_rows(run / "loss_dit.csv"))
    assert [int(float(r["step"])) for r in rows] == [0, 1, 2, 3]


def csv_rows(path):
    import csv

    with open(path, newline="") as f:
        yield from csv.DictReader(f)


def test_quant_table_markdown_and_split_scorer():
    import math

    from nunchaku_lite.mini.quant_table import split_scorer, table_markdown

    one = "a red circle on a blue background"
    two = "a red circle at the top left and a green square at the bottom right on a white background"
    img1 = D.sample_from_spec(D.parse_caption(one), seed=0).image
    img2 = D.sample_from_spec(D.parse_caption(two), seed=0).image
    r1, r2 = split_scorer(img1.astype(np.float32) / 255, one), split_scorer(img2, two)
    assert r1["one_shape_color_shape"] and "two_shape_color_shape" not in r1
    assert r2["two_shape_color_shape"] and "one_shape_color_shape" not in r2
    rows = [{"method": "16-bit", "rank": None, "psnr": math.inf, "ssim": 1.0, "layer_err_mean": 0.0,
             "acc:color_shape": 0.5},
            {"method": "naive", "rank": 0, "psnr": 31.234, "ssim": 0.98765, "layer_err_mean": 0.1, "acc:color_shape": 0.25}]
    lines = table_markdown(rows).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| 16-bit | - | 50.0% |") and "| ref | ref |" in lines[2]
    assert "| naive | 0 | 25.0% |" in lines[3] and "31.23" in lines[3] and "0.9877" in lines[3]
