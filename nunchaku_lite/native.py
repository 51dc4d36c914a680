"""Python binding of the native W4A4 kernels (native/*.cu) through cffi in ABI mode.

The shared library `nunchaku_lite/lib/libnunchaku_lite.so` is built by `make` (nvcc; sm_80/86/89/90a). Its C
declarations are read from `nunchaku_lite.h` (the block between CDEF BEGIN/END) and the library is opened with
`ffi.dlopen`: no PyTorch C++ extension. When the library or a CUDA device is missing, `available()` returns
False and warns once with the reason; quant/modules.py then runs the reference ops (quant/ops.py).

Every wrapper checks dtype, device, contiguity and shapes of its torch tensors in Python (ValueError naming the
argument), passes data pointers, sizes and the current CUDA stream, and turns a non-zero return code into an
exception carrying the kernel's message (ValueError for a bad argument, NativeError otherwise).

Entry points: `quantize_act` (codes + scales + low-rank activation, layout "packed" or the sm_90
"fp8_tiles"), `layernorm_quantize_act` (the same after a fused LayerNorm + modulation), `repack_weight`,
`prepare_w4a4` (the load-time conversion of a layer), `w4a4_gemm`, `w4a4_linear(x, module)` and
`w4a16_linear(x, module)` (the dispatch used by W4A4Linear / W4A16Linear; W4A16 inputs of more than
W4A16_GEMV_MAX_ROWS rows are dequantized to 16 bits and multiplied by cuBLAS), `prepared_for(module, dtype)`
(a layer's prepared tensors).
Storage: `prepare_model_(model)` converts every quantized layer on CUDA once and keeps only the converted
tensors (one weight copy on the GPU; Flux.from_pretrained calls it); an unconverted layer gets a cached
converted copy beside its canonical buffers on its first CUDA forward (two copies).

Precision: codes and scales are bit-identical to ops.quantize_act (both layouts; "fp8_tiles" is byte-identical
to ops.pack_act_fp8_tiles); the LayerNorm-fused entry matches quantize_act(ops.layernorm_modulate(...)) up to
LayerNorm's fp32 reduction order (see layernorm_quantize_act). The GEMM folds each 64-group into the fp32
accumulator with one rounding (fused multiply-adds; closer to the float64 truth than the reference's three);
exact=True reproduces ops.w4a4_linear's group loop bit for bit. Low-rank and bias then add in fp32.

Compute paths: 'wgmma' (sm_90 only, native/gemm_w4a4_sm90.cu: fp8 wgmma on the codes, activations in the
"fp8_tiles" layout of ops.pack_act_fp8_tiles, weights in ops.pack_weight_wgmma order), 's8' (mma.sync on
codes widened to 8 bits; any sm_80+) and 's4' (native 4-bit mma.sync, sm_80..89; emulated on sm_90).
default_path() picks 'wgmma' on sm_90 when the library has it, else 's8' on sm_90 and 's4' on sm_80..89;
the environment variable NUNCHAKU_LITE_MMA_PATH=s4|s8|wgmma (or the `path` argument) forces one, e.g. to
test the s4 path on an H100. prepare_w4a4 keeps one weight copy, in the layout of the path it was prepared
for; another path converts it once on demand (tests, forced paths).
"""
from __future__ import annotations

import functools
import os
import re
import threading
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .quant import ops

GROUP = 64
_PKG = Path(__file__).resolve().parent
LIB_PATH = Path(os.environ.get("NUNCHAKU_LITE_LIB", _PKG / "lib" / "libnunchaku_lite.so"))
ABI_VERSION = 3  # nl_version() of the library this module speaks to (native/api.cu)
_HEADER_CANDIDATES = (LIB_PATH.parent / "nunchaku_lite.h", _PKG.parent / "native" / "nunchaku_lite.h")

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_PATHS = {"auto": 0, "s4": 1, "s8": 2}  # C path codes of nl_w4a4_gemm; "wgmma" is nl_w4a4_gemm_fp8
PATH_NAMES = ("auto", "s4", "s8", "wgmma")
_EPILOGUES = {"none": 0, "gelu_tanh": 1, "accumulate": 2}

_lock = threading.Lock()
_state: dict = {}  # "ffi", "lib", "error" once loading was attempted
_warned: set = set()


class NativeError(RuntimeError):
    """A native kernel failed (CUDA error or unsupported configuration)."""


def _warn_once(reason: str):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"nunchaku_lite.native unavailable: {reason}; using the reference ops (slow)",
                      RuntimeWarning, stacklevel=3)


def cdef_source(header: Path) -> str:
    """The plain C declarations of the header (the CDEF BEGIN/END block) for ffi.cdef."""
    text = header.read_text()
    m = re.search(r"/\* CDEF BEGIN \*/(.*?)/\* CDEF END \*/", text, re.S)
    if not m:
        raise ValueError(f"{header}: no CDEF BEGIN/END block")
    return m.group(1)


def _load():
    """Open the library once; remember the failure reason instead of raising."""
    with _lock:
        if _state:
            return _state.get("lib")
        try:
            import cffi
        except ImportError as e:  # cffi is a declared dependency, but never crash on its absence
            _state["error"] = f"cffi is not installed ({e})"
            return None
        header = next((h for h in _HEADER_CANDIDATES if h.is_file()), None)
        if not LIB_PATH.is_file():
            _state["error"] = f"library {LIB_PATH} not found (build it with `make`)"
            return None
        if header is None:
            _state["error"] = f"header nunchaku_lite.h not found beside {LIB_PATH} or in native/"
            return None
        try:
            ffi = cffi.FFI()
            ffi.cdef(cdef_source(header))
            lib = ffi.dlopen(str(LIB_PATH))
            version = lib.nl_version()
        except Exception as e:  # a broken or foreign .so, missing libcudart, ...
            _state["error"] = f"could not load {LIB_PATH}: {e}"
            return None
        if version != ABI_VERSION:  # same symbols, other meanings (e.g. smooth vs 1/smooth): never call it
            _state["error"] = (f"{LIB_PATH} is ABI version {version}, this package needs {ABI_VERSION} "
                               "(rebuild it with `make`)")
            return None
        _state.update(ffi=ffi, lib=lib, version=version)
        return lib


def library_error() -> str | None:
    """Why the library could not be loaded (None when it loaded)."""
    _load()
    return _state.get("error")


def available(device: torch.device | int | None = None) -> bool:
    """True when the library loaded and a CUDA device of compute capability >= 8.0 is present.

    Warns once (RuntimeWarning) with the reason when it is False; never raises.
    """
    if _load() is None:
        _warn_once(_state["error"])
        return False
    try:
        if not torch.cuda.is_available():
            _warn_once("no CUDA device")
            return False
        major, minor = torch.cuda.get_device_capability(device)
    except Exception as e:  # driver problems
        _warn_once(f"CUDA query failed: {e}")
        return False
    if major < 8:
        _warn_once(f"compute capability {major}.{minor} < 8.0")
        return False
    return True


def _lib():
    lib = _load()
    if lib is None:
        raise NativeError(f"nunchaku_lite native library unavailable: {_state['error']}")
    return lib, _state["ffi"]


def _needs_lib(fn):
    """Public kernel wrappers fail with NativeError (not an argument error) when the library is missing."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _lib()
        return fn(*args, **kwargs)
    return wrapper


def _call(name: str, *args):
    lib, ffi = _lib()
    rc = getattr(lib, name)(*args)
    if rc != 0:
        msg = ffi.string(lib.nl_last_error()).decode(errors="replace") or name
        raise (ValueError if rc == 1 else NativeError)(msg)


def _ptr(t: torch.Tensor | None, ctype: str = "void *"):
    _, ffi = _lib()
    return ffi.NULL if t is None else ffi.cast(ctype, t.data_ptr())


def _stream(device: torch.device):
    _, ffi = _lib()
    return ffi.cast("void *", torch.cuda.current_stream(device).cuda_stream)


def _check(t: torch.Tensor, name: str, kernel: str, dtypes=None, shape=None, device=None, align: int = 16):
    """Validate one tensor argument; the error names the kernel and the argument."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{kernel}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_cuda:
        raise ValueError(f"{kernel}: {name} must be on a CUDA device, got {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{kernel}: {name} is on {t.device}, expected {device}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{kernel}: {name} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{kernel}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{kernel}: {name} must be contiguous")
    if t.data_ptr() % align:
        raise ValueError(f"{kernel}: {name} must be {align}-byte aligned")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (copies only when needed)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def has_wgmma() -> bool:
    """True when the loaded library has the sm_90 fp8 GEMM (nl_w4a4_gemm_fp8)."""
    lib = _load()
    if lib is None:
        return False
    try:
        getattr(lib, "nl_w4a4_gemm_fp8")
        return True
    except Exception:  # an older library: symbol missing
        return False


