"""The two FLUX tokenizers, built on the `tokenizers` library so their ids equal Hugging Face's exactly.

CLIPTokenizer: byte-level BPE from `vocab.json` + `merges.txt` (or a `tokenizer.json`), output
    [BOS] + ids[:max_length-2] + [EOS], padded with the pad id (= EOS for CLIP-L) to max_length (77).
T5Tokenizer: SentencePiece unigram from `spiece.model` or `tokenizer.json`, output
    ids[:max_length-1] + [EOS], padded with <pad> to max_length (256 for schnell, 512 for dev).

Both take a string or a list of strings and return a LongTensor [B, max_length]; `encode_with_lengths` also
returns each prompt's untruncated token count (specials included) so a caller can warn about truncation.
Special ids are looked up in the files, never hard-coded, so small custom vocabularies work too.
"""
import json
import re
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

__all__ = ["CLIPTokenizer", "T5Tokenizer", "load_clip_tokenizer", "load_t5_tokenizer"]

# CLIP's word splitter (OpenAI simple_tokenizer): contractions, letter runs, single digits, punctuation runs.
CLIP_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _as_prompt_list(prompts, arg_name="prompts") -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts):
        return list(prompts)
    raise TypeError(f"{arg_name} must be a str or a list of str, got {type(prompts).__name__}"
                    + (f" containing {sorted({type(p).__name__ for p in prompts if not isinstance(p, str)})}"
                       if isinstance(prompts, (list, tuple)) else ""))


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _token_name(entry, default: str) -> str:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(entry, dict):
        return entry.get("content", default)
    return entry if isinstance(entry, str) else default


