"""Our quantized checkpoint format (quant/format.py): bit-exact round trip, metadata, version errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nunchaku_lite.models.dit import Flux, FluxParams
from nunchaku_lite.quant import ops
from nunchaku_lite.quant.format import (FORMAT, is_quantized_checkpoint, load_quantized_transformer, read_metadata,
                                        save_quantized)
from nunchaku_lite.quant.modules import SplitInputLinear, W4A4Linear, W4A16Linear

PARAMS = FluxParams(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=128,
                    num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(16, 24, 24), guidance_embed=True)


def _w4a4(lin: nn.Linear, unsigned: bool, g: torch.Generator, act_pow2: bool = False) -> W4A4Linear:
    k = lin.in_features
    smooth = torch.rand(k, generator=g) + 0.5
    down = torch.randn(8, k, generator=g) * 0.02
    up = torch.randn(lin.out_features, 8, generator=g) * 0.02
    return W4A4Linear.from_linear(lin, lin.weight.detach() * smooth - up @ (down * smooth), smooth, down, up,
                                  act_unsigned=unsigned, act_shift=ops.UNSIGNED_SHIFT if unsigned else 0.0,
                                  pow2=act_pow2, act_pow2=act_pow2)


def quantized_tiny_flux(dtype=torch.bfloat16):
    """A tiny Flux with every kind of quantized layer: W4A4 (signed, unsigned, power-of-two scales in the
    single blocks' linear2 attention parts), W4A16, a SplitInputLinear, and the second double block's
    modulation kept 16-bit."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = Flux(PARAMS).to(dtype)
    for name, lin in list(model.named_modules()):
        if not isinstance(lin, nn.Linear) or "blocks" not in name:
            continue
        if name.endswith("mod.lin") or name.endswith("modulation.lin"):
            if name.startswith("double_blocks.1"):
                continue  # kept 16-bit
            new = W4A16Linear.from_linear(lin)
        elif name.endswith("linear2"):
            d = PARAMS.hidden_size
            parts = []
            for lo, hi, uns in ((0, d, False), (d, lin.in_features, True)):
                sub = nn.Linear(hi - lo, lin.out_features, bias=uns, dtype=dtype)
                with torch.no_grad():
                    sub.weight.copy_(lin.weight[:, lo:hi])
                    if uns:
                        sub.bias.copy_(lin.bias)
                parts.append(_w4a4(sub, uns, g, act_pow2=not uns))
            new = SplitInputLinear(parts)
        else:
            new = _w4a4(lin, name.endswith("mlp.2"), g)
        model.set_submodule(name, new)
    model.quant_config = {"method": "svdquant", "rank": 8, "alpha_grid": 5}
    return model.eval()


def inputs(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(2)
    return dict(img=torch.randn(1, 16, 16, generator=g).to(dtype), img_ids=torch.zeros(1, 16, 3),
                txt=torch.randn(1, 8, 64, generator=g).to(dtype), txt_ids=torch.zeros(1, 8, 3),
                timesteps=torch.tensor([0.5]), y=torch.randn(1, 32, generator=g).to(dtype),
                guidance=torch.tensor([3.5]))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = quantized_tiny_flux()
    path = save_quantized(model, tmp_path_factory.mktemp("q") / "tiny-svdq.safetensors")
    return model, path


def test_round_trip_is_bit_exact(saved):
    model, path = saved
    back = load_quantized_transformer(path)
    sa, sb = model.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert isinstance(back.double_blocks[0].img_mlp[2], W4A4Linear) and back.double_blocks[0].img_mlp[2].act_unsigned
    assert isinstance(back.single_blocks[1].linear2, SplitInputLinear)
    assert back.single_blocks[1].linear2.parts[0].act_pow2 and not back.single_blocks[1].linear2.parts[1].act_pow2
    assert isinstance(back.double_blocks[1].img_mod.lin, nn.Linear)  # the layer kept 16-bit stays a Linear
    assert back.quant_config["alpha_grid"] == 5
    with torch.no_grad():
        assert torch.equal(model(**inputs()), back(**inputs()))
    assert not list(path.parent.glob(".*tmp*"))  # the atomic save left no temp file


def test_metadata(saved):
    model, path = saved
    meta = read_metadata(path)
    assert meta["format"] == FORMAT and meta["format_version"] == "1" and meta["group_size"] == "64"
    assert meta["method"] == "svdquant" and meta["rank"] == "8" and meta["base_model"] == "dev"
    assert json.loads(meta["flux_params"])["hidden_size"] == 128
    prec = json.loads(meta["precision"])
    assert prec["double_blocks.0.img_attn.qkv"] == "w4a4" and prec["double_blocks.0.img_mod.lin"] == "w4a16"
    assert prec["double_blocks.1.img_mod.lin"] == "bf16" and prec["img_in"] == "bf16"
    assert prec["single_blocks.0.linear2"] == "w4a4" and "single_blocks.0.linear2.parts.0" not in prec
    unsigned = json.loads(meta["act_unsigned"])
    assert "double_blocks.1.txt_mlp.2" in unsigned and "single_blocks.0.linear2.parts.1" in unsigned
    assert "single_blocks.0.linear2.parts.0" not in unsigned
    assert is_quantized_checkpoint(path)


def test_dtype_override_keeps_exact_tensors(saved):
    model, path = saved
    back = load_quantized_transformer(path, dtype=torch.float32, act_quant=False)
    layer = back.double_blocks[0].img_attn.qkv
    assert layer.qweight.dtype == torch.uint8 and layer.wscales.dtype == torch.bfloat16
    assert layer.smooth.dtype == torch.float32 and layer.lora_down.dtype == torch.float32
    assert back.img_in.weight.dtype == torch.float32 and not layer.act_quant
    ref = model.double_blocks[0].img_attn.qkv
    assert torch.equal(layer.wscales, ref.wscales) and torch.equal(layer.lora_up, ref.lora_up.float())
    with torch.no_grad():
        out = back(**inputs(torch.float32))
    assert torch.isfinite(out).all()


def _rewrite(path, dst, **meta_changes):
    meta = read_metadata(path)
    meta.update(meta_changes)
    save_file(load_file(str(path)), str(dst), metadata=meta)
    return dst


def test_other_format_version_is_refused(saved, tmp_path):
    model, path = saved
    future = _rewrite(path, tmp_path / "v2.safetensors", format_version="2")
    assert is_quantized_checkpoint(future)
    with pytest.raises(ValueError, match="format_version '2'"):
        load_quantized_transformer(future)
    foreign = _rewrite(path, tmp_path / "foreign.safetensors", format="something.else")
    assert not is_quantized_checkpoint(foreign)
    with pytest.raises(ValueError, match="not a nunchaku_lite quantized checkpoint"):
        load_quantized_transformer(foreign)
    with pytest.raises(FileNotFoundError):
        load_quantized_transformer(tmp_path / "missing.safetensors")


def test_inconsistent_files_give_clear_errors(saved, tmp_path):
    model, path = saved
    tensors = load_file(str(path))
    del tensors["double_blocks.0.img_attn.qkv.lora_up"]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=read_metadata(path))
    with pytest.raises(ValueError, match="missing .*img_attn.qkv.lora_up"):
        load_quantized_transformer(broken)
    layers = json.loads(read_metadata(path)["layers"])
    layers["double_blocks.0.nonexistent"] = layers.pop("double_blocks.0.img_attn.qkv")
    bad = _rewrite(path, tmp_path / "bad.safetensors", layers=json.dumps(layers))
    with pytest.raises(ValueError, match="nonexistent"):
        load_quantized_transformer(bad)


def test_save_refuses_unquantized_model(tmp_path):
    with pytest.raises(ValueError, match="no quantized layers"):
        save_quantized(Flux(PARAMS), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="FluxParams"):
        save_quantized(nn.Sequential(W4A16Linear(64, 64)), tmp_path / "y.safetensors")


def test_generic_loader_detects_our_format(saved):
    from nunchaku_lite.loading import load_transformer
    model, path = saved
    back = load_transformer(path, act_quant=False)
    qkv = back.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, W4A4Linear) and not qkv.act_quant
    sa, sb = model.state_dict(), back.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
