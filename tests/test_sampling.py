"""Sampling helpers (sampling.py): schedule, noise, packing, ids and the Euler loop, against the BFL goldens."""
import json

import pytest
import torch
from safetensors.torch import load_file

from nunchaku_lite.loading.keys_dit import convert_dit_state_dict, params_from_config
from nunchaku_lite.models.dit import Flux
from nunchaku_lite.sampling import (
    denoise,
    get_noise,
    get_schedule,
    latent_size,
    pack,
    prepare_ids,
    round_size,
    shift_mu,
    unpack,
)


def test_schedules_match_golden(golden):
    cases = json.loads(golden("schedule", "schedules.json").read_text())
    assert len(cases) >= 10
    for case in cases:
        got = get_schedule(case["num_steps"], case["image_seq_len"], shift=case["shift"])
        assert len(got) == case["num_steps"] + 1
        torch.testing.assert_close(torch.tensor(got), torch.tensor(case["bfl_timesteps"]), atol=1e-6, rtol=0)
        if case["shift"]:
            assert shift_mu(case["image_seq_len"]) == pytest.approx(case["mu"], abs=1e-9)


def test_schedule_examples_from_spec():
    assert get_schedule(4, 4096, shift=False) == [1.0, 0.75, 0.5, 0.25, 0.0]
    torch.testing.assert_close(torch.tensor(get_schedule(4, 4096, shift=True)),
                               torch.tensor([1, 0.904531, 0.759511, 0.512844, 0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(get_schedule(4, 1024, shift=True)),
                               torch.tensor([1, 0.849235, 0.652489, 0.384945, 0]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="num_steps"):
        get_schedule(0, 4096)


def test_pack_layout_and_round_trip(golden):
    inp = load_file(golden("dit", "schnell", "inputs.safetensors"))
    torch.testing.assert_close(pack(inp["img_unpacked"]), inp["img"], atol=0, rtol=0)
    torch.testing.assert_close(unpack(inp["img"], 8 * 16, 8 * 16), inp["img_unpacked"], atol=0, rtol=0)
    # feature index c*4 + ph*2 + pw, token index row*(w/2) + col
    latent = torch.randn(2, 16, 6, 10)
    tokens = pack(latent)
    assert tokens.shape == (2, 15, 64)
    assert tokens[1, 2 * 5 + 3, 7 * 4 + 1 * 2 + 0] == latent[1, 7, 2 * 2 + 1, 3 * 2 + 0]
    # odd pixel sizes: the latent covers ceil(H/16) x ceil(W/16) patches
    torch.testing.assert_close(unpack(tokens, 40, 72), latent, atol=0, rtol=0)
    with pytest.raises(ValueError, match="unpack"):
        unpack(tokens, 96, 96)


def test_pipeline_noise_packs_to_golden(golden):
    io = load_file(golden("pipeline", "expected", "io.safetensors"))
    torch.testing.assert_close(pack(io["latents_in_unpacked"]), io["latents_in"], atol=0, rtol=0)


def test_prepare_ids_match_golden(golden):
    inp = load_file(golden("dit", "schnell", "inputs.safetensors"))
    img_ids, txt_ids = prepare_ids(1, 16, 16, inp["txt"].shape[1])
    assert img_ids.dtype == torch.float32
    torch.testing.assert_close(img_ids, inp["img_ids"], atol=0, rtol=0)
    torch.testing.assert_close(txt_ids, inp["txt_ids"], atol=0, rtol=0)
    img_ids, _ = prepare_ids(3, 4, 6, 5)
    assert img_ids.shape == (3, 6, 3) and img_ids[2, 4].tolist() == [0.0, 1.0, 1.0]


def test_noise_reproducible_and_shaped():
    a = get_noise(2, 1024, 768, seed=42)
    assert a.shape == (2, 16, 128, 96) and a.dtype == torch.bfloat16
    assert torch.equal(a, get_noise(2, 1024, 768, seed=42))
    assert not torch.equal(a, get_noise(2, 1024, 768, seed=43))
    assert get_noise(1, 1000, 1000, seed=0, dtype=torch.float32).shape == (1, 16, 126, 126)
    assert latent_size(1000, 520) == (126, 66)
    # one generator stream filled in order: a batch of 1 equals the first sample of a larger batch, same seed
    torch.testing.assert_close(get_noise(1, 64, 64, seed=7), get_noise(3, 64, 64, seed=7)[:1], atol=0, rtol=0)


def test_round_size():
    assert round_size(1024, 768) == (1024, 768, False)
    assert round_size(1000, 777) == (992, 768, True)
    with pytest.raises(ValueError, match="at least 16"):
        round_size(8, 512)


def tiny_model(golden, variant):
    name = {"schnell": "flux_tiny", "dev": "flux_tiny_dev"}[variant]
    params = params_from_config(json.loads(golden("pipeline", "bfl_params.json").read_text())[name])
    model = Flux(params).eval()
    model.load_state_dict(convert_dit_state_dict(load_file(golden("pipeline", name + ".safetensors")))[1])
    return model


@pytest.mark.parametrize("variant,steps,shift,guidance", [("schnell", 4, False, None), ("dev", 6, True, 3.5)])
def test_denoise_matches_bfl_pipeline(golden, variant, steps, shift, guidance):
    io = load_file(golden("pipeline", "expected", "io.safetensors"))
    model = tiny_model(golden, variant)
    img = io["latents_in"]
    txt, vec = io[f"{variant}.prompt_embeds"], io[f"{variant}.pooled_prompt_embeds"]
    img_ids, txt_ids = prepare_ids(img.shape[0], 16, 16, txt.shape[1])
    timesteps = get_schedule(steps, img.shape[1], shift=shift)
    torch.testing.assert_close(torch.tensor(timesteps), io[f"{variant}.bfl_timesteps"], atol=1e-6, rtol=0)
    seen = []
    out = denoise(model, img, img_ids, txt, txt_ids, vec, timesteps, guidance=guidance,
                  callback=lambda step, n, t, x: seen.append((step, n, t)))
    torch.testing.assert_close(out, io[f"{variant}.bfl_final_latents"], atol=1e-4, rtol=1e-4)
    assert [s[0] for s in seen] == list(range(steps)) and seen[0][1:] == (steps, 1.0)


def test_denoise_bf16_close_to_float32(golden):
    io = load_file(golden("pipeline", "expected", "io.safetensors"))
    model = tiny_model(golden, "dev")
    img = io["latents_in"]
    txt, vec = io["dev.prompt_embeds"], io["dev.pooled_prompt_embeds"]
    img_ids, txt_ids = prepare_ids(img.shape[0], 16, 16, txt.shape[1])
    timesteps = get_schedule(6, 64, shift=True)

    def bf16_times(t):  # a bf16 run rounds t (and guidance) to bf16, then 1000 * t again
        return None if t is None else (t.bfloat16() * 1000).float() / 1000

    def float32_model(**kw):  # float32 reference that sees the same effective times as the bf16 run
        return model(**dict(kw, timesteps=bf16_times(kw["timesteps"]), guidance=bf16_times(kw["guidance"])))

    ref = denoise(float32_model, img, img_ids, txt, txt_ids, vec, timesteps, guidance=3.5)
    model.to(torch.bfloat16)
    out = denoise(model, img.bfloat16(), img_ids, txt.bfloat16(), txt_ids, vec.bfloat16(), timesteps, guidance=3.5)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 3e-2