def _pad_batch(rows: list[list[int]], max_length: int, pad_id: int) -> torch.Tensor:
    out = torch.full((len(rows), max_length), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class CLIPTokenizer:
    """CLIP byte-level BPE (lowercasing, whitespace collapsed, `</w>` word ends), as HF's CLIPTokenizer."""

    def __init__(self, tokenizer: Tokenizer, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                 pad_token=None, max_length: int = 77, source: str = "<tokenizer>"):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for BOS and EOS), got {max_length}")
        self.tokenizer, self.max_length = tokenizer, max_length
        names = {"bos": bos_token, "eos": eos_token, "pad": pad_token or eos_token}
        ids = {role: tokenizer.token_to_id(token) for role, token in names.items()}
        missing = [f"{role} token {names[role]!r}" for role, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{source}: vocabulary lacks the {', '.join(missing)}")
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]

    @classmethod
    def from_files(cls, vocab_file, merges_file, max_length: int = 77, config_file=None) -> "CLIPTokenizer":
        """Build the BPE pipeline HF builds for CLIP from `vocab.json` + `merges.txt`."""
        vocab_file, merges_file = Path(vocab_file), Path(merges_file)
        for p in (vocab_file, merges_file):
            if not p.is_file():
                raise FileNotFoundError(f"CLIP tokenizer file not found: {p}")
        vocab = _read_json(vocab_file)
        with open(merges_file, encoding="utf-8") as f:
            lines = f.read().split("\n")
        # First line is the "#version: 0.2" header; merges are "left right" in priority order.
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise ValueError(f"{merges_file}: malformed merge line {' '.join(bad[0])!r}")
        config = _read_json(Path(config_file)) if config_file and Path(config_file).is_file() else {}
        bos = _token_name(config.get("bos_token"), "<|startoftext|>")
        eos = _token_name(config.get("eos_token"), "<|endoftext|>")
        pad = _token_name(config.get("pad_token"), eos)
        unk = _token_name(config.get("unk_token"), eos)

        tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        # Literal "<|startoftext|>" / "<|endoftext|>" in a prompt become the special ids, as in HF. The
        # `normalized` flags follow tokenizer_config.json (HF: BOS matched after lowercasing, EOS verbatim).
        flags = {v.get("content"): v for v in config.get("added_tokens_decoder", {}).values()}
        tok.add_special_tokens([
            AddedToken(t, normalized=flags.get(t, {}).get("normalized", t == bos), special=True)
            for t in dict.fromkeys((bos, eos, pad)) if t in vocab])
        return cls(tok, bos, eos, pad, max_length, source=str(vocab_file.parent))

    @classmethod
    def from_tokenizer_json(cls, path, max_length: int = 77, config_file=None) -> "CLIPTokenizer":
        """A complete `tokenizers` pipeline (e.g. CLIPTokenizerFast's tokenizer.json); its post-processor is
        not used (BOS/EOS are added here, after truncation)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"CLIP tokenizer file not found: {path}")
        config = _read_json(Path(config_file)) if config_file and Path(config_file).is_file() else {}
        eos = _token_name(config.get("eos_token"), "<|endoftext|>")
        return cls(Tokenizer.from_file(str(path)), _token_name(config.get("bos_token"), "<|startoftext|>"), eos,
                   _token_name(config.get("pad_token"), eos), max_length, source=str(path))

    def encode_with_lengths(self, prompts) -> tuple[torch.Tensor, list[int]]:
        """(ids [B, max_length], untruncated token counts including BOS and EOS)."""
        prompts = _as_prompt_list(prompts)
        bodies = [e.ids for e in self.tokenizer.encode_batch(prompts, add_special_tokens=False)]
        keep = self.max_length - 2
        rows = [[self.bos_id] + body[:keep] + [self.eos_id] for body in bodies]
        return _pad_batch(rows, self.max_length, self.pad_id), [len(b) + 2 for b in bodies]

    def __call__(self, prompts) -> torch.Tensor:
        return self.encode_with_lengths(prompts)[0]


class _SentencePieceBackend:
    """spiece.model through `sentencepiece`, plus HF's handling of literal special tokens in the text:
    `</s>`, `<pad>`, `<unk>` and `<extra_id_N>` become their ids (HF appends the extra ids after the pieces in
    reverse order: `<extra_id_0>` = pieces + extra_ids - 1 = 32099 for T5), and the text between them is
    encoded segment by segment."""

    def __init__(self, path: Path, extra_ids: int = 100):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        n = self.sp.get_piece_size()
        self.specials = {self.sp.id_to_piece(i): i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self.specials.update({f"<extra_id_{k}>": n + extra_ids - 1 - k for k in range(extra_ids)})
        self.glue_prefix = "<unk>"
        self.glue_len = len(self.sp.encode(self.glue_prefix))
        self.split_re = re.compile("(" + "|".join(map(re.escape, sorted(self.specials, key=len, reverse=True))) + ")")

    def token_to_id(self, token: str):
        if token in self.specials:
            return self.specials[token]
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None

    def encode(self, text: str) -> list[int]:
        ids = []
        for i, part in enumerate(self.split_re.split(text)):
            if i % 2:
                ids.append(self.specials[part])
            elif part:
                ids.extend(self._encode_piece(part, at_start=(i == 0)))
        return ids

    def _encode_piece(self, text: str, at_start: bool) -> list[int]:
        # sentencepiece always prepends "▁" (add_dummy_prefix). HF does so only at the start of the prompt
        # or where a space precedes the text, so text glued to a special token ("x<extra_id_0>y") is
        # encoded behind a throwaway prefix whose pieces are then dropped (HF's own slow-tokenizer trick).
        if at_start or text[0].isspace():
            return self.sp.encode(text)
        return self.sp.encode(self.glue_prefix + text)[self.glue_len:]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


class _TokenizersBackend:
    def __init__(self, path: Path):
        self.tok = Tokenizer.from_file(str(path))

    def token_to_id(self, token: str):
        return self.tok.token_to_id(token)

    def encode_batch(self, texts):
        # No post-processor: EOS is appended by T5Tokenizer after truncation.
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]


class T5Tokenizer:
    """T5 SentencePiece unigram: no BOS, `</s>` appended after truncation, `<pad>` padding."""

    def __init__(self, backend, max_length: int = 512, eos_token="</s>", pad_token="<pad>", source="<tokenizer>"):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.backend, self.max_length = backend, max_length
        self.eos_id, self.pad_id = backend.token_to_id(eos_token), backend.token_to_id(pad_token)
        for name, tok, i in (("eos", eos_token, self.eos_id), ("pad", pad_token, self.pad_id)):
            if i is None:
                raise ValueError(f"{source}: vocabulary lacks the {name} token {tok!r}")

    @classmethod
    def from_file(cls, path, max_length: int = 512, extra_ids: int = 100) -> "T5Tokenizer":
        """`spiece.model` (sentencepiece) or `tokenizer.json` (tokenizers); both give the same ids.
        `extra_ids`: number of `<extra_id_N>` sentinels HF appends to a spiece.model (100 for T5)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"T5 tokenizer file not found: {path}")
        backend = _TokenizersBackend(path) if path.suffix == ".json" else _SentencePieceBackend(path, extra_ids)
        return cls(backend, max_length, source=str(path))

    def encode_with_lengths(self, prompts) -> tuple[torch.Tensor, list[int]]:
        """(ids [B, max_length], untruncated token counts including EOS)."""
        prompts = _as_prompt_list(prompts)
        bodies = self.backend.encode_batch(prompts)
        rows = [body[: self.max_length - 1] + [self.eos_id] for body in bodies]
        return _pad_batch(rows, self.max_length, self.pad_id), [len(b) + 1 for b in bodies]

    def __call__(self, prompts) -> torch.Tensor:
        return self.encode_with_lengths(prompts)[0]


def load_clip_tokenizer(folder, max_length: int = 77) -> CLIPTokenizer:
    """CLIP tokenizer from a folder with `vocab.json` + `merges.txt` (preferred, what FLUX ships) or `tokenizer.json`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"CLIP tokenizer folder not found: {folder}")
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return CLIPTokenizer.from_files(folder / "vocab.json", folder / "merges.txt", max_length,
                                        config_file=folder / "tokenizer_config.json")
    if (folder / "tokenizer.json").is_file():
        return CLIPTokenizer.from_tokenizer_json(folder / "tokenizer.json", max_length,
                                                 config_file=folder / "tokenizer_config.json")
    raise FileNotFoundError(f"{folder}: no CLIP tokenizer files; expected vocab.json + merges.txt, or tokenizer.json")


def load_t5_tokenizer(folder, max_length: int = 512) -> T5Tokenizer:
    """T5 tokenizer from a folder with `spiece.model` (preferred) or `tokenizer.json`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"T5 tokenizer folder not found: {folder}")
    config_file = folder / "tokenizer_config.json"
    extra_ids = _read_json(config_file).get("extra_ids", 100) if config_file.is_file() else 100
    for name in ("spiece.model", "tokenizer.json"):
        if (folder / name).is_file():
            return T5Tokenizer.from_file(folder / name, max_length, extra_ids)
    raise FileNotFoundError(f"{folder}: no T5 tokenizer files; expected spiece.model or tokenizer.json")
