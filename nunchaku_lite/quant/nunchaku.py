"""Import of Nunchaku's INT4 SVDQuant FLUX checkpoints into our quantized Flux (layout: NUNCHAKU_FORMAT.md).

Containers: the single file `svdq-int4_r32-flux.1-{dev,schnell}.safetensors` (metadata `config`,
`quantization_config`, `model_class`) and the legacy folder (`transformer_blocks.safetensors`,
`unquantized_layers.safetensors`, `config.json`). NVFP4 files (any float8 tensor, `wcscales`/`wtscale`, or an
fp4 dtype in quantization_config) are refused.

Layout facts this code relies on (section numbers of NUNCHAKU_FORMAT.md; every packed tensor is read as a
flat row-major stream, the stored shapes are only checked):
  §3.1 W4A4 qweight (int8, [N, K/2]): 32-bit little-endian words in radix order (n//128, k//64, (n%128)//16,
       n%8, (k%32)//8, (n%16)//8, (k%64)//32); nibble j = k%8 at bits 4j..4j+3 (low nibble of a byte = even j);
       two's-complement signed codes.
  §3.2 W4A4 wscales ([K/64, N]): per 128-channel tile all groups consecutively, channel r = a*16+b*8+c*2+d of
       the tile at position a*16+c*4+b*2+d.
  §3.3 bias, smooth: the same within-128 permutation, no group index. `smooth_orig` is ignored.
  §3.4 lora_down (stored [K, R], means down[r, c] with act = x @ down^T) and lora_up ([N, R]): 16x16 tiles of
       256 elements, non-rank dimension major; inside a tile (rank row r%8, col pair (c%8)//2, r half, c half,
       c%2) for down and (n%8, (r%8)//2, n half, r half, r%2) for up. lora_down reads the RAW input.
  §3.5 W4A16 qweight (int32, [N/4, K/2]): little-endian uint16 t = (n'//4)*K + (k//64)*64 + (n'%4)*16 +
       ((k%64)//32)*8 + k%8 holds nibble a = (k%32)//8 at bits 4a; unsigned codes, w = U*s + z.
  §3.5/3.6 AdaLN rows are interleaved: stored row n' = j*S + c is row c*Dm + j (S = 6 double, 3 single);
       wscales/wzeros are plain [G, n'] (trailing all-zero group rows allowed); the bias of chunks 1 and S-2
       (the scales) holds +1, removed here because our Modulation computes (1 + scale).
  §4.1/4.2 Forward: signed u4/s4 activations per token and 64-group of (x + s) / smooth, s = 0.171875 for the
       FFN second linears (mlp_fc2, mlp_context_fc2; known by name only), else 0. The shift is compensated in
       the stored bias, which is kept as is.
  §2.2/4.6 Single blocks: linear2 = out_proj (first D inputs, signed, bias all zeros) + mlp_fc2 (last F
       inputs, unsigned), summed: a `SplitInputLinear`. linear1 = qkv_proj rows then mlp_fc1 rows; they share
       one smooth vector, so they become ONE W4A4Linear (rows concatenated, rank 2R with a block-diagonal
       lora_up; exact); if a file's smooth vectors differ, a `ConcatOutputLinear` of two layers is used.
  §2.3 Unquantized tensors use diffusers names; norm_out.linear rows are [scale; shift] (swapped here).

Differences from Nunchaku's engine, by design: our activation scales stay float32 (Nunchaku rounds them to
bf16/fp16 for the GEMM but computes the codes with the fp32 scale) and our group partial sums accumulate in
float32 (Nunchaku: bf16/fp16), so outputs agree to 16-bit rounding, not bit for bit. The codes are identical.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..loading.keys_dit import _RENAMES as DIFFUSERS_RENAMES, params_from_config, params_from_shapes
from . import ops
from .format import build_quantized_flux, load_tensors_into
from .modules import ConcatOutputLinear, SplitInputLinear, W4A4Linear, W4A16Linear

BLOCK_FILE, UNQUANT_FILE = "transformer_blocks.safetensors", "unquantized_layers.safetensors"
SHIFT = ops.UNSIGNED_SHIFT
W4A4_FIELDS = ("qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up")
W4A16_FIELDS = ("qweight", "wscales", "wzeros", "bias")

# Nunchaku layer name in a double block -> (our BFL module path, activation unsigned?)
DOUBLE_W4A4 = {
    "qkv_proj": ("img_attn.qkv", False), "qkv_proj_context": ("txt_attn.qkv", False),
    "out_proj": ("img_attn.proj", False), "out_proj_context": ("txt_attn.proj", False),
    "mlp_fc1": ("img_mlp.0", False), "mlp_fc2": ("img_mlp.2", True),
    "mlp_context_fc1": ("txt_mlp.0", False), "mlp_context_fc2": ("txt_mlp.2", True),
}
DOUBLE_W4A16 = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"}
DOUBLE_NORMS = {
    "norm_q.weight": "img_attn.norm.query_norm.scale", "norm_k.weight": "img_attn.norm.key_norm.scale",
    "norm_added_q.weight": "txt_attn.norm.query_norm.scale", "norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
SINGLE_NORMS = {"norm_q.weight": "norm.query_norm.scale", "norm_k.weight": "norm.key_norm.scale"}
# diffusers name of the 16-bit layers outside the blocks -> BFL name: the diffusers loader's top-level renames,
# plus the final modulation, whose rows are [scale; shift] there and [shift; scale] in BFL (swapped on import)
UNQUANTIZED = {d: b for d, b in DIFFUSERS_RENAMES.items() if "{i}" not in d}
UNQUANTIZED["norm_out.linear"] = "final_layer.adaLN_modulation.1"


# ---------------------------------------------------------------------------------------------------------
# Inverse tile permutations (flat stream -> canonical matrices)


def _nibbles(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of t -> int16 nibbles in stream order (low nibble of each byte first)."""
    if sys.byteorder != "little":
        raise RuntimeError("Nunchaku import assumes a little-endian host")
    b = t.contiguous().view(torch.uint8).reshape(-1).to(torch.int16)
    return torch.stack((b & 0xF, b >> 4), dim=-1).reshape(-1)


