"""FLUX autoencoder (models/vae.py) and its key conversion (loading/keys_vae.py) against the golden set."""
import json

import pytest
import torch
from safetensors.torch import load_file

from nunchaku_lite.loading import keys_vae
from nunchaku_lite.models.vae import AutoEncoder, AutoEncoderParams, _tile_starts

TOL = dict(atol=1e-4, rtol=1e-4)


def build(weights_path, config_path=None) -> AutoEncoder:
    """AutoEncoder from a safetensors file of either layout, dims from the config (if given) or from shapes."""
    sd = load_file(weights_path)
    shapes = keys_vae.native_shapes({k: v.shape for k, v in sd.items()})
    if config_path is None:
        params = keys_vae.params_from_shapes(shapes)
    else:
        params = keys_vae.params_from_config(json.loads(config_path.read_text()))
    keys_vae.check_shapes(shapes, params, str(weights_path))
    ae = AutoEncoder(params).eval()
    ae.load_state_dict(keys_vae.to_native_keys(sd), strict=True)
    return ae


def tiny_params(**kw) -> AutoEncoderParams:
    return AutoEncoderParams(**{**dict(ch=32, ch_mult=(1, 2), num_res_blocks=1), **kw})


# ---------------------------------------------------------------------------------------------- golden: vae/
@pytest.fixture(params=["bfl", "diffusers"])
def golden_ae(request, golden):
    return build(golden("vae", f"weights_{request.param}.safetensors"),
                 golden("vae", f"config_{request.param}.json"))


@pytest.fixture
def vae_io(golden):
    return load_file(golden("vae", "io.safetensors"))


@torch.no_grad()
def test_decode_matches_bfl(golden_ae, vae_io):
    torch.testing.assert_close(golden_ae.decode(vae_io["z"]), vae_io["decoded"], **TOL)


@torch.no_grad()
def test_encode_matches_bfl(golden_ae, vae_io):
    torch.testing.assert_close(golden_ae.encode(vae_io["x"]), vae_io["encoded"], **TOL)


@torch.no_grad()
def test_debug_intermediates(golden_ae, vae_io):
    torch.testing.assert_close(golden_ae.encoder(vae_io["x"]), vae_io["debug.encoder_moments"], **TOL)
    # decode(z) must be exactly decoder(z / scale + shift): feed the golden decoder input straight in
    ae = golden_ae
    torch.testing.assert_close(vae_io["z"] / ae.scale_factor + ae.shift_factor, vae_io["debug.decoder_input"], **TOL)
    torch.testing.assert_close(ae.decoder(vae_io["debug.decoder_input"]), vae_io["decoded"], **TOL)


def test_config_and_shapes_agree(golden):
    for layout in ("bfl", "diffusers"):
        from_cfg = keys_vae.params_from_config(json.loads(golden("vae", f"config_{layout}.json").read_text()))
        sd = load_file(golden("vae", f"weights_{layout}.safetensors"))
        from_shapes = keys_vae.params_from_shapes(keys_vae.native_shapes({k: v.shape for k, v in sd.items()}))
        assert from_cfg.ch == 32 and from_cfg.ch_mult == (1, 2) and from_cfg.num_res_blocks == 1
        assert from_cfg.scale_factor == 0.3611 and from_cfg.shift_factor == 0.1159
        # resolution is the only field shapes cannot tell
        assert from_shapes == AutoEncoderParams(**{**from_cfg.__dict__, "resolution": from_shapes.resolution})


def test_both_layouts_give_identical_weights(golden):
    bfl = load_file(golden("vae", "weights_bfl.safetensors"))
    conv = keys_vae.to_native_keys(load_file(golden("vae", "weights_diffusers.safetensors")))
    assert conv.keys() == bfl.keys()
    for k in bfl:
        assert torch.equal(conv[k], bfl[k]), k


@torch.no_grad()
def test_streaming_load_onto_meta(golden, vae_io):
    """The loader's pattern: plan from key names, build on meta, fetch and convert one tensor at a time."""
    from safetensors import safe_open

    path = golden("vae", "weights_diffusers.safetensors")
    with safe_open(str(path), framework="pt") as f:
        shapes = keys_vae.native_shapes({k: f.get_slice(k).get_shape() for k in f.keys()})
        params = keys_vae.params_from_shapes(shapes)
        keys_vae.check_shapes(shapes, params, str(path))
        plan = keys_vae.to_native_keys(list(f.keys()))
        with torch.device("meta"):
            ae = AutoEncoder(params)
        state = {native: keys_vae.convert_tensor(f.get_tensor(src), op) for native, (src, op) in plan.items()}
    ae.load_state_dict(state, strict=True, assign=True)
    assert not any(t.is_meta for t in ae.state_dict().values())
    torch.testing.assert_close(ae.decode(vae_io["z"]), vae_io["decoded"], **TOL)


