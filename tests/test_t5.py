"""T5 encoder vs the golden tiny T5EncoderModel (transformers, no attention mask), plus key/config handling."""
import json

import pytest
import torch
from safetensors.torch import load_file

from nunchaku_lite.loading.keys_text import t5_key_map, t5_params_from_config, t5_params_from_shapes, t5_to_native_keys
from nunchaku_lite.models.t5 import T5Config, T5Encoder, clamp_fp16, relative_position_bucket


def rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def golden_t5(golden):
    cfg = T5Config.from_dict(json.loads(golden("t5", "config.json").read_text()))
    weights = load_file(golden("t5", "model.safetensors"))
    io = load_file(golden("t5", "io.safetensors"))
    model = T5Encoder(cfg)
    model.load_state_dict(t5_to_native_keys(weights))
    return model.eval(), weights, io


def test_matches_golden_fp32(golden_t5):
    model, _, io = golden_t5
    with torch.no_grad():
        out = model(io["input_ids"])
    torch.testing.assert_close(out, io["last_hidden_state"], atol=2e-4, rtol=1e-4)
    # Sanity: FLUX passes no mask; the masked variant is a different answer and we must not produce it.
    assert (out - io["last_hidden_state_masked"]).abs().max() > 1e-2


def test_state_dict_keys_equal_hf_file(golden_t5):
    model, weights, _ = golden_t5
    assert set(model.state_dict()) == set(weights)
    # Only block 0 owns a relative-position table; other layers reuse its bias.
    assert not hasattr(model.encoder.block[1].layer[0].SelfAttention, "relative_attention_bias")


def test_relative_position_bucket_golden(golden):
    io = load_file(golden("t5", "io.safetensors"))
    rel = torch.arange(-255, 256)  # key_pos - query_pos for max_length 256
    assert torch.equal(relative_position_bucket(rel), io["relative_position_bucket"])


def test_relative_position_bucket_examples():
    # Worked examples of the T5 rule (FLUX.md 5.2), independent of the golden file.
    rel = torch.tensor([0, -1, 1, 8, -8, 20, 64, 128, 500, -128, -500])
    expected = [0, 1, 17, 24, 8, 26, 30, 31, 31, 15, 15]
    assert relative_position_bucket(rel).tolist() == expected


def test_bf16_smoke(golden_t5):
    model, _, io = golden_t5
    with torch.no_grad():
        out = model.to(torch.bfloat16)(io["input_ids"][:2])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_l2(out, io["last_hidden_state"][:2]) < 3e-2


def test_fp16_with_wo_in_fp32(golden_t5):
    model, _, io = golden_t5
    model = model.half().keep_wo_in_fp32()
    assert model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    with torch.no_grad():
        out = model(io["input_ids"][:2])
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert rel_l2(out, io["last_hidden_state"][:2]) < 1e-2


@pytest.mark.gpu
def test_cuda_bf16(golden_t5):
    model, _, io = golden_t5
    with torch.no_grad():
        out = model.to("cuda", torch.bfloat16)(io["input_ids"].cuda())
    assert rel_l2(out.cpu(), io["last_hidden_state"]) < 3e-2


def test_clamp_fp16():
    x = torch.tensor([1.0, float("inf"), -float("inf")], dtype=torch.float16)
    y = clamp_fp16(x)
    assert torch.isfinite(y).all() and y[0] == 1 and y[1] == -y[2] and y[1] < torch.finfo(torch.float16).max
    z = torch.tensor([1e30, -1e30])  # float32 is left alone
    assert torch.equal(clamp_fp16(z), z)


def test_config_from_shapes_equals_config_json(golden):
    weights = load_file(golden("t5", "model.safetensors"))
    from_json = t5_params_from_config(json.loads(golden("t5", "config.json").read_text()))
    assert t5_params_from_shapes({k: tuple(v.shape) for k, v in weights.items()}) == from_json


def test_key_map_variants():
    base = {"shared.weight": (10, 4), "encoder.block.0.layer.0.SelfAttention.q.weight": (4, 4),
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 2),
            "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (8, 4), "encoder.final_layer_norm.weight": (4,)}
    # ComfyUI-style prefix, a full encoder-decoder file, and a tied embed_tokens copy.
    prefixed = {"text_encoders.t5xxl.transformer." + k: v for k, v in base.items()}
    prefixed["text_encoders.t5xxl.transformer.decoder.block.0.layer.0.SelfAttention.q.weight"] = (4, 4)
    prefixed["text_encoders.t5xxl.transformer.encoder.embed_tokens.weight"] = (10, 4)
    prefixed["text_encoders.t5xxl.transformer.lm_head.weight"] = (10, 4)
    assert set(t5_key_map(prefixed)) == set(base)
    assert t5_key_map(prefixed)["shared.weight"] == "text_encoders.t5xxl.transformer.shared.weight"
    # embed_tokens stands in for a missing shared.weight.
    only_embed = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in base.items()}
    assert t5_key_map(only_embed)["shared.weight"] == "encoder.embed_tokens.weight"
    cfg = t5_params_from_shapes(prefixed)
    assert (cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.vocab_size) == (4, 2, 2, 8, 1, 10)


def test_bad_inputs():
    with pytest.raises(ValueError, match="not a T5 checkpoint"):
        t5_key_map(["embeddings.token_embedding.weight"])
    with pytest.raises(ValueError, match="scaled fp8"):
        t5_key_map(["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight",
                    "encoder.block.0.layer.0.SelfAttention.q.scale_weight"])
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config.from_dict({"feed_forward_proj": "relu", "dense_act_fn": "relu"})
    model = T5Encoder(T5Config(vocab_size=10, d_model=4, d_kv=2, d_ff=8, num_heads=2, num_layers=1))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))


def test_full_size_matches_flux_checkpoint_listing():
    # FLUX.md 5.2: text_encoder_2 holds 219 tensors, 4,762,310,656 parameters.
    with torch.device("meta"):
        model = T5Encoder(T5Config())
    assert len(model.state_dict()) == 219
    assert sum(p.numel() for p in model.parameters()) == 4_762_310_656