def default_path(device=None) -> str:
    """'wgmma' on sm_90 when the library has it (else 's8': Hopper has no native 4-bit tensor cores), 's4' on
    sm_80..89; the environment variable NUNCHAKU_LITE_MMA_PATH (s4, s8, wgmma) wins."""
    env = os.environ.get("NUNCHAKU_LITE_MMA_PATH", "auto").lower()
    if env not in PATH_NAMES:
        raise ValueError(f"NUNCHAKU_LITE_MMA_PATH={env!r}: expected auto, s4, s8 or wgmma")
    if env != "auto":
        return env
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) == (9, 0):
        return "wgmma" if has_wgmma() else "s8"
    return "s4"


def padded_rows(m: int) -> int:
    """Row stride (ldm) of the activation-scale layout: M rounded up to the GEMM's 128-row tile."""
    return max(128, -(-m // 128) * 128)


ACT_LAYOUTS = {"packed": 0, "fp8_tiles": 1, "s8_tiles": 2}  # NL_ACT_PACKED, NL_ACT_FP8_TILES, NL_ACT_S8_TILES


def fp8_tile_rows(m: int) -> int:
    """Padded token count Mp of the fp8_tiles layout: M rounded up to ops.FP8_TILE_ROWS (256)."""
    return max(256, -(-m // 256) * 256)


class QuantizedActivation(NamedTuple):
    """Output of `quantize_act` / `layernorm_quantize_act`, already in a GEMM's operand order.

    layout "packed" (sm_80..89 GEMM and the current generic one): codes uint8 [M, K/2] (ops.pack_int4 order),
    scales float32 [K/64, ldm] with ldm = padded_rows(M); ops.quantize_act's scales are scales[:, :M].T.
    layout "fp8_tiles" (sm_90 GEMM): codes uint8 [K/64, Mp, 64] and scales float32 [K/64, Mp], byte-identical
    to ops.pack_act_fp8_tiles(codes, scales), Mp = fp8_tile_rows(M), padded rows 0.
    layout "s8_tiles" (sm_90 integer GEMM, power-of-two activation scales only): codes uint8 [K/64, Mp, 64]
    (code << (4 - e) bytes) and scales float32 [Mp] (token scale / 16), byte-identical to
    ops.pack_act_s8_tiles(*ops.quantize_act(..., pow2=True)).
    """
    codes: torch.Tensor
    scales: torch.Tensor
    lora_act: torch.Tensor | None  # float32 [M, rank] = x @ lora_down^T, or None
    unsigned: bool
    layout: str = "packed"
    m: int | None = None           # real token count (the fp8_tiles arrays are padded to Mp rows)


def to_fp8_tiles(act: QuantizedActivation) -> QuantizedActivation:
    """A "packed" activation re-laid out for the wgmma path with PyTorch ops (ops.pack_act_fp8_tiles): the
    bridge used while the quantize kernel writes the packed layout; returns fp8_tiles input unchanged."""
    if act.layout == "fp8_tiles":
        return act
    m = act.codes.shape[0]
    codes = ops.unpack_int4(act.codes, signed=not act.unsigned)
    codes8, scales8 = ops.pack_act_fp8_tiles(codes, act.scales[:, :m].t())
    return QuantizedActivation(codes8, scales8, act.lora_act, act.unsigned, "fp8_tiles", m)


def _check_quantize_args(kname, x, smooth, lora_down, layout):
    if layout not in ACT_LAYOUTS:
        raise ValueError(f"{kname}: layout {layout!r} must be one of {sorted(ACT_LAYOUTS)}")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{kname}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{kname}: x has dtype {x.dtype}, expected bfloat16 or float16")
    if x.dim() != 2:
        raise ValueError(f"{kname}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    if k % GROUP:
        raise ValueError(f"{kname}: K={k} is not a multiple of {GROUP}")
    if smooth is not None and (not isinstance(smooth, torch.Tensor) or tuple(smooth.shape) != (k,)):
        raise ValueError(f"{kname}: smooth must be a tensor of shape ({k},), got "
                         f"{tuple(smooth.shape) if isinstance(smooth, torch.Tensor) else type(smooth).__name__}")
    rank = 0
    if lora_down is not None:
        if not isinstance(lora_down, torch.Tensor) or lora_down.dim() != 2 or lora_down.shape[1] != k:
            raise ValueError(f"{kname}: lora_down has shape "
                             f"{tuple(lora_down.shape) if isinstance(lora_down, torch.Tensor) else '?'}, "
                             f"expected [rank, {k}]")
        rank = lora_down.shape[0]
        if rank % 16 or rank > 128:
            raise ValueError(f"{kname}: lora_down rank={rank} must be a multiple of 16 and at most 128")
        if lora_down.dtype != x.dtype:
            raise ValueError(f"{kname}: lora_down has dtype {lora_down.dtype}, expected x's {x.dtype}")
    return m, k, rank


def _inv_smooth(kname: str, smooth, inv_smooth, k: int, device):
    """The kernels' smoothing factor: inv_smooth when the caller has it (PreparedW4A4.inv_smooth), else
    ops.smooth_reciprocal(smooth) (a small kernel per call); None without smoothing."""
    if inv_smooth is None:
        if smooth is None:
            return None
        _check(smooth, "smooth", kname, (torch.float32,), (k,), device)
        return ops.smooth_reciprocal(smooth)
    if smooth is None:
        raise ValueError(f"{kname}: inv_smooth given without smooth")
    _check(inv_smooth, "inv_smooth", kname, (torch.float32,), (k,), device)
    return inv_smooth


def quantize_act_reference(x, smooth=None, lora_down=None, unsigned=False, shift=0.0, layout="packed",
                           pow2: bool = False) -> QuantizedActivation:
    """The PyTorch reference of quantize_act's outputs (any device, no library needed; used for CPU tensors)."""
    m, k = x.shape
    codes, scales = ops.quantize_act(x, smooth, unsigned, shift, pow2)
    if layout == "packed":
        sc = torch.zeros(k // GROUP, padded_rows(m), dtype=torch.float32, device=x.device)
        sc[:, :m] = scales.t()
        packed = ops.pack_int4(codes)
    elif layout == "s8_tiles":
        packed, sc = ops.pack_act_s8_tiles(codes, scales)
    else:
        packed, sc = ops.pack_act_fp8_tiles(codes, scales)
    lora_act = None if lora_down is None or lora_down.shape[0] == 0 else x.float() @ lora_down.float().t()
    return QuantizedActivation(packed, sc, lora_act, bool(unsigned), layout, m)


def _alloc_outputs(x, m, k, rank, layout):
    """codes, scales, ldm and lora_act for M tokens in `layout`; for M = 0 (no kernel runs) the padded codes and
    scales are zeros."""
    g = k // GROUP
    if layout == "packed":
        ldm = padded_rows(m)
        codes = torch.empty(m, k // 2, dtype=torch.uint8, device=x.device)
    else:
        ldm = fp8_tile_rows(m)
        codes = torch.empty(g, ldm, GROUP, dtype=torch.uint8, device=x.device)
    scales = torch.empty(ldm if layout == "s8_tiles" else (g, ldm), dtype=torch.float32, device=x.device)
    lora_act = torch.empty(m, rank, dtype=torch.float32, device=x.device) if rank else None
    if m == 0:
        codes.zero_()
        scales.zero_()
    return codes, scales, ldm, lora_act


def _check_pow2_layout(kname: str, layout: str, pow2: bool) -> None:
    if layout == "s8_tiles" and not pow2:
        raise ValueError(f"{kname}: layout 's8_tiles' holds power-of-two activation scales only (pass pow2=True)")


def _act_stats(x: torch.Tensor, m: int, k: int, inv_smooth, shift: float, unsigned: bool, pow2: bool,
               modulation=None):
    """nl_act_stats of x [M, K] -> (token_scale [M] or None, row_stats [M, 2] or None): the power-of-two format's
    per-token scale (pow2) and, with modulation = (mod_shift, mod_scale, tokens_per_batch, eps), the LayerNorm
    row statistics for nl_layernorm_quantize_act (the token scale then is of its y)."""
    tok = torch.empty(m, dtype=torch.float32, device=x.device) if pow2 else None
    stats = torch.empty(m, 2, dtype=torch.float32, device=x.device) if modulation else None
    msh, msc, tpb, eps = modulation or (None, None, 1, 0.0)
    _call("nl_act_stats", _ptr(x), _DTYPE_CODE[x.dtype], m, k, k, _ptr(msh), _ptr(msc), tpb, float(eps),
          _ptr(inv_smooth, "float *"), float(shift), int(bool(unsigned)), _ptr(tok, "float *"),
          _ptr(stats, "float *"),
          _stream(x.device))
    return tok, stats


@_needs_lib
def quantize_act(x: torch.Tensor, smooth: torch.Tensor | None = None, lora_down: torch.Tensor | None = None,
                 unsigned: bool = False, shift: float = 0.0, layout: str = "packed",
                 pow2: bool = False, inv_smooth: torch.Tensor | None = None,
                 token_scale: torch.Tensor | None = None) -> QuantizedActivation:
    """INT4 codes/scales of x (as ops.quantize_act, bit-identical) and the low-rank activation x @ lora_down^T.

    x [M, K] bf16/fp16 (K a multiple of 64); smooth float32 [K] or None (inv_smooth: its
    ops.smooth_reciprocal, when the caller keeps one, e.g. PreparedW4A4.inv_smooth); lora_down [r, K] of x's dtype,
    r a multiple of 16 up to 128, or None; layout "packed", "fp8_tiles" or "s8_tiles" (see
    QuantizedActivation). pow2: power-of-two activation scales (ops.quantize_act(pow2=True); "s8_tiles" needs
    them): a first kernel (nl_act_stats) reads x for each token's scale, then the quantize kernel
    writes the codes in one pass; token_scale (float [M], pow2 only): those scales when already known (from
    w4a4_gemm_token_scale, the GEMM that wrote x), and that first kernel is skipped. A CPU x runs the PyTorch
    reference (same outputs).
    """
    kname = "quantize_act"
    m, k, rank = _check_quantize_args(kname, x, smooth, lora_down, layout)
    _check_pow2_layout(kname, layout, pow2)
    if not x.is_cuda:
        return quantize_act_reference(x, smooth, lora_down, unsigned, shift, layout, pow2)
    _check(x, "x", kname, (torch.bfloat16, torch.float16))
    inv = _inv_smooth(kname, smooth, inv_smooth, k, x.device)
    if rank:
        _check(lora_down, "lora_down", kname, (x.dtype,), None, x.device)
    if token_scale is not None:
        if not pow2:
            raise ValueError(f"{kname}: token_scale belongs to the power-of-two format (pass pow2=True)")
        _check(token_scale, "token_scale", kname, (torch.float32,), (m,), x.device, align=4)
    codes, scales, ldm, lora_act = _alloc_outputs(x, m, k, rank, layout)
    if m:
        tok = token_scale
        if pow2 and tok is None:
            tok = _act_stats(x, m, k, inv, shift, unsigned, True)[0]
        _call("nl_quantize_act", _ptr(x), _DTYPE_CODE[x.dtype], m, k, k, _ptr(inv, "float *"), float(shift),
              int(bool(unsigned)), _ptr(lora_down if rank else None), rank, ACT_LAYOUTS[layout],
              _ptr(codes, "uint8_t *"), _ptr(scales, "float *"), ldm, _ptr(lora_act, "float *"),
              _ptr(tok, "float *"), _stream(x.device))
    return QuantizedActivation(codes, scales, lora_act, bool(unsigned), layout, m)


def _modulation_rows(kname, x, shift, scale, tokens_per_batch):
    """Flatten x to [M, K] and the modulation vectors to [B, K]; returns (x2, shift2, scale2, tokens_per_batch)."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise ValueError(f"{kname}: x must be a [M, K] or [B, L, K] tensor")
    k = x.shape[-1]
    if x.dim() == 3:
        if tokens_per_batch not in (None, x.shape[1]):
            raise ValueError(f"{kname}: tokens_per_batch={tokens_per_batch} does not match x's L={x.shape[1]}")
        tokens_per_batch = x.shape[1]
        x = x.reshape(-1, k)
    elif tokens_per_batch is None:
        tokens_per_batch = x.shape[0]
    if int(tokens_per_batch) < 1:
        raise ValueError(f"{kname}: tokens_per_batch={tokens_per_batch} must be >= 1")
    batches = max(1, -(-x.shape[0] // int(tokens_per_batch)))
    out = []
    for name, t in (("shift", shift), ("scale", scale)):
        if not isinstance(t, torch.Tensor) or t.shape[-1] != k or t.numel() != batches * k:
            raise ValueError(f"{kname}: {name} must hold [B={batches}, K={k}] values (e.g. [B, 1, K]), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype != x.dtype:
            raise ValueError(f"{kname}: {name} has dtype {t.dtype}, expected x's {x.dtype}")
        out.append(t.reshape(batches, k).contiguous())  # the kernel reads rows of stride K
    return x, out[0], out[1], int(tokens_per_batch)


@_needs_lib
def layernorm_quantize_act(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                           tokens_per_batch: int | None = None, smooth: torch.Tensor | None = None,
                           lora_down: torch.Tensor | None = None, unsigned: bool = False, shift_const: float = 0.0,
                           layout: str = "packed", eps: float = 1e-6, return_y: bool = False, pow2: bool = False,
                           inv_smooth: torch.Tensor | None = None):
    """quantize_act(ops.layernorm_modulate(x, shift, scale)) without materializing y: LayerNorm (no affine) +
    modulation y = (1 + scale[b]) * LN(x) + shift[b] feeding the quantizer and the low-rank down projection.

    x [M, K] (rows of batch b = row // tokens_per_batch) or [B, L, K]; shift, scale [B, K] or [B, 1, K] in x's
    dtype; shift_const is the quantizer's constant shift (unsigned layers). Returns a QuantizedActivation, or
    (QuantizedActivation, y [M, K]) with return_y. Codes match the unfused path up to LayerNorm's fp32
    reduction order (torch's own is not specified): a code may differ by 1 where LN(x) lies on a 16-bit
    rounding boundary (measured: far below 0.1% of the codes). pow2 (power-of-two activation scales) and
    inv_smooth as in quantize_act. Two kernels: nl_act_stats (the rows' mean and rstd, and with pow2 the token
    scales of y), then the quantize kernel, which applies LayerNorm + modulation with those statistics.
    """
    kname = "layernorm_quantize_act"
    x, shift, scale, tpb = _modulation_rows(kname, x, shift, scale, tokens_per_batch)
    m, k, rank = _check_quantize_args(kname, x, smooth, lora_down, layout)
    _check_pow2_layout(kname, layout, pow2)
    if not x.is_cuda:
        rows = torch.arange(m, device=x.device) // tpb
        y = ops.layernorm_modulate(x, shift[rows], scale[rows], eps)
        act = quantize_act_reference(y, smooth, lora_down, unsigned, shift_const, layout, pow2)
        return (act, y) if return_y else act
    x = _aligned(x)
    for name, t in (("x", x), ("shift", shift), ("scale", scale)):
        _check(t, name, kname, (torch.bfloat16, torch.float16), None, x.device)
    inv = _inv_smooth(kname, smooth, inv_smooth, k, x.device)
    if rank:
        _check(lora_down, "lora_down", kname, (x.dtype,), None, x.device)
    codes, scales, ldm, lora_act = _alloc_outputs(x, m, k, rank, layout)
    y = torch.empty_like(x) if return_y else None
    if m:
        tok, stats = _act_stats(x, m, k, inv, shift_const, unsigned, pow2, (shift, scale, tpb, eps))
        _call("nl_layernorm_quantize_act", _ptr(x), _DTYPE_CODE[x.dtype], m, k, k, _ptr(shift), _ptr(scale), tpb,
              float(eps), _ptr(inv, "float *"), float(shift_const), int(bool(unsigned)),
              _ptr(lora_down if rank else None), rank, ACT_LAYOUTS[layout], _ptr(codes, "uint8_t *"),
              _ptr(scales, "float *"), ldm, _ptr(lora_act, "float *"), _ptr(y), _ptr(tok, "float *"),
              _ptr(stats, "float *"), _stream(x.device))
    act = QuantizedActivation(codes, scales, lora_act, bool(unsigned), layout, m)
    return (act, y) if return_y else act


def _repack(qweight: torch.Tensor, kname: str) -> torch.Tensor:
    """Canonical packed weight uint8 [N, K/2] through the repack kernel nl_<kname> (same bytes, new order)."""
    _check(qweight, "qweight", kname, (torch.uint8,))
    if qweight.dim() != 2:
        raise ValueError(f"{kname}: qweight must be 2-D [N, K/2], got shape {tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    out = torch.empty_like(qweight)
    _call(f"nl_{kname}", _ptr(qweight, "uint8_t *"), n, k, _ptr(out, "uint8_t *"), _stream(qweight.device))
    return out


@_needs_lib
def repack_weight(qweight: torch.Tensor) -> torch.Tensor:
    """Canonical packed weight uint8 [N, K/2] -> the GEMM's tile order (same bytes, new order), on the GPU."""
    return _repack(qweight, "repack_weight")


@_needs_lib
def repack_weight_sm90(qweight: torch.Tensor) -> torch.Tensor:
    """Canonical packed weight uint8 [N, K/2] -> the sm_90 GEMM's order (ops.pack_weight_wgmma), on the GPU."""
    return _repack(qweight, "repack_weight_sm90")


def _untile(tiled: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of nl_repack_weight (repack.cu tile order, halves swapped when (r >> 2) & 1) -> canonical."""
    t = tiled.reshape(n // 128, k // GROUP, 128, 2, 16)
    swap = (torch.arange(128, device=t.device) >> 2) & 1
    idx = torch.stack([swap, 1 - swap], dim=1)  # [128, 2]: stored half of logical half h
    t = t[:, :, torch.arange(128, device=t.device)[:, None], idx]
    return t.permute(0, 2, 1, 3, 4).contiguous().view(n, k // 2)


def _scales_exact_for_fast_path(wscales: torch.Tensor) -> bool:
    """The fast promotion needs weight scales with <= 11 significant bits (any bf16/fp16 value)."""
    if wscales.dtype in (torch.bfloat16, torch.float16):
        return True
    return bool(((wscales.float().view(torch.int32) & 0x1FFF) == 0).all())


@dataclass
class PreparedW4A4:
    """A W4A4 layer converted once for the kernels (see `prepare_w4a4`)."""
    w_tiled: torch.Tensor          # uint8 [Np, K/2] bytes in the order of w_layout
    w_scales: torch.Tensor | None  # float32 [K/64, Np]; None when folded (w_exp set): see scales_of
    bias: torch.Tensor | None      # float32 [Np]
    smooth: torch.Tensor | None    # float32 [K]
    lora_down: torch.Tensor | None  # [r, K] in the activation dtype
    lora_up: torch.Tensor | None   # [Np, r] 16-bit
    n: int                         # real output features (Np = n rounded up to 128)
    k: int
    rank: int
    act_unsigned: bool
    act_shift: float
    fast_ok: bool                  # weight scales allow the fast (fma) promotion of the s4/s8 paths
    w_layout: str = "tiled"        # "tiled" (s4/s8, repack.cu) or "wgmma" (ops.pack_weight_wgmma)
    alt: dict = field(default_factory=dict, repr=False)  # other layouts, built on demand
    # power-of-two weight scales (ops.pow2_split), wgmma layout only: the folded GEMMs' operands
    w_chscale: torch.Tensor | None = None  # float32 [Np]
    w_exp: torch.Tensor | None = None      # uint8 [K/64, Np]
    s8_ok: bool = False                    # every exponent <= ops.POW2_MAX_EXP: the integer GEMM can fold them
    act_pow2: bool = False                 # the layer quantizes its activations with power-of-two scales
    # ops.smooth_reciprocal(smooth), float32 [K]: what the quantize kernels multiply by (derived when not given;
    # dataclasses.replace(prep, smooth=...) must pass inv_smooth=None too)
    inv_smooth: torch.Tensor | None = None

    def __post_init__(self):
        if self.inv_smooth is None and self.smooth is not None:
            self.inv_smooth = _aligned(ops.smooth_reciprocal(self.smooth))


def scales_of(prep: PreparedW4A4) -> torch.Tensor:
    """The float32 [K/64, Np] weight scales; a folded layer keeps only chscale and exponents (1/4 of the
    bytes) and rebuilds them exactly here, cached, for the paths that take plain scales."""
    if prep.w_scales is not None:
        return prep.w_scales
    if "scales" not in prep.alt:
        prep.alt["scales"] = (prep.w_chscale[None, :] * torch.exp2(-prep.w_exp.float())).contiguous()
    return prep.alt["scales"]


def weight_for(prep: PreparedW4A4, layout: str) -> torch.Tensor:
    """The prepared weight in `layout`; the other layout is converted once and cached (forced paths, tests)."""
    if layout == prep.w_layout:
        return prep.w_tiled
    if layout not in prep.alt:
        npad = prep.w_tiled.shape[0]
        canon = (ops.unpack_weight_wgmma(prep.w_tiled, npad, prep.k) if prep.w_layout == "wgmma"
                 else _untile(prep.w_tiled, npad, prep.k))
        prep.alt[layout] = repack_weight_sm90(canon) if layout == "wgmma" else repack_weight(canon)
    return prep.alt[layout]


@_needs_lib
def prepare_w4a4(qweight, wscales, lora_down=None, lora_up=None, bias=None, smooth=None, act_unsigned=False,
                 act_shift=0.0, dtype=torch.bfloat16, path: str | None = None, act_pow2: bool = False
                 ) -> PreparedW4A4:
    """Load-time conversion of one W4A4 layer (canonical ops layout) for the kernels; run once per layer.

    Pads N to a multiple of 128 (zero rows), repacks the weight on the GPU for `path` (default_path(): the
    wgmma order on sm_90, the s4/s8 tile order otherwise), transposes the weight scales to float32 [K/64, N],
    converts bias to float32 and the low-rank weights to `dtype` (the activation dtype, bf16 or fp16).
    act_pow2: the layer's activations use power-of-two scales (W4A4Linear.act_pow2); with power-of-two weight
    scales (exponents <= 4) the sm_90 path then runs the integer GEMM (nl_w4a4_gemm_s8).
    """
    kname = "prepare_w4a4"
    _check(qweight, "qweight", kname, (torch.uint8,))
    dev = qweight.device
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if k % GROUP:
        raise ValueError(f"{kname}: K={k} is not a multiple of {GROUP}")
    if tuple(wscales.shape) != (n, k // GROUP):
        raise ValueError(f"{kname}: wscales has shape {tuple(wscales.shape)}, expected ({n}, {k // GROUP})")
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{kname}: dtype must be bfloat16 or float16, got {dtype}")
    npad = -(-n // 128) * 128 - n
    pad_rows = (lambda t: torch.cat([t, t.new_zeros(npad, *t.shape[1:])])) if npad else (lambda t: t)
    rank = 0 if lora_down is None else int(lora_down.shape[0])
    if rank:
        if tuple(lora_down.shape) != (rank, k) or lora_up is None or tuple(lora_up.shape) != (n, rank):
            raise ValueError(f"{kname}: lora_down {tuple(lora_down.shape)} / lora_up "
                             f"{None if lora_up is None else tuple(lora_up.shape)} do not fit [{n}, {k}]")
        if rank % 16 or rank > 128:
            raise ValueError(f"{kname}: rank={rank} must be a multiple of 16 and at most 128")
    if smooth is not None and tuple(smooth.shape) != (k,):
        raise ValueError(f"{kname}: smooth has shape {tuple(smooth.shape)}, expected ({k},)")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{kname}: bias has shape {tuple(bias.shape)}, expected ({n},)")
    path = path or default_path(dev)
    if path not in PATH_NAMES[1:]:
        raise ValueError(f"{kname}: path {path!r} must be one of {PATH_NAMES[1:]}")
    layout = "wgmma" if path == "wgmma" else "tiled"
    canon = _aligned(pad_rows(qweight.to(dev)))
    split = ops.pow2_split(wscales.to(dev)) if layout == "wgmma" else None
    chscale = wexp = None
    s8_ok = False
    if split is not None:
        chscale, wexp = split
        s8_ok = int(wexp.max()) <= ops.POW2_MAX_EXP  # one host sync, at load time
        zero = wscales.to(dev) == 0  # such groups contribute 0; folded, their codes would not: zero them
        if zero.any():
            canon = _aligned(canon.view(canon.shape[0], -1, GROUP // 2).masked_fill(
                pad_rows(zero)[..., None], 0).view(canon.shape))
        chscale = _aligned(pad_rows(chscale))
        wexp = _aligned(pad_rows(wexp).t().contiguous())
    tiled = repack_weight_sm90(canon) if layout == "wgmma" else repack_weight(canon)
    return PreparedW4A4(
        w_tiled=tiled,
        w_scales=None if wexp is not None else _aligned(pad_rows(wscales.to(dev)).float().t()),
        bias=None if bias is None else _aligned(pad_rows(bias.to(dev).float())),
        smooth=None if smooth is None else _aligned(smooth.to(dev).float()),
        lora_down=_aligned(lora_down.to(dev, dtype)) if rank else None,
        lora_up=_aligned(pad_rows(lora_up.to(dev, dtype))) if rank else None,
        n=n, k=k, rank=rank, act_unsigned=bool(act_unsigned), act_shift=float(act_shift),
        fast_ok=_scales_exact_for_fast_path(wscales), w_layout=layout, w_chscale=chscale, w_exp=wexp, s8_ok=s8_ok,
        act_pow2=bool(act_pow2))


def _resolve_path(path: str | None, exact: bool, device) -> str:
    """The GEMM path for `path` (None: default_path; exact=True then means 's8', since wgmma has no exact mode)."""
    if path is not None:
        return path
    path = default_path(device)
    return "s8" if exact and path == "wgmma" else path


def _gemm_outputs(kname, prep, m, out_dtype, epilogue, use_lora, lora_act, out, dev, out_align):
    """Shared argument checks of both W4A4 GEMMs; returns (padded N, rank used, output tensor)."""
    npad = prep.w_tiled.shape[0]
    if out_dtype not in _DTYPE_CODE:
        raise ValueError(f"{kname}: out_dtype {out_dtype} is not float32/bfloat16/float16")
    if epilogue not in _EPILOGUES:
        raise ValueError(f"{kname}: epilogue {epilogue!r} not in {sorted(_EPILOGUES)}")
    rank = prep.rank if use_lora else 0
    if rank:
        if lora_act is None or tuple(lora_act.shape) != (m, rank):
            raise ValueError(f"{kname}: act.lora_act must be [{m}, {rank}] (quantize_act with the layer's lora_down)")
        _check(lora_act, "act.lora_act", kname, (torch.float32,), None, dev)
    if out is None:
        out = torch.empty(m, npad, dtype=out_dtype, device=dev)
    else:
        _check(out, "out", kname, (out_dtype,), (m, npad), dev, align=out_align)
    return npad, rank, out


@_needs_lib
def w4a4_gemm(act: QuantizedActivation, prep: PreparedW4A4, out_dtype: torch.dtype = torch.bfloat16,
              epilogue: str = "none", path: str | None = None, exact: bool = False,
              use_lora: bool = True, out: torch.Tensor | None = None, m: int | None = None,
              fold: bool | None = None) -> torch.Tensor:
    """out [M, Np] = W4A4 GEMM of quantized activations with the prepared weight, + low-rank + bias (+ GELU).

    path: 's4', 's8', 'wgmma' or None (default_path(); exact=True then means 's8' on sm_90). exact=True
    reproduces ops.w4a4_linear's fp32 group accumulation bit for bit (s4/s8 only); otherwise each group is
    folded in with fused multiply-adds. use_lora=False skips the low-rank branch (benchmarks). The wgmma
    path takes "fp8_tiles" activations (a "packed" one is converted with PyTorch ops, slowly); their token
    count M is `m`, else act.lora_act's rows, else out's rows. fold (wgmma only): None runs the folded
    kernel (nl_w4a4_gemm_fp8_pow2) when the weight has power-of-two scales (unless the environment sets
    NUNCHAKU_LITE_FOLD=0), False never, True requires it. "s8_tiles" activations (power-of-two scales) run
    the sm_90 integer GEMM (nl_w4a4_gemm_s8), which needs prep.s8_ok. epilogue: "none", "gelu_tanh", or
    "accumulate": out += the GEMM's result (out required), with torch's out.add_(result) roundings (the
    result rounded to out_dtype, the sum in fp32 rounded again); in the integer GEMM's stores on that path,
    a separate add_ on the others.
    """
    kname = "w4a4_gemm"
    codes, scales, lora_act = act.codes, act.scales, act.lora_act
    _check(codes, "act.codes", kname, (torch.uint8,))
    dev = codes.device
    path = _resolve_path(path, exact, dev)
    if epilogue == "accumulate":
        if out is None:
            raise ValueError(f"{kname}: epilogue 'accumulate' adds into `out`: pass out")
        if not (path == "wgmma" and act.layout == "s8_tiles"):
            y = w4a4_gemm(act, prep, out_dtype, "none", path, exact, use_lora, None, m, fold)
            if y.shape != out.shape:
                raise ValueError(f"{kname}: out has shape {tuple(out.shape)}, the GEMM writes {tuple(y.shape)}")
            return out.add_(y)
    if path not in PATH_NAMES[1:]:
        raise ValueError(f"{kname}: path {path!r} must be one of {PATH_NAMES[1:]}")
    if path == "wgmma":
        if exact:
            raise ValueError(f"{kname}: exact=True is not available on the wgmma path (use path='s8')")
        if act.layout == "s8_tiles":
            return _w4a4_gemm_s8(act, prep, out_dtype, epilogue, use_lora, out, m)
        return _w4a4_gemm_wgmma(act, prep, out_dtype, epilogue, use_lora, out, m, fold)
    if act.layout != "packed":
        raise ValueError(f"{kname}: path {path!r} needs 'packed' activations, got layout {act.layout!r}")
    m, k = codes.shape[0], codes.shape[1] * 2
    if k != prep.k:
        raise ValueError(f"{kname}: activations have K={k}, the weight has K={prep.k}")
    ldm = scales.shape[1]
    _check(scales, "act.scales", kname, (torch.float32,), (k // GROUP, ldm), dev)
    npad, rank, out = _gemm_outputs(kname, prep, m, out_dtype, epilogue, use_lora, lora_act, out, dev, 8)
    if m:
        _call("nl_w4a4_gemm", _ptr(codes, "uint8_t *"), _ptr(scales, "float *"), ldm, int(act.unsigned),
              _ptr(weight_for(prep, "tiled"), "uint8_t *"), _ptr(scales_of(prep), "float *"),
              _ptr(lora_act if rank else None, "float *"), _ptr(prep.lora_up if rank else None),
              _DTYPE_CODE[prep.lora_up.dtype] if rank else 1, rank, _ptr(prep.bias, "float *"), _ptr(out),
              _DTYPE_CODE[out_dtype], npad, m, npad, k, _EPILOGUES[epilogue], _PATHS[path],
              int(exact or not prep.fast_ok), _stream(dev))
    return out


def _folded(prep: PreparedW4A4, fold: bool | None, kname: str) -> bool:
    """Whether the sm_90 GEMM runs folded (see w4a4_gemm's `fold`; NUNCHAKU_LITE_FOLD=0 is the A/B switch)."""
    if fold and prep.w_exp is None:
        raise ValueError(f"{kname}: fold=True needs power-of-two weight scales (ops.quantize_weight(pow2=True)) "
                         "prepared for the wgmma path")
    if fold is None:
        fold = os.environ.get("NUNCHAKU_LITE_FOLD") != "0"
    return fold and prep.w_exp is not None


def _fp8_operand(act: QuantizedActivation, prep: PreparedW4A4, m: int | None, kname: str) -> tuple[int, int]:
    """Checks of an fp8_tiles activation (codes already _check-ed) for `prep`'s GEMM; returns (Mp, m), m
    defaulting to act.m."""
    codes, scales = act.codes, act.scales
    if codes.dim() != 3 or codes.shape[2] != GROUP:
        raise ValueError(f"{kname}: act.codes must be [K/64, Mp, 64] (fp8_tiles), got {tuple(codes.shape)}")
    g, mp = codes.shape[0], codes.shape[1]
    if g * GROUP != prep.k:
        raise ValueError(f"{kname}: activations have K={g * GROUP}, the weight has K={prep.k}")
    _check(scales, "act.scales", kname, (torch.float32,), (g, mp), codes.device)
    m = act.m if m is None else m
    if m is None or not 0 <= m <= mp or mp != max(ops.FP8_TILE_ROWS, -(-m // ops.FP8_TILE_ROWS) * ops.FP8_TILE_ROWS):
        raise ValueError(f"{kname}: token count m={m} does not fit the fp8_tiles operand with Mp={mp} "
                         "(pass m=, or an act with lora_act)")
    return mp, m


def _w4a4_gemm_wgmma(act, prep, out_dtype, epilogue, use_lora, out, m, fold=None):
    """The sm_90 fp8 wgmma GEMM (nl_w4a4_gemm_fp8); see w4a4_gemm."""
    kname = "w4a4_gemm(wgmma)"
    if act.layout == "packed":
        m = act.codes.shape[0]
        act = to_fp8_tiles(act)
    elif act.layout != "fp8_tiles":
        raise ValueError(f"{kname}: unknown activation layout {act.layout!r}")
    codes, scales, lora_act = act.codes, act.scales, act.lora_act
    dev = codes.device
    if m is None and act.m is None:
        m = lora_act.shape[0] if lora_act is not None else (out.shape[0] if out is not None else None)
    mp, m = _fp8_operand(act, prep, m, kname)
    k = prep.k
    npad, rank, out = _gemm_outputs(kname, prep, m, out_dtype, epilogue, use_lora, lora_act, out, dev, 16)
    if m and _folded(prep, fold, kname):
        _call("nl_w4a4_gemm_fp8_pow2", _ptr(codes, "uint8_t *"), _ptr(scales, "float *"), mp,
              _ptr(weight_for(prep, "wgmma"), "uint8_t *"), _ptr(prep.w_chscale, "float *"),
              _ptr(prep.w_exp, "uint8_t *"), _ptr(lora_act if rank else None, "float *"),
              _ptr(prep.lora_up if rank else None), _DTYPE_CODE[prep.lora_up.dtype] if rank else 1, rank,
              _ptr(prep.bias, "float *"), _ptr(out), _DTYPE_CODE[out_dtype], npad, m, npad, k,
              _EPILOGUES[epilogue], _stream(dev))
    elif m:
        _call("nl_w4a4_gemm_fp8", _ptr(codes, "uint8_t *"), _ptr(scales, "float *"), mp,
              _ptr(weight_for(prep, "wgmma"), "uint8_t *"), _ptr(scales_of(prep), "float *"),
              _ptr(lora_act if rank else None, "float *"), _ptr(prep.lora_up if rank else None),
              _DTYPE_CODE[prep.lora_up.dtype] if rank else 1, rank, _ptr(prep.bias, "float *"), _ptr(out),
              _DTYPE_CODE[out_dtype], npad, m, npad, k, _EPILOGUES[epilogue], _stream(dev))
    return out


_S8_WORKSPACE: dict = {}  # _s8_workspace_key -> zero-filled int32 workspace of nl_w4a4_gemm_s8 (stream-K)


def _s8_workspace_key(dev: torch.device) -> tuple[int, int]:
    return (dev.index if dev.index is not None else torch.cuda.current_device(), threading.get_ident())


def _s8_workspace(dev: torch.device) -> torch.Tensor | None:
    """The stream-K workspace of the integer GEMM: 1024 int32 hand-over flags (zero-filled here; every call
    leaves them zero), then (SMs) x (256 x 128) int32 partial sums (~17 MiB on 132 SMs). One per (device, host
    thread): two launches that share one must not run at the same time, and threads are where this package's
    users run GEMMs concurrently (each on its own stream); one thread's calls are ordered (its stream, or its
    side streams joined as fused.graphed_forward does, graph replays included). Allocated on the thread's first
    call outside graph capture (inside one, None: no tile splitting)."""
    key = _s8_workspace_key(dev)
    ws = _S8_WORKSPACE.get(key)
    if ws is None and not torch.cuda.is_current_stream_capturing():
        sms = torch.cuda.get_device_properties(key[0]).multi_processor_count
        with torch.inference_mode(False):  # a normal tensor even when first called under inference_mode
            ws = _S8_WORKSPACE[key] = torch.zeros(1024 + sms * 256 * 128, dtype=torch.int32, device=dev)
    return ws


def _w4a4_gemm_s8(act, prep, out_dtype, epilogue, use_lora, out, m, nxt=None, tok=None):
    """The sm_90 integer GEMM (nl_w4a4_gemm_s8) of "s8_tiles" activations; see w4a4_gemm. nxt, tok: the next
    layer's PreparedW4A4 and the zeroed float [M] its token scales go into (w4a4_gemm_token_scale)."""
    kname = "w4a4_gemm(s8)"
    if not prep.s8_ok:
        raise ValueError(f"{kname}: 's8_tiles' activations need power-of-two weight scales with exponents <= "
                         f"{ops.POW2_MAX_EXP} (ops.quantize_weight(pow2=True)) prepared for the wgmma path")
    codes, tscale, lora_act = act.codes, act.scales, act.lora_act
    dev = codes.device
    if codes.dim() != 3 or codes.shape[2] != GROUP or codes.shape[0] * GROUP != prep.k:
        raise ValueError(f"{kname}: act.codes must be [K/64={prep.k // GROUP}, Mp, 64], got {tuple(codes.shape)}")
    mp = codes.shape[1]
    _check(tscale, "act.scales", kname, (torch.float32,), (mp,), dev)
    m = act.m if m is None else m
    if m is None or not 0 <= m <= mp or mp != fp8_tile_rows(m):
        raise ValueError(f"{kname}: token count m={m} does not fit the s8_tiles operand with Mp={mp}")
    npad, rank, out = _gemm_outputs(kname, prep, m, out_dtype, epilogue, use_lora, lora_act, out, dev, 16)
    if m:
        ws = _s8_workspace(dev)
        _call("nl_w4a4_gemm_s8", _ptr(codes, "uint8_t *"), _ptr(tscale, "float *"), mp, int(act.unsigned),
              _ptr(weight_for(prep, "wgmma"), "uint8_t *"), _ptr(prep.w_chscale, "float *"),
              _ptr(prep.w_exp, "uint8_t *"), _ptr(lora_act if rank else None, "float *"),
              _ptr(prep.lora_up if rank else None), _DTYPE_CODE[prep.lora_up.dtype] if rank else 1, rank,
              _ptr(prep.bias, "float *"), _ptr(out), _DTYPE_CODE[out_dtype], npad, m, npad, prep.k,
              _EPILOGUES[epilogue], _ptr(ws, "int *"), 0 if ws is None else ws.numel() * 4,
              _ptr(nxt.inv_smooth if tok is not None else None, "float *"),
              float(nxt.act_shift) if tok is not None else 0.0, int(tok is not None and nxt.act_unsigned),
              _ptr(tok, "float *"), _stream(dev))
    return out


@_needs_lib
def w4a4_gemm_token_scale(act: QuantizedActivation, prep: PreparedW4A4, nxt: PreparedW4A4,
                          out_dtype: torch.dtype = torch.bfloat16, epilogue: str = "none", m: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """w4a4_gemm on the sm_90 integer GEMM ("s8_tiles" activations) that also returns the power-of-two token
    scales of its output for the next layer `nxt`: (y [M, N], token_scale float [M]), token_scale bit-identical
    to what quantize_act(y, nxt.smooth, ..., pow2=True) computes first (nl_act_stats), so
    quantize_act(y, ..., token_scale=token_scale) skips that pass over y. Formed in the GEMM's epilogue from the
    16-bit values it writes (one reduction per token row of a tile, combined by atomic maximum). Needs
    nxt.act_pow2, nxt.k == N with no padded rows, a bf16/fp16 out_dtype and epilogue "none" or "gelu_tanh".
    """
    kname = "w4a4_gemm_token_scale"
    if act.layout != "s8_tiles":
        raise ValueError(f"{kname}: needs 's8_tiles' activations (the sm_90 integer GEMM), got {act.layout!r}")
    npad = prep.w_tiled.shape[0]
    if not nxt.act_pow2 or prep.n != npad or nxt.k != npad:
        raise ValueError(f"{kname}: the next layer must take power-of-two activation scales (act_pow2) with K "
                         f"equal to this layer's N={prep.n}, a multiple of 128 (got K={nxt.k}, "
                         f"act_pow2={nxt.act_pow2})")
    if out_dtype not in (torch.bfloat16, torch.float16) or epilogue not in ("none", "gelu_tanh"):
        raise ValueError(f"{kname}: needs a bf16/fp16 out_dtype (got {out_dtype}) and epilogue 'none' or "
                         f"'gelu_tanh' (got {epilogue!r})")
    m = act.m if m is None else m
    if m is None:
        raise ValueError(f"{kname}: the token count m is unknown (pass m)")
    tok = torch.zeros(m, dtype=torch.float32, device=act.codes.device)
    y = _w4a4_gemm_s8(act, prep, out_dtype, epilogue, True, None, m, nxt, tok)
    return y, tok


def act_layout(prep: PreparedW4A4, path: str) -> str:
    """The activation layout the GEMM of `path` reads for `prep`: "packed" (s4/s8), "fp8_tiles" (wgmma), or
    "s8_tiles" (wgmma, power-of-two scales on both operands). A/B switches: NUNCHAKU_LITE_S8=0 sends such
    layers to the folded fp8 kernel, NUNCHAKU_LITE_FOLD=0 to the plain one (same codes either way)."""
    if path != "wgmma":
        return "packed"
    if (prep.act_pow2 and prep.s8_ok and os.environ.get("NUNCHAKU_LITE_S8") != "0"
            and os.environ.get("NUNCHAKU_LITE_FOLD") != "0"):
        return "s8_tiles"
    return "fp8_tiles"


@_needs_lib
def w4a4_gemm_gelu_quantize(act: QuantizedActivation, prep: PreparedW4A4, nxt: PreparedW4A4,
                            dtype: torch.dtype = torch.bfloat16, m: int | None = None,
                            fold: bool | None = None) -> QuantizedActivation:
    """fc1 -> GELU -> fc2's activation operand in one sm_90 kernel (nl_w4a4_gemm_fp8_gelu_quantize).

    Equals quantize_act(w4a4_gemm(act, prep, dtype, "gelu_tanh"), nxt.smooth, nxt.lora_down,
    nxt.act_unsigned, nxt.act_shift, layout="fp8_tiles") (codes and scales bit for bit, lora_act to fp32
    summation order) without writing the GELU output: `act` in the fp8_tiles layout with `m` tokens, `prep` with
    N a multiple of 128 (no padded rows) equal to nxt's K, nxt.rank <= 64, dtype bf16/fp16 (the dtype the GELU
    output would be stored in, and of both layers' low-rank factors). fold as in w4a4_gemm.
    """
    kname = "w4a4_gemm_gelu_quantize"
    if act.layout != "fp8_tiles":
        raise ValueError(f"{kname}: needs 'fp8_tiles' activations (the sm_90 operand), got {act.layout!r}")
    codes, scales = act.codes, act.scales
    _check(codes, "act.codes", kname, (torch.uint8,))
    dev = codes.device
    mp, m = _fp8_operand(act, prep, m, kname)
    if m == 0:
        raise ValueError(f"{kname}: no tokens (m=0)")
    npad = prep.w_tiled.shape[0]
    if prep.n != npad or nxt.k != npad:
        raise ValueError(f"{kname}: the first layer's N={prep.n} must be a multiple of 128 and equal the next "
                         f"layer's K={nxt.k}")
    if nxt.rank > 64 or dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{kname}: needs nxt.rank <= 64 (got {nxt.rank}) and a bf16/fp16 dtype (got {dtype})")
    for name, t in (("prep.lora_up", prep.lora_up), ("nxt.lora_down", nxt.lora_down)):
        if t is not None and t.dtype != dtype:
            raise ValueError(f"{kname}: {name} is {t.dtype}, expected {dtype}")
    if prep.rank and (act.lora_act is None or tuple(act.lora_act.shape) != (m, prep.rank)):
        raise ValueError(f"{kname}: act.lora_act must be [{m}, {prep.rank}]")
    folded = _folded(prep, fold, kname)
    g2 = npad // GROUP
    codes2 = torch.empty(g2, mp, GROUP, dtype=torch.uint8, device=dev)
    scales2 = torch.empty(g2, mp, dtype=torch.float32, device=dev)
    covered = -(-m // 128) * 128  # the kernel writes rows < covered (zeros from m on); the rest is padding
    if covered < mp:
        codes2[:, covered:].zero_()
        scales2[:, covered:].zero_()
    part = torch.empty(npad // 128, m, nxt.rank, dtype=torch.float32, device=dev) if nxt.rank else None
    _call("nl_w4a4_gemm_fp8_gelu_quantize", _ptr(codes, "uint8_t *"), _ptr(scales, "float *"), mp,
          _ptr(weight_for(prep, "wgmma"), "uint8_t *"), _ptr(None if folded else scales_of(prep), "float *"),
          _ptr(prep.w_chscale if folded else None, "float *"), _ptr(prep.w_exp if folded else None, "uint8_t *"),
          _ptr(act.lora_act if prep.rank else None, "float *"), _ptr(prep.lora_up if prep.rank else None),
          prep.rank, _ptr(prep.bias, "float *"), _DTYPE_CODE[dtype], m, npad, prep.k,
          _ptr(nxt.inv_smooth, "float *"), float(nxt.act_shift), int(nxt.act_unsigned),
          _ptr(nxt.lora_down if nxt.rank else None), nxt.rank, _ptr(codes2, "uint8_t *"), _ptr(scales2, "float *"),
          mp, _ptr(part, "float *"), _stream(dev))
    lora_act = part.sum(0) if part is not None else None  # fixed order over the 128-column blocks
    return QuantizedActivation(codes2, scales2, lora_act, nxt.act_unsigned, "fp8_tiles", m)


def w4a4_linear_prepared(x: torch.Tensor, prep: PreparedW4A4, epilogue: str = "none", path: str | None = None,
                         exact: bool = False) -> torch.Tensor:
    """y [..., n] = the SVDQuant linear of x [..., K] with a prepared layer: quantize kernel + GEMM kernel."""
    lead = x.shape[:-1]
    x2 = _aligned(x.reshape(-1, x.shape[-1]))
    path = _resolve_path(path, exact, x.device)
    act = quantize_act(x2, prep.smooth, prep.lora_down, prep.act_unsigned, prep.act_shift,
                       layout=act_layout(prep, path), pow2=prep.act_pow2, inv_smooth=prep.inv_smooth)
    y = w4a4_gemm(act, prep, x.dtype, epilogue, path, exact, m=x2.shape[0])
    if y.shape[1] != prep.n:
        y = y[:, : prep.n]
    return y.reshape(*lead, prep.n)


def _cache_key(module, dtype, names):
    key = [dtype]
    for name in names:
        t = getattr(module, name, None)
        # inference tensors (e.g. weights lent by CPUOffload inside inference_mode) have no version counter
        key.append(None if t is None else (t.data_ptr(), None if t.is_inference() else t._version, t.device))
    return tuple(key)


_W4A4_BUFFERS = ("qweight", "wscales", "lora_down", "lora_up", "bias", "smooth")
_W4A16_BUFFERS = ("qweight", "wscales", "wzeros", "bias")


def prepared_for(module, dtype: torch.dtype) -> PreparedW4A4:
    """The layer's prepared tensors for activations of `dtype`.

    A converted layer (`prepare_model_`) holds them as its buffers: they are returned as they are (the
    low-rank factors cast to `dtype` on the fly if the layer was converted for another activation dtype).
    An unconverted layer on CUDA gets a cached prepared COPY beside its canonical buffers (rebuilt when a
    buffer changed): two copies of the weight, which `prepare_model_` avoids."""
    if _layout(module) is not None:
        prep = _from_buffers(module)
        if prep.rank and prep.lora_down.dtype != dtype:
            prep = replace(prep, lora_down=_aligned(prep.lora_down.to(dtype)), lora_up=_aligned(prep.lora_up.to(dtype)))
        return prep
    key = _cache_key(module, dtype, _W4A4_BUFFERS)
    cached = getattr(module, "_native_prepared", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    rank = int(getattr(module, "rank", 0))
    prep = prepare_w4a4(module.qweight, module.wscales, module.lora_down if rank else None,
                        module.lora_up if rank else None, module.bias, module.smooth,
                        module.act_unsigned, module.act_shift, dtype, act_pow2=getattr(module, "act_pow2", False))
    object.__setattr__(module, "_native_prepared", (key, prep))  # plain attribute: not a buffer, not saved
    return prep


def w4a4_linear(x: torch.Tensor, module):
    """Dispatch target of quant.modules.W4A4Linear (x already padded to the module's K).

    Returns NotImplemented for inputs the kernels do not cover (fp32 activations, rank > 128 or not a
    multiple of 16), so the module falls back to the reference ops.
    """
    rank = int(getattr(module, "rank", 0))
    if x.dtype not in (torch.bfloat16, torch.float16) or (rank and (rank % 16 or rank > 128)):
        return NotImplemented
    return w4a4_linear_prepared(x, prepared_for(module, x.dtype))


@dataclass
class PreparedW4A16:
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bias: torch.Tensor | None
    n: int
    k: int


@_needs_lib
def prepare_w4a16(qweight, wscales, bias=None, wzeros=None) -> PreparedW4A16:
    """float32 scales/zeros/bias for the W4A16 kernel (the weight stays in canonical order)."""
    kname = "prepare_w4a16"
    _check(qweight, "qweight", kname, (torch.uint8,))
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if tuple(wscales.shape) != (n, k // GROUP):
        raise ValueError(f"{kname}: wscales has shape {tuple(wscales.shape)}, expected ({n}, {k // GROUP})")
    if wzeros is not None and tuple(wzeros.shape) != (n, k // GROUP):
        raise ValueError(f"{kname}: wzeros has shape {tuple(wzeros.shape)}, expected ({n}, {k // GROUP})")
    f32 = lambda t: None if t is None else _aligned(t.to(qweight.device).float())
    return PreparedW4A16(_aligned(qweight), f32(wscales), f32(wzeros), f32(bias), n, k)


@_needs_lib
def w4a16_gemm(x: torch.Tensor, prep: PreparedW4A16) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(W)^T + bias (x bf16/fp16; fp32 math)."""
    kname = "w4a16_gemm"
    _check(x, "x", kname, (torch.bfloat16, torch.float16), None, prep.qweight.device)
    m, k = x.shape
    if k != prep.k:
        raise ValueError(f"{kname}: x has K={k}, the weight has K={prep.k}")
    if m > W4A16_GEMV_MAX_ROWS:
        return _w4a16_dense(x, prep)
    out = torch.empty(m, prep.n, dtype=x.dtype, device=x.device)
    if m:
        _call("nl_w4a16_gemm", _ptr(x), _DTYPE_CODE[x.dtype], k, _ptr(prep.qweight, "uint8_t *"),
              _ptr(prep.scales, "float *"), _ptr(prep.zeros, "float *"), _ptr(prep.bias, "float *"), _ptr(out),
              prep.n, m, prep.n, k, _stream(x.device))
    return out


# The W4A16 kernel is a GEMV (one warp per output feature, weights re-read per 4 rows): right for the
# modulation vectors, far too slow for a 512-token T5 prompt (measured 889 ms vs 25 ms for 16-bit on the H100).
# Above this many rows the weight is dequantized to the activation dtype, DEQUANT_ROWS output rows at a time
# (bounded fp32 temporaries), and multiplied by cuBLAS. Rounding the dequantized weight to bf16 adds a relative
# error of about 2^-9 per weight, far below the 4-bit quantization error.
W4A16_GEMV_MAX_ROWS = 16
DEQUANT_ROWS = 1024


def _w4a16_dense(x: torch.Tensor, prep: PreparedW4A16) -> torch.Tensor:
    w = torch.empty(prep.n, prep.k, dtype=x.dtype, device=x.device)
    signed = prep.zeros is None
    for r0 in range(0, prep.n, DEQUANT_ROWS):
        r1 = min(prep.n, r0 + DEQUANT_ROWS)
        zeros = None if signed else prep.zeros[r0:r1]
        w[r0:r1] = ops.dequantize(ops.unpack_int4(prep.qweight[r0:r1], signed=signed), prep.scales[r0:r1], zeros)
    bias = None if prep.bias is None else prep.bias.to(x.dtype)
    return F.linear(x, w, bias)


def w4a16_linear(x: torch.Tensor, module):
    """Dispatch target of quant.modules.W4A16Linear; NotImplemented for fp32 activations."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return NotImplemented
    if _layout(module) is not None:
        prep = _from_buffers(module)
    else:
        key = _cache_key(module, None, _W4A16_BUFFERS)
        cached = getattr(module, "_native_prepared", None)
        if cached is None or cached[0] != key:
            prep = prepare_w4a16(module.qweight, module.wscales, module.bias, getattr(module, "wzeros", None))
            object.__setattr__(module, "_native_prepared", (key, prep))
        prep = module._native_prepared[1]
    lead = x.shape[:-1]
    y = w4a16_gemm(_aligned(x.reshape(-1, x.shape[-1])), prep)
    return y.reshape(*lead, prep.n)


# ---------------------------------------------------------------------------------------------------------
# Storage: one copy of each quantized layer on the GPU
#
# The kernels read a converted layout (tile-ordered weight, float32 transposed scales, ...). Caching it beside
# the canonical buffers (prepared_for on an unconverted layer) keeps two copies of every weight: +4.7 GiB on
# FLUX.1-dev (6.2 GiB canonical; converted alone 6.5 GiB, its float32 scales being the difference).
# `prepare_model_` converts each layer once and keeps only the converted tensors, as the layer's
# buffers named native_<field> (so .to(), module_bytes and CPUOffload see them); the non-tensor fields of the
# Prepared* dataclass are kept in the layer's `_native_layout` dict. The conversion is one-way here: the tile
# order is the kernels' private business (it differs per architecture), so a converted layer refuses
# state_dict()/load_state_dict() with a clear error (quant/modules.py) instead of saving a foreign format.

NATIVE_PREFIX = "native_"
LAYOUT_ATTR = "_native_layout"


def _layout(module) -> dict | None:
    return module.__dict__.get(LAYOUT_ATTR)


def is_converted(module) -> bool:
    """True when `module` (a W4A4Linear or W4A16Linear) holds the kernels' layout instead of the canonical one."""
    return _layout(module) is not None


def _from_buffers(module):
    """The Prepared* dataclass of a converted layer, its tensors being the layer's buffers (no copy)."""
    layout = _layout(module)
    tensors = {name: module._buffers[NATIVE_PREFIX + name] for name in layout["tensors"]}
    return layout["cls"](**tensors, **layout["meta"])


def _adopt(module, prep, canonical: tuple[str, ...]) -> None:
    """Make `prep`'s tensors the layer's only storage: drop the canonical buffers, register the prepared ones."""
    tensors, meta = {}, {}
    for f in fields(prep):
        v = getattr(prep, f.name)
        (tensors if isinstance(v, torch.Tensor) else meta)[f.name] = v
    for name in canonical:
        module._buffers.pop(name, None)
    module.__dict__.pop("_native_prepared", None)
    for name, t in tensors.items():
        module.register_buffer(NATIVE_PREFIX + name, t, persistent=False)
    module.__dict__[LAYOUT_ATTR] = dict(cls=type(prep), meta=meta, tensors=tuple(tensors))


def _convertible(t: torch.Tensor) -> bool:
    """Layers are converted where the kernels run: on a CUDA device (a hook for tests)."""
    return t.is_cuda


def to_native_(module, dtype: torch.dtype | None = None) -> bool:
    """Convert one W4A4Linear / W4A16Linear on a CUDA device to the kernels' layout in place (see above).

    dtype: the activation dtype of the W4A4 low-rank factors (default: the layer's own, bf16 when it is
    float32). Returns False, leaving the layer canonical, for layers that stay on the reference ops: not on
    CUDA, already converted, act_quant=False, or a rank the kernels do not take (not a multiple of 16 or
    above 128). The prepared tensors are built before the canonical ones are dropped, so the transient extra
    memory is one layer's worth."""
    from .quant.modules import W4A4Linear, W4A16Linear  # deferred: modules imports native lazily too

    if is_converted(module) or not _convertible(module.qweight):
        return False
    if isinstance(module, W4A4Linear):
        rank = int(module.rank)
        if not module.act_quant or (rank and (rank % 16 or rank > 128)):
            return False
        if dtype is None:
            own = module.lora_down.dtype if rank else (module.bias.dtype if module.bias is not None else None)
            dtype = own if own in (torch.bfloat16, torch.float16) else torch.bfloat16
        prep = prepare_w4a4(module.qweight, module.wscales, module.lora_down if rank else None,
                            module.lora_up if rank else None, module.bias, module.smooth, module.act_unsigned,
                            module.act_shift, dtype, act_pow2=module.act_pow2)
        _adopt(module, prep, _W4A4_BUFFERS)
        return True
    if isinstance(module, W4A16Linear):
        prep = prepare_w4a16(module.qweight, module.wscales, module.bias, module.wzeros)
        _adopt(module, prep, _W4A16_BUFFERS)
        return True
    raise TypeError(f"to_native_: expected a W4A4Linear or W4A16Linear, got {type(module).__name__}")


def prepare_model_(model, dtype: torch.dtype | None = None) -> int:
    """Convert every quantized linear of `model` that lives on a CUDA device to the kernels' layout, in place,
    one layer at a time (each layer's canonical buffers are freed before the next is converted, so the peak
    stays the model plus one layer). Call once at load time; afterwards the GPU holds one copy of each weight.
    Returns the number of layers converted (0, with a warning, when the library or CUDA is unavailable)."""
    from .quant.modules import quantized_linears

    layers = [m for _, m in quantized_linears(model) if not is_converted(m) and _convertible(m.qweight)]
    if not layers or not available(layers[0].qweight.device):
        return 0
    return sum(to_native_(m, dtype) for m in layers)