# ----------------------------------------------------------------------------------------- golden: pipeline/
@torch.no_grad()
def test_pipeline_vae_both_layouts_agree_and_match_bfl_decode(golden):
    bfl = build(golden("pipeline", "ae_tiny.safetensors"))
    diff = build(golden("pipeline", "vae", "diffusion_pytorch_model.safetensors"),
                 golden("pipeline", "vae", "config.json"))
    assert bfl.params.ch_mult == diff.params.ch_mult == (1, 1)
    io = load_file(golden("pipeline", "expected", "io.safetensors"))
    for kind in ("schnell", "dev"):
        packed = io[f"{kind}.bfl_final_latents"]  # [B, (h/2)(w/2), 16*2*2]
        b, n, _ = packed.shape
        side = int(n**0.5)
        z = packed.reshape(b, side, side, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, 16, 2 * side, 2 * side)
        torch.testing.assert_close(bfl.decode(z), io[f"{kind}.bfl_decoded_raw"], **TOL)
        torch.testing.assert_close(diff.decode(z), io[f"{kind}.bfl_decoded_raw"], **TOL)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(bfl.encode(x), diff.encode(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- key mapping
def test_diffusers_decoder_levels_are_reversed():
    keys = ["decoder.up_blocks.0.resnets.2.conv1.weight", "decoder.up_blocks.3.resnets.0.conv_shortcut.bias",
            "decoder.up_blocks.1.upsamplers.0.conv.weight", "encoder.down_blocks.2.downsamplers.0.conv.bias",
            "encoder.down_blocks.1.resnets.0.conv_shortcut.weight", "decoder.mid_block.resnets.1.norm2.bias",
            "encoder.mid_block.attentions.0.to_out.0.weight", "encoder.mid_block.attentions.0.group_norm.weight",
            "decoder.conv_norm_out.bias"]
    layout, plan = keys_vae.plan_vae_keys(keys)
    assert layout == "diffusers"
    back = {src: (native, op) for native, (src, op) in plan.items()}
    assert back[keys[0]] == ("decoder.up.3.block.2.conv1.weight", "copy")
    assert back[keys[1]] == ("decoder.up.0.block.0.nin_shortcut.bias", "copy")
    assert back[keys[2]] == ("decoder.up.2.upsample.conv.weight", "copy")
    assert back[keys[3]] == ("encoder.down.2.downsample.conv.bias", "copy")
    assert back[keys[4]] == ("encoder.down.1.block.0.nin_shortcut.weight", "copy")
    assert back[keys[5]] == ("decoder.mid.block_2.norm2.bias", "copy")
    assert back[keys[6]] == ("encoder.mid.attn_1.proj_out.weight", "to_conv1x1")
    assert back[keys[7]] == ("encoder.mid.attn_1.norm.weight", "copy")
    assert back[keys[8]] == ("decoder.norm_out.bias", "copy")


def test_linear_attention_weights_become_1x1_convs():
    w = torch.randn(64, 64)
    out = keys_vae.convert_tensor(w, "to_conv1x1")
    assert out.shape == (64, 64, 1, 1) and torch.equal(out[:, :, 0, 0], w)
    assert keys_vae.convert_tensor(out, "to_conv1x1") is out  # already 4-D (older exports): unchanged
    shapes = keys_vae.native_shapes({"decoder.mid_block.attentions.0.to_q.weight": (64, 64)})
    assert shapes == {"decoder.mid.attn_1.q.weight": (64, 64, 1, 1)}


def test_prefixed_all_in_one_checkpoint():
    keys = ["first_stage_model.encoder.conv_in.weight", "first_stage_model.decoder.conv_out.bias",
            "model.diffusion_model.img_in.weight", "cond_stage_model.foo"]
    layout, plan = keys_vae.plan_vae_keys(keys)
    assert layout == "bfl"
    assert plan == {"encoder.conv_in.weight": (keys[0], "copy"), "decoder.conv_out.bias": (keys[1], "copy")}


def test_sd_style_quant_conv_is_refused_by_name():
    with pytest.raises(ValueError, match=r"post_quant_conv\.weight"):
        keys_vae.plan_vae_keys(["encoder.conv_in.weight", "post_quant_conv.weight"])
    with pytest.raises(ValueError, match=r"decoder\.up_blocks\.0\.attentions\.0\.to_q\.weight"):
        keys_vae.plan_vae_keys(["decoder.up_blocks.0.attentions.0.to_q.weight"])


def test_non_vae_keys_are_refused():
    with pytest.raises(ValueError, match="img_in.weight"):
        keys_vae.detect_layout(["img_in.weight", "txt_in.weight"])


def test_check_shapes_names_missing_unexpected_and_wrong_keys():
    params = tiny_params()
    shapes = keys_vae.expected_shapes(params)
    keys_vae.check_shapes(shapes, params)  # complete and right: no error
    bad = dict(shapes)
    del bad["decoder.mid.attn_1.v.bias"]
    bad["decoder.up.1.block.0.conv1.weight"] = (64, 64, 1, 1)
    bad["encoder.extra.weight"] = (3,)
    with pytest.raises(ValueError) as err:
        keys_vae.check_shapes(bad, params, "ae.safetensors")
    msg = str(err.value)
    for part in ("ae.safetensors", "decoder.mid.attn_1.v.bias", "decoder.up.1.block.0.conv1.weight",
                 "[64, 64, 1, 1]", "encoder.extra.weight"):
        assert part in msg


def test_params_from_config_errors_and_bfl_names():
    p = keys_vae.params_from_config({"ch": 64, "ch_mult": [1, 2, 2], "num_res_blocks": 3, "z_channels": 8})
    assert (p.ch, p.ch_mult, p.num_res_blocks, p.z_channels, p.downsample_factor) == (64, (1, 2, 2), 3, 8, 4)
    with pytest.raises(ValueError, match="use_quant_conv"):
        keys_vae.params_from_config({"block_out_channels": [128, 256], "use_quant_conv": True})
    with pytest.raises(ValueError, match="block_out_channels"):
        keys_vae.params_from_config({"block_out_channels": [128, 192]})
    with pytest.raises(ValueError, match="multiple of 32"):
        AutoEncoderParams(ch=48)
    with pytest.raises(ValueError, match="z_channels"):
        keys_vae.params_from_config({"z_channels": 0})
    with pytest.raises(ValueError, match="non-numeric.*'abc'"):
        keys_vae.params_from_config({"ch": "abc"})


def test_real_flux_size_on_meta():
    """Full-size FLUX AE: 244 tensors, 83,819,683 parameters (FLUX.md §4.1); diffusers config gives the same."""
    shapes = keys_vae.expected_shapes(AutoEncoderParams())
    assert len(shapes) == 244
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 83_819_683
    flux_cfg = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 16,
                "scaling_factor": 0.3611, "shift_factor": 0.1159, "in_channels": 3, "out_channels": 3,
                "sample_size": 1024, "use_quant_conv": False, "use_post_quant_conv": False}
    p = keys_vae.params_from_config(flux_cfg)
    assert p == AutoEncoderParams(resolution=1024)
    assert keys_vae.params_from_shapes(shapes) == AutoEncoderParams()


# ------------------------------------------------------------------------------------------- model behaviour
def test_bad_inputs_name_the_argument():
    ae = AutoEncoder(tiny_params())
    with pytest.raises(ValueError, match=r"`z`.*\[B, 16, H, W\]"):
        ae.decode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="`x`"):
        ae.encode(torch.zeros(3, 32, 32))
    with pytest.raises(TypeError, match="`z`"):
        ae.decode([[0.0]])
    with pytest.raises(ValueError, match="overlap"):
        ae.decode_tiled(torch.zeros(1, 16, 8, 8), tile=4, overlap=4)


