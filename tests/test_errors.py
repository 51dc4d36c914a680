"""Issue 2 section 8: every bad input gives one clear exception naming the file, key or argument."""
import json
import pickle
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from nunchaku_lite import Flux
from nunchaku_lite.loading import CheckpointError, PickleCheckpointError, load_t5, load_transformer, load_vae
from nunchaku_lite.loading.files import Checkpoint



@pytest.fixture
def pipe(golden_pipe):
    return golden_pipe


def _vae_variant(golden, tmp_path, edit):
    sd = load_file(str(golden("vae", "weights_bfl.safetensors")))
    edit(sd)
    f = tmp_path / "ae_edited.safetensors"
    save_file(sd, str(f))
    return f


# -- missing files / folders ------------------------------------------------------------------------------------

def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "flux1-dev.safetensors"
    for fn in (load_transformer, load_vae, load_t5):
        with pytest.raises(FileNotFoundError, match="flux1-dev.safetensors"):
            fn(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        Flux.from_pretrained(tmp_path / "nope")


def test_folder_that_is_neither_layout(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match=str(tmp_path)) as e:
        Flux.from_pretrained(tmp_path)
    assert "diffusers" in str(e.value)
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        load_vae(tmp_path)


def test_missing_component_is_named(golden):
    with pytest.raises(ValueError, match="vae"):
        Flux.from_pretrained(None, transformer=golden("pipeline", "transformer"))


def test_missing_shard_is_named(tmp_path):
    save_file({"x": torch.ones(1)}, str(tmp_path / "m-00001-of-00002.safetensors"))
    index = {"weight_map": {"x": "m-00001-of-00002.safetensors", "y": "m-00002-of-00002.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="m-00002-of-00002.safetensors"):
        load_vae(tmp_path)


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_vae(bad)
    huge = tmp_path / "huge_header.safetensors"
    huge.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="huge_header.safetensors"):
        Checkpoint.open(huge)
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="cut.safetensors.*'w'|'w'.*cut.safetensors"):
        Checkpoint.open(cut)


# -- pickles ----------------------------------------------------------------------------------------------------

class _Boom:
    """Unpickling this writes a marker file: proof that a loader ran pickle code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.bin", "model.pt", "flux.ckpt", "weights.pth"])
def test_pickle_checkpoints_are_refused_unopened(tmp_path, name):
    marker = tmp_path / "was_unpickled"
    f = tmp_path / name
    f.write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(PickleCheckpointError, match="safetensors") as e:
        load_transformer(f)
    assert name in str(e.value)
    with pytest.raises(PickleCheckpointError, match=name):
        load_vae(tmp_path)  # a folder holding only the pickle
    with pytest.raises(PickleCheckpointError, match=name):
        Flux.from_pretrained(f)
    assert not marker.exists()


# -- keys and shapes --------------------------------------------------------------------------------------------

def test_wrong_shape_names_key_and_file(golden, tmp_path):
    key = "decoder.conv_in.weight"
    f = _vae_variant(golden, tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(32, 16, 1, 1)))
    with pytest.raises(ValueError, match=key) as e:
        load_vae(f, config=golden("vae", "config_bfl.json"))
    assert "ae_edited.safetensors" in str(e.value) and "shape" in str(e.value)


def test_missing_key_names_key_and_file(golden, tmp_path):
    key = "decoder.norm_out.bias"
    f = _vae_variant(golden, tmp_path, lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=key) as e:
        load_vae(f, config=golden("vae", "config_bfl.json"))
    assert "ae_edited.safetensors" in str(e.value) and "missing" in str(e.value)


def test_unexpected_key_names_key_and_file(golden, tmp_path):
    key = "decoder.mid.extra.weight"
    f = _vae_variant(golden, tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(3)))
    with pytest.raises(ValueError, match=key) as e:
        load_vae(f, config=golden("vae", "config_bfl.json"))
    assert "ae_edited.safetensors" in str(e.value)


def test_dit_missing_key(golden, tmp_path):
    sd = load_file(str(golden("dit", "schnell", "weights_bfl.safetensors")))
    del sd["single_blocks.1.linear2.bias"]
    f = tmp_path / "flux_cut.safetensors"
    save_file(sd, str(f))
    with pytest.raises(ValueError, match="single_blocks.1.linear2.bias") as e:
        load_transformer(f, config=golden("dit", "schnell", "config_bfl.json"))
    assert "flux_cut.safetensors" in str(e.value)


def test_not_a_transformer_checkpoint(golden):
    with pytest.raises(ValueError, match="ae_tiny.safetensors"):
        load_transformer(golden("pipeline", "ae_tiny.safetensors"))


# -- dtype / device ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, "float8", "half-ish"])
def test_unsupported_dtype(golden, dtype):
    with pytest.raises(ValueError, match="dtype"):
        load_vae(golden("vae", "weights_bfl.safetensors"), dtype=dtype)
    with pytest.raises(ValueError, match="dtype"):
        Flux.from_pretrained(golden("pipeline"), device="cpu", dtype=dtype)


@pytest.mark.parametrize("device", ["tpu", "cuda:99", "not a device"])
def test_unsupported_device(golden, device):
    with pytest.raises(ValueError, match="device"):
        load_vae(golden("vae", "weights_bfl.safetensors"), device=device)
    with pytest.raises(ValueError, match="device"):
        Flux.from_pretrained(golden("pipeline"), device=device)


def test_config_must_be_dict_or_json(golden, tmp_path):
    with pytest.raises(TypeError, match="config"):
        load_vae(golden("vae", "weights_bfl.safetensors"), config=42)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_vae(golden("vae", "weights_bfl.safetensors"), config=tmp_path / "nope.json")


# -- call arguments ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arg", ["height", "width"])
def test_size_below_16_pixels(pipe, arg):
    with pytest.raises(ValueError, match=arg):
        pipe("a cat", **{arg: 8}, steps=1)


@pytest.mark.parametrize("prompt", [123, None, ["a cat", 5], b"bytes"])
def test_non_string_prompt(pipe, prompt):
    with pytest.raises(TypeError, match="prompt"):
        pipe(prompt, steps=1, height=32, width=32)


def test_bad_call_arguments(pipe):
    with pytest.raises(ValueError, match="steps"):
        pipe("a", steps=0, height=32, width=32)
    with pytest.raises(ValueError, match="output_type"):
        pipe("a", steps=1, height=32, width=32, output_type="jpeg")
    with pytest.raises(ValueError, match="latents"):
        pipe("a", steps=1, latents=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="latents"):
        pipe(["a", "b"], steps=1, latents=torch.zeros(1, 16, 16, 16))
    with pytest.raises(TypeError, match="seed"):
        pipe("a", steps=1, height=32, width=32, seed="forty-two")


def test_over_long_prompt_is_truncated_with_a_warning(pipe):
    long_prompt = " ".join(["a very long prompt about many different things"] * 60)
    with pytest.warns(UserWarning, match="truncated"):
        txt, vec = pipe.encode_prompt([long_prompt])
    assert txt.shape[1] == pipe.defaults.max_sequence_length
    # truncation keeps the prompt's beginning: a prompt sharing the first 75 CLIP tokens pools the same
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, vec2 = pipe.encode_prompt([long_prompt + " and a different ending"])
    torch.testing.assert_close(vec, vec2)


def test_huge_size_refused_before_allocating(pipe):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="GiB") as e:
        pipe("a cat", height=200_000, width=200_000, steps=1)
    assert "200000" in str(e.value)
    assert time.perf_counter() - t0 < 5
