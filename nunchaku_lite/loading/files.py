"""Safetensors IO: lazy views of one file or a sharded set, tensors fetched one at a time.

A `Checkpoint` knows every key, shape and dtype from the file headers alone (nothing is read or mapped until a
tensor is asked for), so loaders can plan a whole model, check it, and then stream the weights straight to their
target device and dtype. Pickle checkpoints are refused without being opened: unpickling runs arbitrary code.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_SUFFIX = ".safetensors.index.json"
# Standard weight-file names, tried first when a folder holds several safetensors files (e.g. fp16 variants).
PREFERRED_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # same bound as the safetensors library

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be used; the message names the file (and key, if any)."""


class PickleCheckpointError(CheckpointError):
    """A pickle checkpoint (.bin/.pt/.ckpt/...): refused, never unpickled."""


def refuse_pickle(path: Path) -> None:
    raise PickleCheckpointError(
        f"{path}: pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) are not loaded, because unpickling can run "
        "arbitrary code. Use the .safetensors file of this model instead (most FLUX downloads ship one; "
        "a trusted pickle can be converted with safetensors.torch.save_file).")


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor: enough to plan a load without reading data."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header (8-byte little-endian length + JSON) -> ({key: TensorInfo}, metadata).

    Only the header bytes are read. Anything inconsistent raises CheckpointError naming the file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise CheckpointError(f"{path}: corrupt safetensors header (declared header length {n} bytes, "
                                  f"file has {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    infos = {}
    for key, entry in header.items():
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(s) for s in shape)
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for key '{key}' ({e!r})") from None
        if dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: key '{key}' has dtype {dtype_name}, which this torch cannot hold")
        if not (0 <= begin <= end <= data_size):
            raise CheckpointError(f"{path}: key '{key}' points outside the file (offsets {begin}..{end}, "
                                  f"{data_size} data bytes): the file is truncated or corrupt")
        infos[key] = TensorInfo(shape, SAFETENSORS_DTYPES[dtype_name], path)
    return infos, {str(k): str(v) for k, v in metadata.items()}


class Checkpoint:
    """Lazy view of one safetensors file or a sharded set (keys, shapes, dtypes, metadata; tensors on demand).

    `get(key, device, dtype)` reads one memory-mapped tensor and converts it straight to the target; float8
    weights (e.g. t5xxl_fp8_e4m3fn.safetensors) are upcast there. Use as a context manager or call close().
    """

    def __init__(self, files, description: str | None = None):
        self.files = [Path(f) for f in files]
        if not self.files:
            raise CheckpointError(f"{description or 'checkpoint'}: no safetensors files")
        self.description = description or str(self.files[0] if len(self.files) == 1 else self.files[0].parent)
        self.infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for f in self.files:
            infos, metadata = read_header(f)
            for key, info in infos.items():
                if key in self.infos:
                    raise CheckpointError(f"key '{key}' is in both {self.infos[key].file} and {f}")
                self.infos[key] = info
            self.metadata.update(metadata)
        self._handles = {}

    @classmethod
    def open(cls, path) -> "Checkpoint":
        """Open a .safetensors file, a `*.safetensors.index.json`, or a folder holding either."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.is_dir():
            return cls(find_weight_files(path), description=str(path))
        if path.name.endswith(INDEX_SUFFIX):
            return cls(shards_from_index(path), description=str(path))
        if path.suffix.lower() in PICKLE_SUFFIXES:
            refuse_pickle(path)
        if path.suffix.lower() != ".safetensors":
            raise CheckpointError(f"{path}: not a .safetensors file (expected a safetensors checkpoint, "
                                  "a *.safetensors.index.json, or a folder holding them)")
        return cls([path])

    # -- header-only queries -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key) -> bool:
        return key in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def __iter__(self):
        return iter(self.infos)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: i.shape for k, i in self.infos.items()}

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return self._info(key).dtype

    def file_of(self, key: str) -> Path:
        return self._info(key).file

    def float_dtype(self) -> torch.dtype:
        """Most common stored floating dtype by element count (float8 counts as bfloat16: compute needs 16 bits)."""
        counts: dict[torch.dtype, int] = {}
        for info in self.infos.values():
            if info.dtype.is_floating_point:
                dt = torch.bfloat16 if info.dtype in FP8_DTYPES else info.dtype
                counts[dt] = counts.get(dt, 0) + max(1, math.prod(info.shape))
        return max(counts, key=counts.get) if counts else torch.float32

    def _info(self, key: str) -> TensorInfo:
        try:
            return self.infos[key]
        except KeyError:
            raise KeyError(f"key '{key}' not found in {self.description}") from None

    # -- data --------------------------------------------------------------------------------------------
    def get(self, key: str, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor and move it to device/dtype in one conversion (integer tensors keep their dtype).

        With dtype None, float8 tensors are upcast to bfloat16 and other dtypes are kept.
        """
        info = self._info(key)
        handle = self._handle(info.file)
        try:
            t = handle.get_tensor(key)
        except Exception as e:  # the library's own error type differs across versions
            raise CheckpointError(f"{info.file}: cannot read tensor '{key}' ({e})") from None
        if t.dtype.is_floating_point:
            target = dtype if dtype is not None else (torch.bfloat16 if t.dtype in FP8_DTYPES else t.dtype)
            return aligned(t.to(device=device, dtype=target))
        return aligned(t if device is None else t.to(device))

    def _handle(self, file: Path):
        if file not in self._handles:
            from safetensors import safe_open
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:
                raise CheckpointError(f"{file}: cannot open as safetensors ({e})") from None
        return self._handles[file]

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"Checkpoint({self.description!r}, {len(self.infos)} tensors in {len(self.files)} file(s))"


def aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """A CPU tensor read from a file can start at any byte offset; CPU BLAS picks different (SIMD) code paths
    by alignment, so a misaligned weight gives results that differ in the last bit from the same weight in
    freshly allocated memory. Copy such a tensor (one tensor at a time, never the whole model)."""
    if t.device.type == "cpu" and t.numel() and t.data_ptr() % alignment:
        return t.clone()
    return t


def shards_from_index(index_path: Path) -> list[Path]:
    """Shard files named by a `*.safetensors.index.json` (each must exist next to it)."""
    index_path = Path(index_path)
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_path}: not a valid safetensors index (needs a 'weight_map'; {e!r})") from None
    shards = []
    for name in names:
        shard = index_path.parent / name
        if not shard.is_file():
            raise FileNotFoundError(f"shard '{name}' listed in {index_path} is missing ({shard})")
        shards.append(shard)
    if not shards:
        raise CheckpointError(f"{index_path}: the index lists no shard files")
    return shards


def find_weight_files(folder: Path) -> list[Path]:
    """The safetensors files that make up the checkpoint in `folder`.

    Order of preference: a `*.safetensors.index.json` (sharded), a standard file name, the only safetensors
    file, or all of them when there are several with disjoint keys (checked when they are opened).
    """
    folder = Path(folder)
    indexes = sorted(p for p in folder.glob("*" + INDEX_SUFFIX) if p.is_file())
    if len(indexes) > 1:
        standard = [p for p in indexes if p.name[: -len(INDEX_SUFFIX)] + ".safetensors" in PREFERRED_NAMES]
        if len(standard) == 1:
            indexes = standard
        else:
            raise CheckpointError(f"{folder}: several safetensors index files ({', '.join(p.name for p in indexes)});"
                                  " pass the one to use")
    if indexes:
        return shards_from_index(indexes[0])
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    for name in PREFERRED_NAMES:
        if folder / name in files:
            return [folder / name]
    if files:
        return files
    pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        refuse_pickle(pickles[0])
    raise CheckpointError(f"{folder}: no weights found (expected a *.safetensors file or a sharded "
                          f"*{INDEX_SUFFIX} with its shards)")


def read_json(path, what: str = "JSON file") -> dict:
    """Read a JSON object, raising errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def write_atomic(path, data: bytes) -> None:
    """Write bytes to `path` via a temporary file in the same folder and a rename (no half-written files)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