def test_shapes_and_downsample_factor():
    ae = AutoEncoder(tiny_params(ch_mult=(1, 1, 2)))
    with torch.no_grad():
        z = ae.encode(torch.zeros(1, 3, 24, 40))
        assert z.shape == (1, 16, 6, 10)
        assert ae.decode(z).shape == (1, 3, 24, 40)


def test_trainable():
    """Gradients flow through encode/decode (the mini model trains this module)."""
    torch.manual_seed(0)
    ae = AutoEncoder(tiny_params())
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    (ae.decode(ae.encode(x)) - x).pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ae.parameters())
    assert ae.encoder.conv_in.weight.grad.abs().sum() > 0 and ae.decoder.conv_out.weight.grad.abs().sum() > 0


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_close_to_fp32(golden, vae_io, dtype):
    ae16 = build(golden("vae", "weights_bfl.safetensors"), golden("vae", "config_bfl.json")).to(dtype)
    out = ae16.decode(vae_io["z"])  # float32 input is cast to the weights' dtype
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), vae_io["decoded"], atol=3e-2 * vae_io["decoded"].abs().max(), rtol=0)
    enc = ae16.encode(vae_io["x"])
    torch.testing.assert_close(enc.float(), vae_io["encoded"], atol=3e-2 * vae_io["encoded"].abs().max(), rtol=0)


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_on_cuda(golden, vae_io, dtype):
    ae = build(golden("vae", "weights_bfl.safetensors"), golden("vae", "config_bfl.json")).to("cuda", dtype)
    out = ae.decode(vae_io["z"].cuda()).float().cpu()
    torch.testing.assert_close(out, vae_io["decoded"], atol=3e-2 * vae_io["decoded"].abs().max(), rtol=0)
    enc = ae.encode(vae_io["x"].cuda()).float().cpu()
    torch.testing.assert_close(enc, vae_io["encoded"], atol=3e-2 * vae_io["encoded"].abs().max(), rtol=0)


