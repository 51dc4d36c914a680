"""CLIP text model vs the golden tiny CLIPTextModel (transformers), plus key/config handling."""
import json

import pytest
import torch
from safetensors.torch import load_file

from nunchaku_lite.loading.keys_text import (clip_key_map, clip_params_from_config, clip_params_from_shapes,
                                             clip_to_native_keys)
from nunchaku_lite.models.clip import CLIPConfig, CLIPTextModel


@pytest.fixture
def golden_clip(golden):
    cfg = clip_params_from_config(json.loads(golden("clip", "config.json").read_text()))
    model = CLIPTextModel(cfg)
    model.load_state_dict(clip_to_native_keys(load_file(golden("clip", "model.safetensors"))))
    return model.eval(), load_file(golden("clip", "io.safetensors"))


def test_matches_golden_fp32(golden_clip):
    model, io = golden_clip
    with torch.no_grad():
        hidden, pooled = model(io["input_ids"])
    torch.testing.assert_close(hidden, io["last_hidden_state"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, io["pooler_output"], atol=1e-4, rtol=1e-4)
    assert torch.equal(io["input_ids"].argmax(-1), io["eos_index"])


def test_text_model_prefix_file(golden):
    # transformers-4 layout (as in the real FLUX.1 text_encoder): every key prefixed `text_model.`.
    weights = load_file(golden("pipeline_dev", "text_encoder", "model.safetensors"))
    weights["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    cfg = clip_params_from_config(json.loads(golden("pipeline_dev", "text_encoder", "config.json").read_text()))
    model = CLIPTextModel(cfg)
    model.load_state_dict(clip_to_native_keys(weights))  # strict: prefix stripped, position_ids dropped
    io = load_file(golden("clip", "io.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model(io["input_ids"])[1], io["pooler_output"], atol=1e-4, rtol=1e-4)


def test_bf16_smoke(golden_clip):
    model, io = golden_clip
    with torch.no_grad():
        hidden, pooled = model.to(torch.bfloat16)(io["input_ids"])
    assert pooled.dtype == torch.bfloat16
    assert ((pooled.float() - io["pooler_output"]).norm() / io["pooler_output"].norm()) < 3e-2


def tiny_model(**kw):
    torch.manual_seed(0)
    cfg = CLIPConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=10, **kw)
    return CLIPTextModel(cfg).eval()


def test_causal_and_pooling_rules():
    model = tiny_model()
    ids = torch.tensor([[1, 5, 19, 3, 19, 19]])
    with torch.no_grad():
        hidden, pooled = model(ids)
        hidden2, _ = model(torch.tensor([[1, 5, 19, 7, 7, 7]]))
    torch.testing.assert_close(hidden[:, :3], hidden2[:, :3])  # later tokens never reach earlier ones
    assert not torch.allclose(hidden[:, 3], hidden2[:, 3])
    torch.testing.assert_close(pooled, hidden[:, 2])  # legacy rule: first position of the largest id
    # A non-legacy eos_token_id pools at the first occurrence of that id instead.
    model_eos = tiny_model(eos_token_id=3)
    model_eos.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model_eos(ids)[1], hidden[:, 3])


def test_activation_option():
    ids = torch.tensor([[1, 2, 3]])
    quick, exact = tiny_model(), tiny_model(hidden_act="gelu")
    exact.load_state_dict(quick.state_dict())
    with torch.no_grad():
        assert not torch.allclose(quick(ids)[0], exact(ids)[0])
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPConfig.from_dict({"hidden_act": "swish"})
    assert CLIPConfig.from_dict({"text_config": {"hidden_size": 12}}).hidden_size == 12


def test_params_from_shapes():
    shapes = {"text_model.embeddings.token_embedding.weight": (49408, 768),
              "text_model.embeddings.position_embedding.weight": (77, 768),
              "text_model.final_layer_norm.weight": (768,)}
    for i in range(12):
        shapes[f"text_model.encoder.layers.{i}.mlp.fc1.weight"] = (3072, 768)
    assert clip_params_from_shapes(shapes) == CLIPConfig()  # CLIP-L defaults, 12 heads
    narrow = {k: (v[0], 12) if len(v) == 2 else v for k, v in shapes.items()}
    with pytest.raises(ValueError, match="head count"):
        clip_params_from_shapes(narrow)


def test_bad_inputs():
    with pytest.raises(ValueError, match="not a CLIP text checkpoint"):
        clip_key_map(["shared.weight"])
    with pytest.raises(ValueError, match="input_ids"):
        tiny_model()(torch.zeros(1, 11, dtype=torch.long))  # longer than max_position_embeddings


def test_full_size_matches_clip_l():
    # FLUX.md 5.3: CLIP-L text model, 123,060,480 parameters.
    with torch.device("meta"):
        model = CLIPTextModel(CLIPConfig())
    assert sum(p.numel() for p in model.parameters()) == 123_060_480