def _unpermute_128(v: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of the within-128-channel permutation of bias/smooth vectors (§3.3): [N] stream -> [N]."""
    return v.reshape(n // 128, 8, 4, 2, 2).permute(0, 1, 3, 2, 4).reshape(n)


def unpack_w4a4_qweight(qweight: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """§3.1: tiled int8 [N, K/2] -> signed codes int8 [N, K]."""
    nib = _nibbles(qweight).reshape(n // 128, k // 64, 8, 8, 4, 2, 2, 8)  # nt kt np nl kl npk kpk j
    nib = nib.permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(n, k)  # nt np npk nl | kt kpk kl j
    return (nib - ((nib >> 3) << 4)).to(torch.int8)


def unpack_w4a4_wscales(wscales: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """§3.2: tiled [K/64, N] -> [N, G]."""
    w = wscales.reshape(n // 128, groups, 8, 4, 2, 2)  # nt g a c b d
    return w.permute(0, 2, 4, 3, 5, 1).reshape(n, groups)  # nt a b c d | g


def unpack_lora_down(down: torch.Tensor, k: int, r: int) -> torch.Tensor:
    """§3.4: tiled [K, R] -> down [R, K] (act = x @ down^T)."""
    d = down.reshape(k // 16, r // 16, 8, 4, 2, 2, 2)  # ct rt rl kl rp kp e
    return d.permute(1, 4, 2, 0, 5, 3, 6).reshape(r, k)  # rt rp rl | ct kp kl e


def unpack_lora_up(up: torch.Tensor, n: int, r: int) -> torch.Tensor:
    """§3.4: tiled [N, R] -> up [N, R] (y += act @ up^T)."""
    u = up.reshape(n // 16, r // 16, 8, 4, 2, 2, 2)  # nt rt nl kl np kp e
    return u.permute(0, 4, 2, 1, 5, 3, 6).reshape(n, r)  # nt np nl | rt kp kl e


def _deinterleave(t: torch.Tensor, splits: int) -> torch.Tensor:
    """Rows stored j*S + c -> row c*Dm + j (§3.5), along dim 0."""
    n = t.shape[0]
    return t.reshape(n // splits, splits, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def unpack_w4a16_qweight(qweight: torch.Tensor, n: int, k: int, splits: int) -> torch.Tensor:
    """§3.5: int32 [N/4, K/2] -> unsigned codes int8 [N, K] in diffusers/BFL row order."""
    nib = _nibbles(qweight).reshape(n // 4, k // 64, 4, 2, 8, 4)  # Rw ch ri h b a
    nib = nib.permute(0, 2, 1, 3, 5, 4).reshape(n, k)  # Rw ri | ch h a b
    return _deinterleave(nib, splits).to(torch.int8)


# ---------------------------------------------------------------------------------------------------------
# Reading a checkpoint


class _Source:
    """Key -> tensor over one or two safetensors files, opened lazily (safe_open)."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        self.where = {}
        for f, h in zip(files, self.handles):
            for key in h.keys():
                self.where[key] = (f, h)
        self.metadata = {}
        for h in self.handles:
            self.metadata.update(h.metadata() or {})

    def __contains__(self, key):
        return key in self.where

    def keys(self):
        return self.where.keys()

    def get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise ValueError(f"Nunchaku checkpoint {self.files[0].parent if len(self.files) > 1 else self.files[0]}:"
                             f" missing tensor {key!r}")
        return self.where[key][1].get_tensor(key)

    def shape(self, key: str) -> tuple:
        """From the header; reads no data."""
        return tuple(self.where[key][1].get_slice(key).get_shape())

    def dtype_name(self, key: str) -> str:
        """safetensors dtype string ("BF16", "I8", "F8_E4M3", ...) from the header."""
        return self.where[key][1].get_slice(key).get_dtype()


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = [path / BLOCK_FILE, path / UNQUANT_FILE]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{path}: a legacy Nunchaku folder needs {f.name}")
        return files
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"Nunchaku checkpoint not found: {path}")


