"""Train the mini model's two tokenizers on the caption vocabulary with the `tokenizers` library, and save them
in the files the real FLUX download ships, so nunchaku_lite.tokenizers reads them unchanged.

- CLIP-style (tokenizer/): byte-level BPE with `</w>` word ends, saved as vocab.json + merges.txt in CLIP's
  vocabulary order: 256 byte symbols, the same 256 with `</w>`, one entry per merge, then `<|startoftext|>`
  and `<|endoftext|>` last (the CLIP text model pools at the largest id, which must be EOS).
- T5-style (tokenizer_2/): Unigram saved as tokenizer.json with `<pad>`=0, `</s>`=1, `<unk>`=2, a Metaspace
  pre-tokenizer and a lowercasing normalizer (captions are lower case; prompts need not be). Its pieces are
  the caption words scored by log frequency (see `train_t5_unigram` for why no EM trainer is used).

    python -m nunchaku_lite.mini.tokenizer OUT_DIR      # writes OUT_DIR/tokenizer and OUT_DIR/tokenizer_2
"""
import json
import math
import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, decoders, trainers

from .data import all_captions_vocabulary, make_captions

CLIP_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
T5_SPECIALS = ("<pad>", "</s>", "<unk>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character map: printable Latin-1 bytes map to themselves, the other 68 to
    chr(256 + n) in byte order. The dict's order (printable first) is CLIP's vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def training_captions(n_samples: int = 2000) -> list[str]:
    """Every single-shape caption form plus sampled two-shape captions (the words 'and' etc.)."""
    sampled = make_captions(n_samples, seed=4321)
    return all_captions_vocabulary() + [c for c in sampled if " and " in c]


def train_clip_bpe(captions: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE with `</w>` suffixes, in CLIP's vocabulary order."""
    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # A vocabulary far larger than needed: training stops once every caption word is one token.
    trainer = trainers.BpeTrainer(vocab_size=4096, min_frequency=1, show_progress=False, end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(captions, trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(tok.to_str())["model"]["merges"]]
    base = list(bytes_to_unicode().values())
    symbols = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {s: i for i, s in enumerate(symbols)}
    if len(vocab) != len(symbols):
        raise RuntimeError("BPE training produced a merge whose result repeats an existing symbol")
    for a, b in merges:
        if a not in vocab or b not in vocab:
            raise RuntimeError(f"merge {a!r} {b!r} uses a symbol missing from the vocabulary")
    return vocab, merges


def save_clip_tokenizer(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int = 77):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"lstrip": False, "rstrip": False, "single_word": False}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(vocab[BOS]): {"content": BOS, "normalized": True, **special, "special": True},
                                 str(vocab[EOS]): {"content": EOS, "normalized": False, **special, "special": True}},
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
        "clean_up_tokenization_spaces": True, "do_lower_case": True, "errors": "replace",
        "model_max_length": max_length, "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    smap = {"bos_token": {"content": BOS, "normalized": True, **special}}
    smap.update({k: {"content": EOS, "normalized": False, **special} for k in ("eos_token", "pad_token", "unk_token")})
    (folder / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n")


def train_t5_unigram(captions: list[str]) -> Tokenizer:
    """Unigram model whose pieces are the caption words ("▁red", ...) scored by their log frequency in the
    captions, plus single characters (and "▁") at a low score so any other text still tokenizes.

    This is the maximum-likelihood Unigram model for a corpus in which every word is a piece, which is what
    EM converges to here. We set it directly because the `tokenizers` UnigramTrainer (and sentencepiece's)
    prune a 40-word corpus down to ~60 mostly one-character pieces, whatever vocab_size is asked for."""
    words: dict[str, int] = {}
    for c in captions:
        for w in c.lower().split():
            words["▁" + w] = words.get("▁" + w, 0) + 1
    total = sum(words.values())
    chars = sorted({ch for w in words for ch in w} | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-\"()&:;/"))
    char_score = math.log(1 / total) - 10.0  # below any word, so words win wherever they apply
    pieces = [(s, 0.0) for s in T5_SPECIALS]
    pieces += [(w, math.log(n / total)) for w, n in sorted(words.items(), key=lambda kv: -kv[1])]
    pieces += [(ch, char_score) for ch in chars if ch not in words]
    tok = Tokenizer(models.Unigram(pieces, unk_id=T5_SPECIALS.index("<unk>"), byte_fallback=False))
    # Lowercase: the captions are lower case, and "A red circle" should read like "a red circle".
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(),
                                           normalizers.Strip(left=False, right=True),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return tok


def save_t5_tokenizer(folder: Path, tok: Tokenizer, max_length: int):
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    special = {"lstrip": False, "rstrip": False, "single_word": False, "normalized": False, "special": True}
    config = {"added_tokens_decoder": {str(i): {"content": s, **special} for i, s in enumerate(T5_SPECIALS)},
              "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "extra_ids": 0,
              "model_max_length": max_length, "tokenizer_class": "T5Tokenizer", "legacy": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2) + "\n")


def train_tokenizers(out_dir, t5_max_length: int = 32, clip_max_length: int = 77) -> dict:
    """Train both and write out_dir/tokenizer (CLIP-style) and out_dir/tokenizer_2 (T5-style).
    Returns {"clip_vocab_size": int, "t5_vocab_size": int}."""
    out_dir = Path(out_dir)
    captions = training_captions()
    vocab, merges = train_clip_bpe(captions)
    save_clip_tokenizer(out_dir / "tokenizer", vocab, merges, clip_max_length)
    t5 = train_t5_unigram(captions)
    save_t5_tokenizer(out_dir / "tokenizer_2", t5, t5_max_length)
    return {"clip_vocab_size": len(vocab), "t5_vocab_size": t5.get_vocab_size()}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m nunchaku_lite.mini.tokenizer OUT_DIR")
    print(train_tokenizers(sys.argv[1]))