# -------------------------------------------------------------------------------------------- tiled decoding
def test_tile_starts_cover_and_overlap():
    for size, tile, overlap in [(16, 8, 4), (17, 8, 3), (100, 64, 16), (64, 64, 16), (5, 8, 2)]:
        starts = _tile_starts(size, tile, overlap)
        covered = set()
        for s in starts:
            covered |= set(range(s, min(s + tile, size)))
        assert covered == set(range(size)) and starts[-1] + min(tile, size) == size
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap


@torch.no_grad()
def test_tiled_blending_is_exact_for_a_pointwise_decoder():
    """With an up path that has no spatial context, tiling + blending must reproduce the full decode exactly:
    this checks tile placement, the latent->pixel offsets and that the blend weights sum to one."""
    torch.manual_seed(0)
    ae = AutoEncoder(tiny_params(ch_mult=(1, 1, 1)))  # factor 4
    f = ae.params.downsample_factor
    mix = torch.randn(3, ae.decoder.conv_in.out_channels)
    ae.decoder.upsample_path = lambda h: torch.einsum("oc,bchw->bohw", mix, h).repeat_interleave(f, -1).repeat_interleave(f, -2)
    z = torch.randn(2, 16, 13, 22)
    full = ae.decode(z)
    for tile, overlap in [(8, 4), (6, 1), (5, 0), (13, 5)]:
        torch.testing.assert_close(ae.decode_tiled(z, tile=tile, overlap=overlap), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_tiled_decode_close_to_full(golden, vae_io):
    ae = build(golden("vae", "weights_bfl.safetensors"), golden("vae", "config_bfl.json"))
    z = torch.cat([vae_io["z"], vae_io["z"].flip(-1)], dim=-1)  # [1, 16, 16, 32]
    full = ae.decode(z)
    torch.testing.assert_close(ae.decode_tiled(z, tile=32, overlap=8), full)  # one tile: the plain path
    rel = lambda t: ((t - full).norm() / full.norm()).item()
    big, small = rel(ae.decode_tiled(z, tile=16, overlap=8)), rel(ae.decode_tiled(z, tile=8, overlap=4))
    # Random tiny weights are a hard case (per-tile GroupNorm statistics differ a lot); a misplaced or
    # mis-weighted tile gives rel. L2 ~1. Bigger tiles must deviate less.
    assert big < 0.08 and big < small < 0.3, (big, small)


def test_attention_query_chunks_match_one_pass(monkeypatch):
    """Chunking the queries (bounded memory for large latents) gives the same result as one SDPA call."""
    from nunchaku_lite.models.vae import AttnBlock

    torch.manual_seed(0)
    block = AttnBlock(32).eval()
    x = torch.randn(2, 32, 12, 10)
    with torch.no_grad():
        whole = block(x)
        monkeypatch.setattr(AttnBlock, "MAX_SCORES", 120 * 7)  # 7 queries per chunk, last chunk shorter
        assert block.query_chunk(120) == 7
        chunked = block(x)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
