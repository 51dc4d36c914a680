"""Tokenizers vs golden ids from transformers (CLIPTokenizer, T5TokenizerFast) on the real FLUX files."""
import json

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import Unigram
from tokenizers.pre_tokenizers import Metaspace

from nunchaku_lite.tokenizers import CLIPTokenizer, T5Tokenizer, load_clip_tokenizer, load_t5_tokenizer


@pytest.fixture
def tokens(golden):
    return json.loads(golden("tokenizers", "tokens.json").read_text(encoding="utf-8"))


@pytest.fixture
def clip_tok(tokenizer_files):
    return load_clip_tokenizer(tokenizer_files("clip"))


def test_clip_golden(tokens, clip_tok):
    ids, lengths = clip_tok.encode_with_lengths([t["text"] for t in tokens])
    for i, t in enumerate(tokens):
        assert ids[i].tolist() == t["clip_ids"], t["text"]
        assert lengths[i] == t["clip_n_tokens_untruncated"], t["text"]
    assert ids.dtype == torch.long and ids.shape == (len(tokens), 77)


@pytest.mark.parametrize("source", ["spiece.model", "tokenizer.json"])
@pytest.mark.parametrize("max_length", [256, 512])
def test_t5_golden(tokens, tokenizer_files, source, max_length):
    tok = T5Tokenizer.from_file(tokenizer_files("t5", source), max_length)
    ids, lengths = tok.encode_with_lengths([t["text"] for t in tokens])
    for i, t in enumerate(tokens):
        assert ids[i].tolist() == t[f"t5_ids_{max_length}"], t["text"]
        assert lengths[i] == t["t5_n_tokens_untruncated"], t["text"]


def test_special_ids_from_files(clip_tok, tokenizer_files):
    assert (clip_tok.bos_id, clip_tok.eos_id, clip_tok.pad_id) == (49406, 49407, 49407)
    t5 = load_t5_tokenizer(tokenizer_files("t5"), 256)
    assert (t5.eos_id, t5.pad_id) == (1, 0)


def test_truncation(clip_tok, tokenizer_files):
    long = "red " * 100
    ids, (n,) = clip_tok.encode_with_lengths(long)
    assert n == 102 and ids[0, 0] == 49406 and ids[0, 76] == 49407 and (ids[0, 1:76] != 49407).all()
    t5 = load_t5_tokenizer(tokenizer_files("t5"), max_length=8)
    ids, (n,) = t5.encode_with_lengths(long)
    assert n == 101 and ids.shape == (1, 8) and ids[0, -1] == 1 and (ids[0, :-1] > 1).all()


def test_literal_special_tokens(clip_tok, tokenizer_files):
    # CLIP: literal special-token text becomes the special id (HF behaviour; moves the pooled position).
    assert clip_tok("<|endoftext|> cat")[0, :4].tolist() == [49406, 49407, 2368, 49407]
    # T5: the sentencepiece path must agree with tokenizer.json where specials are glued to text.
    sp = T5Tokenizer.from_file(tokenizer_files("t5", "spiece.model"), 32)
    fast = T5Tokenizer.from_file(tokenizer_files("t5", "tokenizer.json"), 32)
    prompts = ["a </s> b", "a</s>b", "x<extra_id_0>y", "<pad>hello <unk> world", "<extra_id_99> z", "  lead</s>  "]
    assert torch.equal(sp(prompts), fast(prompts))
    assert 32099 in sp("x<extra_id_0>y")[0].tolist()


@pytest.mark.parametrize("bad", [None, 3, ["ok", 5], b"bytes"])
def test_non_string_prompt(clip_tok, tokenizer_files, bad):
    with pytest.raises(TypeError, match="prompts"):
        clip_tok(bad)
    with pytest.raises(TypeError, match="prompts"):
        load_t5_tokenizer(tokenizer_files("t5"))(bad)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_clip_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        load_t5_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_clip_tokenizer(tmp_path / "nope")


def test_custom_clip_vocab(tmp_path):
    # A tiny CLIP-style vocabulary: specials at ids 0/1 (not 49406/49407) and a short context.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "c": 2, "a": 3, "t": 4, "t</w>": 5, "ca": 6,
             "cat</w>": 7, "a</w>": 8, "d": 9, "o": 10, "g</w>": 11}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tok = load_clip_tokenizer(tmp_path, max_length=8)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
    # "A  Cat" -> lowercase, whitespace collapsed; "cat" merges c+a then ca+t</w>; "dog" has no merges.
    assert tok(["A  Cat", "dog"]).tolist() == [[0, 8, 7, 1, 1, 1, 1, 1], [0, 9, 10, 11, 1, 1, 1, 1]]


def test_custom_t5_unigram_json(tmp_path):
    # A tiny T5-style Unigram tokenizer.json whose <pad> / </s> are not at 0 / 1.
    pieces = [("<unk>", 0.0), ("▁", -2.0), ("▁a", -1.0), ("▁cat", -1.0), ("c", -3.0), ("a", -3.0), ("t", -3.0),
              ("<pad>", 0.0), ("</s>", 0.0)]
    tok = Tokenizer(Unigram(pieces, unk_id=0))
    tok.pre_tokenizer = Metaspace()
    tok.save(str(tmp_path / "tokenizer.json"))
    t5 = load_t5_tokenizer(tmp_path, max_length=5)
    assert (t5.eos_id, t5.pad_id) == (8, 7)
    assert t5(["a cat", "a a a a a a"]).tolist() == [[2, 3, 8, 7, 7], [2, 2, 2, 2, 8]]


def test_clip_from_tokenizer_json(tokens, clip_tok, tmp_path):
    # The tokenizer.json route (e.g. a CLIPTokenizerFast export) must give the golden ids too.
    clip_tok.tokenizer.save(str(tmp_path / "tokenizer.json"))
    tok = load_clip_tokenizer(tmp_path)
    assert tok(tokens[0]["text"])[0].tolist() == tokens[0]["clip_ids"]
    ids = tok([t["text"] for t in tokens])
    assert ids.tolist() == [t["clip_ids"] for t in tokens]


def test_vocab_without_specials(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a</w>": 0, "<|endoftext|>": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match=r"bos token '<\|startoftext\|>'"):
        load_clip_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(ValueError, match="vocab.json"):
        load_clip_tokenizer(tmp_path)
