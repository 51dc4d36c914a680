"""Checkpoint files and component loaders: lazy safetensors views, shards, fp8 upcast, every public loader
against the golden components, layout variants, and meta-device construction."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nunchaku_lite.loading import (Checkpoint, detect_transformer_format, load_clip, load_t5, load_transformer,
                                   load_vae)
from nunchaku_lite.loading import load_clip_tokenizer, load_t5_tokenizer
from nunchaku_lite.loading.files import read_header


# --------------------------------------------------------------------------------------------------------------
# files.py

def _write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_header_lists_keys_shapes_dtypes_without_reading(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.zeros(5, dtype=torch.int32), "c": torch.ones(2, 2).bfloat16()}
    f = _write(tmp_path / "x.safetensors", tensors, {"k": "v"})
    infos, meta = read_header(f)
    assert {k: (i.shape, i.dtype) for k, i in infos.items()} == {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    assert meta == {"k": "v"}
    with Checkpoint.open(f) as ckpt:
        assert sorted(ckpt.keys()) == ["a", "b", "c"]
        assert ckpt.shapes()["a"] == (3, 4) and ckpt.dtype("c") == torch.bfloat16
        assert ckpt._handles == {}  # nothing opened until a tensor is read
        torch.testing.assert_close(ckpt.get("a"), tensors["a"])


def test_get_converts_floats_and_keeps_integers(tmp_path):
    f = _write(tmp_path / "x.safetensors", {"w": torch.randn(4, 4), "codes": torch.arange(6, dtype=torch.uint8)})
    with Checkpoint.open(f) as ckpt:
        w = ckpt.get("w", dtype=torch.bfloat16)
        assert w.dtype == torch.bfloat16
        torch.testing.assert_close(w, load_file(str(f))["w"].bfloat16())
        assert ckpt.get("codes", dtype=torch.bfloat16).dtype == torch.uint8


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_stored_weights_are_upcast(tmp_path, fp8):
    w = torch.randn(8, 8)
    f = _write(tmp_path / "x.safetensors", {"w": w.to(fp8)})
    with Checkpoint.open(f) as ckpt:
        assert ckpt.float_dtype() == torch.bfloat16
        assert ckpt.get("w").dtype == torch.bfloat16  # no dtype given: fp8 -> bf16
        up = ckpt.get("w", dtype=torch.float32)
    assert up.dtype == torch.float32
    torch.testing.assert_close(up, w.to(fp8).float())
    assert (up - w).abs().max() < 0.25 * w.abs().max()  # fp8 rounding only


def test_sharded_folder_and_index_file(tmp_path):
    a, b = {"x": torch.randn(2)}, {"y": torch.randn(3), "z": torch.randn(1)}
    _write(tmp_path / "m-00001-of-00002.safetensors", a)
    _write(tmp_path / "m-00002-of-00002.safetensors", b)
    index = {"metadata": {"total_size": 24},
             "weight_map": {"x": "m-00001-of-00002.safetensors", "y": "m-00002-of-00002.safetensors",
                            "z": "m-00002-of-00002.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    for path in (tmp_path, tmp_path / "m.safetensors.index.json"):
        with Checkpoint.open(path) as ckpt:
            assert sorted(ckpt.keys()) == ["x", "y", "z"] and len(ckpt.files) == 2
            torch.testing.assert_close(ckpt.get("y"), b["y"])
            assert ckpt.file_of("x").name == "m-00001-of-00002.safetensors"


def test_folder_prefers_the_standard_file_name(tmp_path):
    _write(tmp_path / "model.safetensors", {"x": torch.ones(1)})
    _write(tmp_path / "model.fp16.safetensors", {"x": torch.ones(1).half()})
    with Checkpoint.open(tmp_path) as ckpt:
        assert [f.name for f in ckpt.files] == ["model.safetensors"]


# --------------------------------------------------------------------------------------------------------------
# Loaders against the golden components

def _dit_out(model, golden, kind):
    i = load_file(str(golden("dit", kind, "inputs.safetensors")))
    with torch.no_grad():
        return model(i["img"], i["img_ids"], i["txt"], i["txt_ids"], i["timesteps"], i["y"], i.get("guidance"))


@pytest.mark.parametrize("kind", ["dev", "schnell"])
@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_load_transformer_matches_golden(golden, kind, layout):
    model = load_transformer(golden("dit", kind, f"weights_{layout}.safetensors"),
                             config=golden("dit", kind, f"config_{layout}.json"))
    assert model.params.guidance_embed == (kind == "dev")
    ref = load_file(str(golden("dit", kind, "outputs.safetensors")))["out"]
    torch.testing.assert_close(_dit_out(model, golden, kind), ref, atol=1e-4, rtol=1e-4)


def test_transformer_config_as_dict_bfl_names(golden):
    cfg = json.loads(golden("dit", "dev", "config_bfl.json").read_text())
    model = load_transformer(golden("dit", "dev", "weights_diffusers.safetensors"), config=cfg)
    ref = load_file(str(golden("dit", "dev", "outputs.safetensors")))["out"]
    torch.testing.assert_close(_dit_out(model, golden, "dev"), ref, atol=1e-4, rtol=1e-4)


def test_sharded_diffusers_transformer_equals_bfl_single_file(golden):
    sharded = load_transformer(golden("pipeline", "transformer"))  # folder: index json + 2 shards + config.json
    params = json.loads(golden("pipeline", "bfl_params.json").read_text())["flux_tiny"]
    single = load_transformer(golden("pipeline", "flux_tiny.safetensors"), config=params)
    assert sharded.params == single.params
    a, b = sharded.state_dict(), single.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_bfl_prefixed_keys(golden, tmp_path):
    sd = load_file(str(golden("dit", "schnell", "weights_bfl.safetensors")))
    f = tmp_path / "flux_prefixed.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(f))
    model = load_transformer(f, config=golden("dit", "schnell", "config_bfl.json"))
    ref = load_file(str(golden("dit", "schnell", "outputs.safetensors")))["out"]
    torch.testing.assert_close(_dit_out(model, golden, "schnell"), ref, atol=1e-4, rtol=1e-4)


def _t5_check(model, golden, atol=2e-4, rtol=1e-4):
    io = load_file(str(golden("t5", "io.safetensors")))
    with torch.no_grad():
        out = model(io["input_ids"])
    torch.testing.assert_close(out.float(), io["last_hidden_state"], atol=atol, rtol=rtol)


def _clip_check(model, golden, atol=1e-4, rtol=1e-4):
    io = load_file(str(golden("clip", "io.safetensors")))
    with torch.no_grad():
        hidden, pooled = model(io["input_ids"])
    torch.testing.assert_close(hidden.float(), io["last_hidden_state"], atol=atol, rtol=rtol)
    torch.testing.assert_close(pooled.float(), io["pooler_output"], atol=atol, rtol=rtol)


def test_load_t5_folder(golden):
    _t5_check(load_t5(golden("t5")), golden)


def test_load_clip_folder_and_prefixed_folder(golden):
    _clip_check(load_clip(golden("clip")), golden)
    _clip_check(load_clip(golden("pipeline_dev", "text_encoder")), golden)  # keys under `text_model.`


def test_single_file_text_encoders_with_prefix_and_fp8(golden, tmp_path):
    """clip_l.safetensors / t5xxl_fp8_e4m3fn.safetensors style: HF names in one file, no config beside it."""
    clip_sd = load_file(str(golden("clip", "model.safetensors")))
    clip_file = tmp_path / "clip_l.safetensors"
    save_file({"text_model." + k: v for k, v in clip_sd.items()}, str(clip_file))
    cfg = json.loads(golden("clip", "config.json").read_text())  # width 12: head count not in the shapes
    _clip_check(load_clip(clip_file, config=cfg), golden)

    t5_sd = load_file(str(golden("t5", "model.safetensors")))
    t5_file = tmp_path / "t5xxl_fp16.safetensors"
    save_file(t5_sd, str(t5_file))
    _t5_check(load_t5(t5_file), golden)  # every T5 size is visible in the shapes

    fp8_file = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    save_file({k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in t5_sd.items()}, str(fp8_file))
    t5 = load_t5(fp8_file)
    assert {p.dtype for p in t5.parameters()} == {torch.bfloat16}
    t5_32 = load_t5(fp8_file, dtype=torch.float32)
    assert {p.dtype for p in t5_32.parameters()} == {torch.float32}
    io = load_file(str(golden("t5", "io.safetensors")))
    with torch.no_grad():
        out = t5_32(io["input_ids"])
    ref = io["last_hidden_state"]
    assert ((out - ref).norm() / ref.norm()) < 0.25  # fp8 weights: loose agreement


def test_load_vae_both_layouts(golden):
    io = load_file(str(golden("vae", "io.safetensors")))
    for weights, cfg in (("weights_bfl.safetensors", "config_bfl.json"),
                         ("weights_diffusers.safetensors", "config_diffusers.json")):
        vae = load_vae(golden("vae", weights), config=golden("vae", cfg))
        with torch.no_grad():
            torch.testing.assert_close(vae.decode(io["z"]), io["decoded"], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(vae.encode(io["x"]), io["encoded"], atol=1e-4, rtol=1e-4)
    # no config: sizes from the shapes, FLUX scale/shift defaults
    vae = load_vae(golden("vae", "weights_bfl.safetensors"))
    assert vae.params.downsample_factor == 2 and vae.params.scale_factor == pytest.approx(0.3611)


def test_tokenizer_loaders(golden):
    clip = load_clip_tokenizer(golden("pipeline", "tokenizer"))
    t5 = load_t5_tokenizer(golden("pipeline", "tokenizer_2"), 256)
    ids = clip("A cat holding a sign that says hello world")
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert t5(["a", "b"]).shape == (2, 256)


def test_bf16_load_has_no_meta_and_right_dtype(golden):
    model = load_transformer(golden("pipeline", "transformer"), dtype=torch.bfloat16)
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(not t.is_meta and t.device.type == "cpu" for t in tensors)
    assert {t.dtype for t in model.parameters()} == {torch.bfloat16}
    assert not model.training


def test_module_built_on_meta_and_tensors_converted_once(golden, monkeypatch):
    """No parameter is ever initialised with real memory, and every tensor read goes straight to the target
    dtype (no float32 detour)."""
    inits = []
    original = nn.Linear.reset_parameters

    def spy(self):
        inits.append(self.weight.is_meta)
        return original(self)

    monkeypatch.setattr(nn.Linear, "reset_parameters", spy)
    requested = []
    original_get = Checkpoint.get

    def get(self, key, device=None, dtype=None):
        requested.append(dtype)
        return original_get(self, key, device, dtype)

    monkeypatch.setattr(Checkpoint, "get", get)
    load_transformer(golden("pipeline", "transformer"), dtype=torch.bfloat16)
    assert inits and all(inits)
    assert requested and set(requested) == {torch.bfloat16}


def test_detect_transformer_format(golden, tmp_path):
    assert detect_transformer_format(golden("pipeline", "transformer")) == "16bit"
    assert detect_transformer_format(golden("pipeline", "flux_tiny.safetensors")) == "16bit"
    f = _write(tmp_path / "q.safetensors", {"double_blocks.0.img_attn.qkv.qweight": torch.zeros(2, 2, dtype=torch.uint8)},
               {"format": "nunchaku_lite.svdquant"})
    assert detect_transformer_format(f) == "nunchaku_lite"
    g = _write(tmp_path / "n.safetensors", {"transformer_blocks.0.qkv_proj.qweight": torch.zeros(2, 2, dtype=torch.int8)},
               {"model_class": "NunchakuFluxTransformer2dModel"})
    assert detect_transformer_format(g) == "nunchaku"


def test_quantized_checkpoints_are_delegated_with_kwargs(tmp_path, monkeypatch):
    import nunchaku_lite.quant.format as qformat
    calls = []
    monkeypatch.setattr(qformat, "load_quantized_transformer",
                        lambda path, **kw: calls.append((path, kw)) or "quantized model")
    folder = tmp_path / "transformer"
    folder.mkdir()
    f = _write(folder / "model.safetensors", {"double_blocks.0.img_attn.qkv.qweight": torch.zeros(2, 2, dtype=torch.uint8)},
               {"format": "nunchaku_lite.svdquant"})
    assert load_transformer(f, dtype="bf16", act_quant=False) == "quantized model"
    assert load_transformer(folder) == "quantized model"  # a component folder holding the file
    assert calls[0] == (f, {"device": torch.device("cpu"), "dtype": torch.bfloat16, "act_quant": False})
    assert calls[1][0] == f
    with pytest.raises(TypeError, match="act_quant"):
        load_transformer(_write(tmp_path / "plain.safetensors", {"img_in.weight": torch.zeros(2, 2)}), act_quant=False)


def test_nunchaku_checkpoints_are_delegated(tmp_path, monkeypatch):
    import nunchaku_lite.quant.nunchaku as nk
    calls = []
    monkeypatch.setattr(nk, "load_nunchaku_transformer", lambda path, **kw: calls.append((path, kw)) or "imported")
    f = _write(tmp_path / "svdq-int4_r32-flux.1-dev.safetensors",
               {"transformer_blocks.0.qkv_proj.qweight": torch.zeros(2, 2, dtype=torch.int8)},
               {"model_class": "NunchakuFluxTransformer2dModel", "quantization_config": "{}"})
    legacy = tmp_path / "svdq-int4-flux.1-dev"
    legacy.mkdir()
    _write(legacy / "transformer_blocks.safetensors", {"transformer_blocks.0.qkv_proj.qweight": torch.zeros(1, dtype=torch.int8)})
    _write(legacy / "unquantized_layers.safetensors", {"x_embedder.weight": torch.zeros(1)})
    assert load_transformer(f, act_quant=False) == "imported"
    assert load_transformer(legacy) == "imported"
    assert calls[0] == (f, {"device": torch.device("cpu"), "dtype": None, "act_quant": False})
    assert calls[1][0] == legacy


def test_single_file_config_beside_the_file(golden, tmp_path):
    """flux_X.safetensors + flux_X.json: the RoPE axes (not visible in shapes) come from the sibling JSON."""
    sd = load_file(str(golden("dit", "schnell", "weights_bfl.safetensors")))
    f = tmp_path / "flux_small.safetensors"
    save_file(sd, str(f))
    with pytest.raises(ValueError, match="axes_dim"):
        load_transformer(f)  # head dim 32: no default for the axes
    (tmp_path / "flux_small.json").write_text(golden("dit", "schnell", "config_bfl.json").read_text())
    ref = load_file(str(golden("dit", "schnell", "outputs.safetensors")))["out"]
    torch.testing.assert_close(_dit_out(load_transformer(f), golden, "schnell"), ref, atol=1e-4, rtol=1e-4)