def is_nunchaku_checkpoint(path) -> bool:
    """True for a Nunchaku single file (its metadata or its `*.qkv_proj.qweight` keys) or legacy folder."""
    path = Path(path)
    if path.is_dir():
        return (path / BLOCK_FILE).is_file() and (path / UNQUANT_FILE).is_file()
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if "quantization_config" in meta or meta.get("model_class", "").startswith("Nunchaku"):
                return True
            return any(k.endswith(".qkv_proj.qweight") for k in f.keys())
    except Exception:  # unreadable: not ours to judge; the generic loader reports it
        return False


def _check_int4(src: _Source, where: str) -> None:
    qc = src.metadata.get("quantization_config")
    if qc:
        try:
            qc_text = json.dumps(json.loads(qc))
        except json.JSONDecodeError:
            qc_text = qc
        if "fp4" in qc_text:
            raise ValueError(f"{where}: this is an NVFP4 Nunchaku checkpoint; only INT4 (svdq-int4_*) files are "
                             "supported")
    for key in src.keys():
        if key.endswith((".wcscales", ".wtscale")):
            raise ValueError(f"{where}: NVFP4 Nunchaku checkpoint (tensor {key!r}); only INT4 files are supported")
    fp8 = next((k for k in src.keys() if src.dtype_name(k).startswith("F8")), None)
    if fp8 is not None:  # Nunchaku's own rule: any float8 tensor means an NVFP4 file
        raise ValueError(f"{where}: NVFP4 Nunchaku checkpoint (float8 tensor {fp8!r}); only INT4 files are "
                         "supported")
    if not any(k.endswith(".qkv_proj.wscales") for k in src.keys()):
        raise ValueError(f"{where}: no quantized layers found (no '*.qkv_proj.wscales'): not a Nunchaku checkpoint")


def _config(src: _Source, path: Path) -> dict | None:
    text = src.metadata.get("config")
    if text is None and path.is_dir() and (path / "config.json").is_file():
        text = (path / "config.json").read_text()
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt Nunchaku config JSON ({e})") from None


def _native_shapes(src: _Source) -> dict[str, tuple]:
    """Native (BFL) key -> shape for the tensors that tell FluxParams, from the Nunchaku header alone."""
    shapes = {}
    for dname, bname in UNQUANTIZED.items():
        for field in ("weight", "bias"):
            if f"{dname}.{field}" in src:
                shapes[f"{bname}.{field}"] = src.shape(f"{dname}.{field}")
    for key in src.keys():
        parts = key.split(".")
        if len(parts) < 3 or parts[0] not in ("transformer_blocks", "single_transformer_blocks"):
            continue
        ours = ("double_blocks." if parts[0] == "transformer_blocks" else "single_blocks.") + parts[1]
        layer = ".".join(parts[2:-1])
        if layer == "norm_q":
            norm = ".img_attn.norm.query_norm.scale" if parts[0] == "transformer_blocks" else ".norm.query_norm.scale"
            shapes[ours + norm] = src.shape(key)
        elif parts[-1] == "qweight" and layer in ("mlp_fc1", "qkv_proj"):
            n, half_k = src.shape(key)
            if parts[0] == "transformer_blocks":
                target = ".img_mlp.0" if layer == "mlp_fc1" else ".img_attn.qkv"
                shapes[f"{ours}{target}.weight"], shapes[f"{ours}{target}.bias"] = (n, 2 * half_k), (n,)
            else:  # linear1 = qkv_proj rows + mlp_fc1 rows
                rows = shapes.get(f"{ours}.linear1.weight", (0,))[0] + n
                shapes[f"{ours}.linear1.weight"], shapes[f"{ours}.linear1.bias"] = (rows, 2 * half_k), (rows,)
    return shapes


def _params(src: _Source, path: Path):
    config = _config(src, path)
    if config is not None:
        return params_from_config(config)
    return params_from_shapes(_native_shapes(src))


# ---------------------------------------------------------------------------------------------------------
# Layer conversion: Nunchaku tensors -> our module buffers (canonical layout)


class _Converter:
    def __init__(self, src: _Source, where: str, device, dtype, act_quant):
        self.src, self.where, self.device, self.dtype, self.act_quant = src, where, device, dtype, act_quant

    def _get(self, key: str, shape: tuple) -> torch.Tensor:
        t = self.src.get(key)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{self.where}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t.to(self.device)

    def w4a4(self, prefix: str, n: int, k: int, unsigned: bool) -> tuple[W4A4Linear, dict]:
        """One W4A4 layer -> (empty module on meta, {buffer: tensor})."""
        for field in ("qweight", "wscales", "smooth", "lora_down", "lora_up"):
            if f"{prefix}.{field}" not in self.src:
                raise ValueError(f"{self.where}: missing tensor {prefix}.{field!s}")
        r = self.src.shape(f"{prefix}.lora_down")[-1]
        if r % 16:
            raise ValueError(f"{self.where}: {prefix}.lora_down rank {r} is not a multiple of 16")
        g = k // ops.GROUP
        codes = unpack_w4a4_qweight(self._get(f"{prefix}.qweight", (n, k // 2)), n, k)
        bufs = {
            "qweight": ops.pack_int4(codes),
            "wscales": unpack_w4a4_wscales(self._get(f"{prefix}.wscales", (g, n)), n, g),
            "smooth": _unpermute_128(self._get(f"{prefix}.smooth", (k,)), k).float(),
            "lora_down": unpack_lora_down(self._get(f"{prefix}.lora_down", (k, r)), k, r).to(self.dtype),
            "lora_up": unpack_lora_up(self._get(f"{prefix}.lora_up", (n, r)), n, r).to(self.dtype),
        }
        has_bias = f"{prefix}.bias" in self.src
        if has_bias:
            bufs["bias"] = _unpermute_128(self._get(f"{prefix}.bias", (n,)), n).to(self.dtype)
        with torch.device("meta"):
            m = W4A4Linear(k, n, r, bias=has_bias, act_unsigned=unsigned, act_shift=SHIFT if unsigned else 0.0,
                           act_quant=self.act_quant)
        return m, bufs

    def w4a16(self, prefix: str, n: int, k: int, splits: int) -> tuple[W4A16Linear, dict]:
        g = -(-k // ops.GROUP)
        codes = unpack_w4a16_qweight(self._get(f"{prefix}.qweight", (n // 4, k // 2)), n, k, splits)
        scales, zeros = (self.src.get(f"{prefix}.{f}") for f in ("wscales", "wzeros"))
        for name, t in (("wscales", scales), ("wzeros", zeros)):
            if t.dim() != 2 or t.shape[1] != n or t.shape[0] < g:
                raise ValueError(f"{self.where}: {prefix}.{name} has shape {tuple(t.shape)}, expected [{g}, {n}]")
            if t.shape[0] > g and t[g:].any():
                raise ValueError(f"{self.where}: {prefix}.{name} has non-zero padding groups beyond {g}")
        bias = _deinterleave(self._get(f"{prefix}.bias", (n,)), splits).float()
        # the scale chunks (1 and S-2) carry +1 for Nunchaku's `norm(x) * scale`; ours adds the 1 itself
        dm = n // splits
        for c in sorted({1, splits - 2}):  # S=6: chunks 1, 4; S=3: chunk 1 (once)
            bias[c * dm:(c + 1) * dm] -= 1.0
        bufs = {
            "qweight": ops.pack_int4(codes),
            "wscales": _deinterleave(scales[:g].T.to(self.device), splits).contiguous(),
            "wzeros": _deinterleave(zeros[:g].T.to(self.device), splits).contiguous(),
            "bias": bias.to(self.dtype),
        }
        with torch.device("meta"):
            m = W4A16Linear(k, n, bias=True, zero_point=True, scale_dtype=scales.dtype)
        return m, bufs


def _merge_rows(a: tuple[W4A4Linear, dict], b: tuple[W4A4Linear, dict], act_quant: bool):
    """Two W4A4 layers reading the same input with the same smooth -> one layer with rows [a; b] (exact)."""
    (ma, ta), (mb, tb) = a, b
    ra, rb = ma.rank, mb.rank
    up = torch.zeros(ma.out_features + mb.out_features, ra + rb, dtype=ta["lora_up"].dtype,
                     device=ta["lora_up"].device)
    up[: ma.out_features, :ra] = ta["lora_up"]
    up[ma.out_features:, ra:] = tb["lora_up"]
    bufs = {
        "qweight": torch.cat((ta["qweight"], tb["qweight"])),
        "wscales": torch.cat((ta["wscales"], tb["wscales"])),
        "smooth": ta["smooth"],
        "lora_down": torch.cat((ta["lora_down"], tb["lora_down"])),
        "lora_up": up,
        "bias": torch.cat((ta["bias"], tb["bias"])),
    }
    with torch.device("meta"):
        m = W4A4Linear(ma.in_features, ma.out_features + mb.out_features, ra + rb, act_quant=act_quant)
    return m, bufs


def _known_keys(params) -> set[str]:
    """Every tensor name a Nunchaku INT4 file of this FLUX may hold (anything else is refused)."""
    keys = {f"{d}.{f}" for d in UNQUANTIZED for f in ("weight", "bias")}
    for i in range(params.depth):
        pre = f"transformer_blocks.{i}"
        keys |= {f"{pre}.{n}.{f}" for n in DOUBLE_W4A4 for f in W4A4_FIELDS}
        keys |= {f"{pre}.{n}.{f}" for n in DOUBLE_W4A16 for f in W4A16_FIELDS}
        keys |= {f"{pre}.{n}" for n in DOUBLE_NORMS}
    for i in range(params.depth_single_blocks):
        pre = f"single_transformer_blocks.{i}"
        keys |= {f"{pre}.{n}.{f}" for n in ("qkv_proj", "mlp_fc1", "out_proj", "mlp_fc2") for f in W4A4_FIELDS}
        keys |= {f"{pre}.norm.linear.{f}" for f in W4A16_FIELDS}
        keys |= {f"{pre}.{n}" for n in SINGLE_NORMS}
    return keys


def load_nunchaku_transformer(path, device=None, dtype: torch.dtype | None = None,
                              act_quant: bool = True) -> nn.Module:
    """Import a Nunchaku INT4 FLUX checkpoint (single file or legacy folder) -> our quantized Flux, eval mode.

    dtype: model dtype for biases, low-rank factors and the 16-bit layers (default: the stored dtype of the
    quantized layers' scales, bf16 for published files). Codes and weight scales are kept exactly.
    act_quant=False: 16-bit activations in the W4A4 layers (layer-by-layer checks of the import).
    """
    path = Path(path)
    src = _Source(_files(path))
    where = str(path)
    _check_int4(src, where)
    params = _params(src, path)
    unknown = sorted(set(src.keys()) - _known_keys(params))
    if unknown:
        raise ValueError(f"{where}: unexpected tensors for a FLUX.1 model with {params.depth} double and "
                         f"{params.depth_single_blocks} single blocks: {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    probe = next(k for k in src.keys() if k.endswith(".qkv_proj.wscales"))
    dtype = dtype or src.get(probe).dtype  # published files: bf16 (§1.3)
    device = torch.device(device) if device is not None else torch.device("cpu")
    conv = _Converter(src, where, device, dtype, act_quant)
    d, f = params.hidden_size, int(params.hidden_size * params.mlp_ratio)
    shapes = {"qkv_proj": (3 * d, d), "qkv_proj_context": (3 * d, d), "out_proj": (d, d),
              "out_proj_context": (d, d), "mlp_fc1": (f, d), "mlp_context_fc1": (f, d),
              "mlp_fc2": (d, f), "mlp_context_fc2": (d, f)}
    layers: dict[str, nn.Module] = {}
    tensors: dict[str, torch.Tensor] = {}

    def put(path: str, module_and_buffers: tuple[nn.Module, dict]):
        module, bufs = module_and_buffers
        layers[path] = module
        tensors.update({f"{path}.{k}": v for k, v in bufs.items()})

    def put_16bit(ours: str, key: str):
        tensors[ours] = src.get(key).to(device, dtype)

    for i in range(params.depth):
        pre, ours = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for name, (target, unsigned) in DOUBLE_W4A4.items():
            put(f"{ours}.{target}", conv.w4a4(f"{pre}.{name}", *shapes[name], unsigned))
        for name, target in DOUBLE_W4A16.items():
            put(f"{ours}.{target}", conv.w4a16(f"{pre}.{name}", 6 * d, d, 6))
        for name, target in DOUBLE_NORMS.items():
            put_16bit(f"{ours}.{target}", f"{pre}.{name}")

    for i in range(params.depth_single_blocks):
        pre, ours = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        qkv = conv.w4a4(f"{pre}.qkv_proj", 3 * d, d, False)
        fc1 = conv.w4a4(f"{pre}.mlp_fc1", f, d, False)
        if torch.equal(qkv[1]["smooth"], fc1[1]["smooth"]) and "bias" in qkv[1] and "bias" in fc1[1]:
            put(f"{ours}.linear1", _merge_rows(qkv, fc1, act_quant))
        else:
            put(f"{ours}.linear1", (ConcatOutputLinear([qkv[0], fc1[0]]), {}))
            put(f"{ours}.linear1.parts.0", qkv)
            put(f"{ours}.linear1.parts.1", fc1)
        out = conv.w4a4(f"{pre}.out_proj", d, d, False)
        fc2 = conv.w4a4(f"{pre}.mlp_fc2", d, f, True)
        put(f"{ours}.linear2", (SplitInputLinear([out[0], fc2[0]]), {}))
        put(f"{ours}.linear2.parts.0", out)
        put(f"{ours}.linear2.parts.1", fc2)
        put(f"{ours}.modulation.lin", conv.w4a16(f"{pre}.norm.linear", 3 * d, d, 3))
        for name, target in SINGLE_NORMS.items():
            put_16bit(f"{ours}.{target}", f"{pre}.{name}")

    for dname, bname in UNQUANTIZED.items():
        for field in ("weight", "bias"):
            if f"{dname}.{field}" in src:
                put_16bit(f"{bname}.{field}", f"{dname}.{field}")
    for field in ("weight", "bias"):  # diffusers [scale; shift] -> BFL [shift; scale]
        key = f"final_layer.adaLN_modulation.1.{field}"
        if key in tensors:
            scale, shift = tensors[key].chunk(2, dim=0)
            tensors[key] = torch.cat((shift, scale), dim=0)

    top = {k: m for k, m in layers.items() if ".parts." not in k}  # composites rebuild their parts
    model = build_quantized_flux(params, {k: m.config() for k, m in top.items()}, act_quant)
    load_tensors_into(model, tensors, where)
    rank = src.shape("transformer_blocks.0.qkv_proj.lora_down")[-1] if params.depth else None
    model.quant_config = {"method": "nunchaku-import", "rank": rank, "source": path.name}
    return model.eval()
