"""Fast DiT forward: the FLUX blocks with their memory-bound work fused (the CUDA path of models/dit.py).

models/dit.py stays the readable reference (and the CPU path); on CUDA, with the native library built and
16-bit activations, its blocks and `Flux.forward` dispatch here. Same math, fewer passes over the activations:

  LayerNorm + modulation   one kernel (nl_layernorm_modulate) writing the 16-bit input of the next linear; for a
                           W4A4 linear it is fused into the quantize kernel (`native.layernorm_quantize_act`,
                           after a row-statistics kernel)
  q/k RMSNorm + RoPE       one kernel (nl_qknorm_rope) reading the QKV projection output once and writing q, k,
                           v as [B, L, H, D] straight into the joint (txt + img) buffers: no split, no cat, and
                           SDPA (FlashAttention) reads them as .transpose(1, 2) views
  MLP                      fc1 with the GELU in the GEMM epilogue (W4A4: native epilogue; 16-bit: cuBLASLt's
                           GELU epilogue through torch._addmm_activation), then fc2; optionally (sm_90,
                           NUNCHAKU_LITE_GELU_QUANTIZE=1) fc1's epilogue quantizes for fc2 (W4A4_GELU_QUANTIZE);
                           optionally, on the integer GEMM (power-of-two scales), fc1's epilogue forms fc2's token
                           scales (W4A4_TOKEN_SCALE), so fc2's quantize step skips its statistics pass
  gate + residual          one kernel (nl_gate_residual), fp16 saturation (clip_fp16) included
  single block             linear1 -> [qkv | mlp] -> linear2 on [attn | gelu(mlp)] without a concatenation: 16-bit:
                           linear1 as two GEMMs (qkv rows; mlp rows with the GELU epilogue), linear2 as two GEMMs
                           over its column blocks, the second accumulating in place; W4A4: two GEMMs over one
                           quantized input (qkv rows plain, mlp rows with the GELU epilogue), linear2 as its
                           SplitInputLinear parts added (optionally in the second GEMM's stores,
                           W4A4_ACCUMULATE; a single W4A4 linear2 still gets a concatenated input)
  modulation               silu(vec) once per step, not per block; rope `pe` cached across steps (same ids)
  CUDA graph (optional)    Flux.enable_cuda_graph(): the whole fused step captured once per shape, replayed

No host syncs inside a step. Each fused op has a pure-PyTorch reference beside it (`*_ref`), used on CPU and
by the tests; the block functions run on CPU too (through the references), so the fused-block math is tested
against the unfused modules without a GPU. Rounding: the kernels round where the unfused ops round (LayerNorm
output, 1 + scale, product, sum; gate * y, then + x; RMSNorm, gain, RoPE), so a W4A4 linear sees the same
activation codes as on the plain path, up to rare one-ulp differences of the fp32 reductions (LayerNorm mean
and variance, RMS, tanh in GELU). The 16-bit path's GELU runs in
cuBLASLt's epilogue (fp32, one rounding).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quant.modules import SplitInputLinear, W4A4Linear, _native

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_HALF = (torch.bfloat16, torch.float16)
RMS_EPS = 1e-6  # models/dit.py RMSNorm


# ---------------------------------------------------------------------------------------------------------
# Availability


@functools.cache
def _fused_lib():
    """The native module if it is usable and has the fused-block kernels, else None."""
    native = _native()
    if native is None:
        return None
    try:
        lib, _ = native._lib()
        for name in ("nl_qknorm_rope", "nl_layernorm_modulate", "nl_gate_residual"):
            getattr(lib, name)
    except (AttributeError, native.NativeError):  # an older library without fused_block.cu
        return None
    return native


def usable(x: Tensor) -> bool:
    """True when the fused CUDA path can run on activations like x (CUDA, bf16/fp16, library built, not
    being traced by torch.compile)."""
    return (x.is_cuda and x.dtype in _HALF and not torch.compiler.is_compiling() and _fused_lib() is not None)


def intercepted(module: nn.Module) -> bool:
    """True when something must see the module's (or a submodule's) ordinary calls: forward hooks (the
    quantizer's calibration hooks its linears), global hooks, or torch.compile'd submodules. The fused path
    calls weights directly, so it steps aside then."""
    m = nn.modules.module
    if m._global_forward_hooks or m._global_forward_pre_hooks:
        return True
    for sub in module.modules():
        if sub._forward_hooks or sub._forward_pre_hooks or getattr(sub, "_compiled_call_impl", None) is not None:
            return True
    return False


# ---------------------------------------------------------------------------------------------------------
# Fused op 1: LayerNorm + modulation


def layernorm_modulate_ref(x: Tensor, shift: Tensor, scale: Tensor, tokens_per_batch: int,
                           eps: float = 1e-6) -> Tensor:
    """Reference: x [M, K] (M = B * tokens_per_batch), shift/scale [B, K] -> (1 + scale) * LayerNorm(x) + shift,
    exactly the unfused ops of models/dit.py (ModulationOut.apply(LayerNorm(x))), roundings included."""
    m, k = x.shape
    xn = F.layer_norm(x.view(-1, tokens_per_batch, k), (k,), eps=eps)
    return ((1 + scale[:, None, :]) * xn + shift[:, None, :]).reshape(m, k)


def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor, tokens_per_batch: int, eps: float = 1e-6,
                       out: Tensor | None = None) -> Tensor:
    """(1 + scale) * LayerNorm(x) + shift for x [M, K] (row-strided allowed), shift/scale [B, K] (row-strided
    views, e.g. chunks of the modulation output). Native kernel on CUDA, else the reference."""
    native = _fused_lib() if x.is_cuda and x.dtype in _HALF else None
    m, k = x.shape
    if native is None or k % 8 or k > 3072 or not _row_ok(x, 8) or not _row_ok(shift, 8) or not _row_ok(scale, 8) \
            or shift.stride(0) != scale.stride(0) or shift.dtype != x.dtype or scale.dtype != x.dtype:
        y = layernorm_modulate_ref(x, shift, scale, tokens_per_batch, eps)
        return y if out is None else out.copy_(y)
    if out is None:
        out = torch.empty(m, k, dtype=x.dtype, device=x.device)
    native._call("nl_layernorm_modulate", native._ptr(x), _DTYPE_CODE[x.dtype], m, k, x.stride(0),
                 tokens_per_batch, native._ptr(shift), native._ptr(scale), shift.stride(0) if shift.shape[0] > 1
                 else 0, float(eps), native._ptr(out), out.stride(0), native._stream(x.device))
    return out


def _row_ok(t: Tensor, mult: int) -> bool:
    """2-D, unit column stride, row stride a multiple of `mult` elements, 16-byte aligned."""
    return (t.dim() == 2 and t.stride(1) == 1 and (t.shape[0] == 1 or t.stride(0) % mult == 0)
            and t.data_ptr() % 16 == 0)


def act_layout(device, prep) -> str:
    """The activation layout the W4A4 GEMM of `device` reads for the prepared layer `prep` (native.act_layout):
    "packed", "fp8_tiles" (sm_90 wgmma) or "s8_tiles" (sm_90, power-of-two scales on both operands)."""
    native = _fused_lib()
    return native.act_layout(prep, native.default_path(device))


# ---------------------------------------------------------------------------------------------------------
# Fused op 2: gate + residual


def gate_residual_ref(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """Reference: x [B, L, N], gate [B, N], y [B*L, N] -> clip_fp16(x + gate * y) (the unfused ops)."""
    from .models.dit import clip_fp16
    return clip_fp16(x + gate[:, None, :] * y.reshape(x.shape))


def gate_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """x + gate * y in one pass with the unfused roundings (nl_gate_residual); the reference elsewhere."""
    native = _fused_lib() if x.is_cuda and x.dtype in _HALF else None
    b, L, n = x.shape
    if native is None or n % 8 or not x.is_contiguous() or x.data_ptr() % 16 or not _row_ok(y, 8) \
            or not _row_ok(gate, 8) or y.dtype != x.dtype or gate.dtype != x.dtype or y.shape != (b * L, n):
        return gate_residual_ref(x, gate, y)
    out = torch.empty_like(x)
    native._call("nl_gate_residual", native._ptr(x), native._ptr(y), y.stride(0), native._ptr(gate),
                 gate.stride(0) if b > 1 else 0, _DTYPE_CODE[x.dtype], b * L, n, L, native._ptr(out),
                 native._stream(x.device))
    return out


# ---------------------------------------------------------------------------------------------------------
# Fused op 3: q/k RMSNorm + RoPE, written into joint [B, L, H, D] buffers


def _rms_norm_ref(x: Tensor, scale: Tensor, eps: float) -> Tensor:
    # models/dit.py RMSNorm + QKNorm's .to(v): fp32 norm, round, times the gain, round
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype) * scale
    return y.to(x.dtype)


def qknorm_rope_ref(qkv: Tensor, tokens_per_batch: int, num_heads: int, q_scale: Tensor, k_scale: Tensor,
                    pe: Tensor | None, q: Tensor, k: Tensor, v: Tensor, tok_offset: int = 0,
                    eps: float = RMS_EPS) -> None:
    """Reference of nl_qknorm_rope. qkv [M, >= 3*H*D] (its first 3*H*D columns are [q | k | v], head-major),
    pe [B or 1, 1, L_out, D/2, 2, 2] or None; writes tokens tok_offset.. of q, k, v [B, L_out, H, D]."""
    m = qkv.shape[0]
    b, L, H = m // tokens_per_batch, tokens_per_batch, num_heads
    d = q.shape[-1]
    xq, xk, xv = qkv[:, : 3 * H * d].reshape(b, L, 3, H, d).unbind(2)  # [B, L, H, D] each
    yq, yk = _rms_norm_ref(xq, q_scale, eps), _rms_norm_ref(xk, k_scale, eps)
    if pe is not None:
        from .models.dit import apply_rope
        yq, yk = apply_rope(yq, yk, pe[:, 0, tok_offset: tok_offset + L, None])  # [B, L, 1, D/2, 2, 2]
    q[:, tok_offset: tok_offset + L] = yq
    k[:, tok_offset: tok_offset + L] = yk
    v[:, tok_offset: tok_offset + L] = xv


def qknorm_rope(qkv: Tensor, tokens_per_batch: int, num_heads: int, q_scale: Tensor, k_scale: Tensor,
                pe: Tensor | None, q: Tensor, k: Tensor, v: Tensor, tok_offset: int = 0,
                eps: float = RMS_EPS) -> None:
    """q/k RMSNorm + RoPE of the QKV projection output into the joint buffers (see qknorm_rope_ref): the
    native kernel on CUDA, else the reference."""
    native = _fused_lib() if qkv.is_cuda and qkv.dtype in _HALF else None
    d = q.shape[-1]
    ok = (native is not None and qkv.dim() == 2 and qkv.stride(1) == 1 and qkv.stride(0) % 2 == 0
          and qkv.data_ptr() % 4 == 0 and d % 64 == 0 and d <= 256 and all(
              t.is_contiguous() and t.dtype == qkv.dtype for t in (q, k, v))
          and q_scale.dtype in _DTYPE_CODE and k_scale.dtype == q_scale.dtype
          and q_scale.is_contiguous() and k_scale.is_contiguous()
          and (pe is None or (pe.dtype == torch.float32 and pe.is_contiguous() and pe.data_ptr() % 16 == 0)))
    if not ok:
        return qknorm_rope_ref(qkv, tokens_per_batch, num_heads, q_scale, k_scale, pe, q, k, v, tok_offset, eps)
    m = qkv.shape[0]
    L_out = q.shape[1]
    pe_stride = 0 if pe is None or pe.shape[0] == 1 else pe[0].numel()
    native._call("nl_qknorm_rope", native._ptr(qkv), _DTYPE_CODE[qkv.dtype], m, tokens_per_batch, qkv.stride(0),
                 num_heads, d, native._ptr(q_scale), native._ptr(k_scale), _DTYPE_CODE[q_scale.dtype], float(eps),
                 native._ptr(pe, "float *"), pe_stride, native._ptr(q), native._ptr(k), native._ptr(v), L_out,
                 tok_offset, native._stream(qkv.device))


# ---------------------------------------------------------------------------------------------------------
# Linears: 16-bit (nn.Linear), W4A4 (native kernels), anything else through its module


def gelu(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


@functools.cache
def _lt_gelu_is_tanh(device: torch.device) -> bool:
    """Whether torch._addmm_activation(use_gelu=True) computes GELU(tanh) on this device (cuBLASLt's
    epilogue is the tanh form; checked once per device on a small fp32 product, the only host sync)."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(64, 64, device=device, generator=g) * 2
        w = torch.randn(64, 64, device=device, generator=g) / 8
        b = torch.randn(64, device=device, generator=g)
        y = torch._addmm_activation(b, x, w.t(), use_gelu=True)
        ref = F.linear(x, w, b)
        return bool((y - gelu(ref)).abs().max() < 1e-4 < (y - F.gelu(ref)).abs().max())
    except Exception:
        return False


def _w4a4_fast(lin: nn.Module, x: Tensor) -> bool:
    return (isinstance(lin, W4A4Linear) and lin.act_quant and x.is_cuda and x.dtype in _HALF
            and lin.in_features % 64 == 0 and (lin.rank % 16 == 0 and lin.rank <= 128)
            and _fused_lib() is not None)


# The native GELU epilogue rounds the linear's fp32 result to the output dtype, applies GELU in fp32 and rounds
# again: the plain path's roundings, so fc2 sees the same activation codes up to the last-bit differences of
# the two tanh implementations. True: the epilogue (one pass less over the MLP activations); False: GELU as
# its own pass (torch's GELU, for comparisons).
W4A4_GELU_EPILOGUE = True
# On the sm_90 path the MLP's first GEMM can also quantize its GELU output for the second W4A4 linear
# (native.w4a4_gemm_gelu_quantize: the same codes, no 16-bit intermediate): an MLP is then two kernels. Off by
# default: its exact divisions lengthened the (latency-bound) GEMM by more than the quantize pass it saves at
# 1024x1024 (H100: 223 vs 184 ms per FLUX.1-dev step, bench/results/h100-2026-11-25c/gelu_quantize_*; it
# multiplies by reciprocals since, not re-timed).
# NUNCHAKU_LITE_GELU_QUANTIZE=1 turns it on.
W4A4_GELU_QUANTIZE = os.environ.get("NUNCHAKU_LITE_GELU_QUANTIZE", "0") == "1"
# Two epilogue fusions of the integer GEMM, off by default: both give the same bits as the separate passes,
# but on the H100 neither made the step faster (bench/results/h100-2026-12-08: their epilogue work runs after
# the tile's last group, with its global loads exposed, and cost about what the pass they replace did).
# W4A4_ACCUMULATE (NUNCHAKU_LITE_ACCUMULATE=1): the single block's split linear2, the second part's GEMM adding
# into the first part's output in its stores (epilogue "accumulate") instead of an add_.
# W4A4_TOKEN_SCALE (NUNCHAKU_LITE_TOKEN_SCALE=1): a linear whose output feeds another power-of-two W4A4 linear
# (fc1 -> fc2, the single block's mlp rows -> linear2's second part) forms that layer's token scales in its
# epilogue (native.w4a4_gemm_token_scale), and quantizing its input skips the statistics pass.
W4A4_ACCUMULATE = os.environ.get("NUNCHAKU_LITE_ACCUMULATE", "0") == "1"
W4A4_TOKEN_SCALE = os.environ.get("NUNCHAKU_LITE_TOKEN_SCALE", "0") == "1"


class Prequantized(NamedTuple):
    """A linear's input already quantized for it (native.QuantizedActivation) and its 16-bit dtype."""
    act: object
    dtype: torch.dtype


class Scaled(NamedTuple):
    """A linear's 16-bit input y with its power-of-two token scales for that linear (float [M], from the GEMM
    that wrote y: native.w4a4_gemm_token_scale)."""
    y: Tensor
    token_scale: Tensor


def _token_scale_target(prep, nxt: nn.Module | None, x: Tensor):
    """The next layer's PreparedW4A4 when this layer's integer GEMM can form its token scales (see Scaled)."""
    if not (W4A4_TOKEN_SCALE and nxt is not None and _w4a4_fast(nxt, x)
            and act_layout(x.device, prep) == "s8_tiles"):
        return None
    nprep = _fused_lib().prepared_for(nxt, x.dtype)
    ok = (nprep.act_pow2 and act_layout(x.device, nprep) == "s8_tiles" and prep.n == prep.w_tiled.shape[0]
          and nprep.k == prep.n)
    return nprep if ok else None


def _gelu_quantize_target(prep, nxt: nn.Module | None, x: Tensor):
    """The next layer's PreparedW4A4 when fc1 -> GELU -> nxt can run as one GEMM with the quantizing epilogue."""
    if not (W4A4_GELU_QUANTIZE and W4A4_GELU_EPILOGUE and nxt is not None and _w4a4_fast(nxt, x)
            and act_layout(x.device, prep) == "fp8_tiles"):
        return None
    nprep = _fused_lib().prepared_for(nxt, x.dtype)
    # the epilogue quantizes with plain scales: not for a power-of-two next layer
    ok = (not nprep.act_pow2 and prep.n % 128 == 0 and nprep.k == prep.n and nprep.rank <= 64
          and all(t is None or t.dtype == x.dtype for t in (prep.lora_up, nprep.lora_down)))
    return nprep if ok else None


def _gemm(act, prep, dtype: torch.dtype, gelu_act: bool = False, nxt=None, acc: Tensor | None = None,
          scale_for=None):
    """The W4A4 GEMM of a quantized activation; with GELU and `nxt` (the next layer's PreparedW4A4, see
    _gelu_quantize_target) it returns nxt's QuantizedActivation instead of the GELU output. acc [M, N]: the
    result is added into it (acc.add_(y)'s roundings; on the integer GEMM in its stores) and acc returned.
    scale_for (the next layer's PreparedW4A4, see _token_scale_target): returns a Scaled."""
    native = _fused_lib()
    if gelu_act and nxt is not None:
        return Prequantized(native.w4a4_gemm_gelu_quantize(act, prep, nxt, dtype), dtype)
    if scale_for is not None and acc is None and (W4A4_GELU_EPILOGUE or not gelu_act):
        epilogue = "gelu_tanh" if gelu_act else "none"
        return Scaled(*native.w4a4_gemm_token_scale(act, prep, scale_for, dtype, epilogue))
    if acc is not None and W4A4_ACCUMULATE and not gelu_act and prep.n == prep.w_tiled.shape[0] \
            and acc.is_contiguous():
        return native.w4a4_gemm(act, prep, dtype, "accumulate", out=acc)
    y = native.w4a4_gemm(act, prep, dtype, "gelu_tanh" if gelu_act and W4A4_GELU_EPILOGUE else "none")
    y = y if y.shape[1] == prep.n else y[:, : prep.n]
    y = gelu(y) if gelu_act and not W4A4_GELU_EPILOGUE else y
    return y if acc is None else acc.add_(y)


def linear(lin: nn.Module, x: Tensor, act: str | None = None, acc: Tensor | None = None) -> Tensor:
    """lin(x) for x [M, K] (row-strided allowed), optionally followed by GELU(tanh) (act="gelu"), fused into
    the GEMM where the backend can. acc: add the result into acc instead (acc.add_(lin(x)); no GELU), fused
    into the W4A4 GEMM's stores where it can."""
    tok = None
    if isinstance(x, Scaled):  # its token scales serve a W4A4 linear's quantize step, nothing else
        x, tok = x
    if acc is not None:
        if act is not None:
            raise ValueError("fused.linear: acc and act do not combine")
        if isinstance(x, Prequantized):
            return _gemm(x.act, _fused_lib().prepared_for(lin, x.dtype), x.dtype, acc=acc)
        if not _w4a4_fast(lin, x):
            return acc.add_(linear(lin, x))
    if type(lin) is nn.Linear:
        if act == "gelu" and x.is_cuda and lin.bias is not None and _lt_gelu_is_tanh(x.device):
            return torch._addmm_activation(lin.bias, x, lin.weight.t(), use_gelu=True)
        y = F.linear(x, lin.weight, lin.bias)
    elif isinstance(x, Prequantized):  # already quantized for lin (the GELU -> quantize epilogue)
        return _gemm(x.act, _fused_lib().prepared_for(lin, x.dtype), x.dtype)
    elif _w4a4_fast(lin, x):
        native = _fused_lib()
        prep = native.prepared_for(lin, x.dtype)
        if x.stride(1) != 1 or x.stride(0) != x.shape[1] or x.data_ptr() % 16:
            x = x.contiguous()
        layout = act_layout(x.device, prep)
        qa = native.quantize_act(x, prep.smooth, prep.lora_down, prep.act_unsigned, prep.act_shift,
                                 layout=layout, pow2=prep.act_pow2, inv_smooth=prep.inv_smooth,
                                 token_scale=tok if layout == "s8_tiles" and prep.act_pow2 else None)
        return _gemm(qa, prep, x.dtype, act == "gelu", acc=acc)
    else:
        y = lin(x)
    return gelu(y) if act == "gelu" else y


def ln_linear(lin: nn.Module, x: Tensor, shift: Tensor, scale: Tensor, tokens_per_batch: int, eps: float,
              act: str | None = None, parts: list | None = None, nxt: nn.Module | None = None):
    """lin((1 + scale) * LN(x) + shift) [+ GELU]. W4A4: LayerNorm + modulation feed the quantize step directly;
    `parts` = row ranges [(lo, hi, act), ...] returns one output per range (one quantized input, one GEMM per
    range: used for the single block's [qkv | mlp] with GELU on the mlp rows only). `nxt`: the layer that reads
    the GELU output (of the last range); where the GEMM can quantize for it, that output is a Prequantized."""
    if _w4a4_fast(lin, x) and eps == 1e-6:
        native = _fused_lib()
        prep = native.prepared_for(lin, x.dtype)
        qa = native.layernorm_quantize_act(x, shift, scale, tokens_per_batch, prep.smooth, prep.lora_down,
                                           prep.act_unsigned, prep.act_shift, act_layout(x.device, prep), eps,
                                           pow2=prep.act_pow2, inv_smooth=prep.inv_smooth)
        if parts is None:
            return _gemm_for_next(qa, prep, x, act, nxt)
        preps = _row_split(lin, prep, parts)
        return [_gemm_for_next(qa, p, x, a, nxt if i == len(parts) - 1 else None)
                for i, (p, (_, _, a)) in enumerate(zip(preps, parts))]
    y = linear(lin, layernorm_modulate(x, shift, scale, tokens_per_batch, eps), act)
    if parts is None:
        return y
    return [gelu(y[:, lo:hi]) if a == "gelu" else y[:, lo:hi] for lo, hi, a in parts]


def _gemm_for_next(qa, prep, x: Tensor, act: str | None, nxt: nn.Module | None):
    """_gemm of ln_linear's quantized input, handing the next layer `nxt` what it can use: its quantized input
    (GELU -> quantize epilogue, a Prequantized), or its token scales (a Scaled), or the plain output."""
    gq = _gelu_quantize_target(prep, nxt, x) if act else None
    ts = _token_scale_target(prep, nxt, x) if gq is None else None
    return _gemm(qa, prep, x.dtype, act == "gelu", gq, scale_for=ts)


def _row_split(lin: W4A4Linear, prep, parts) -> list:
    """PreparedW4A4 views of output-row ranges of a prepared layer (cached on the module): the tiled weight,
    lora_up and bias rows are views, the [K/64, N] weight scales are copied (small). Row bounds must be
    multiples of 128 (the weight tile). The cache is keyed on the prepared tensors' storage, not on the
    PreparedW4A4 object, which a converted layer builds anew at every call (native.prepared_for)."""
    cached = getattr(lin, "_fused_row_split", None)
    tensors = (prep.w_tiled, prep.w_scales, prep.w_exp, prep.w_chscale, prep.bias, prep.lora_up)
    key = (tuple(None if t is None else (t.data_ptr(), t.shape) for t in tensors),
           tuple((lo, hi) for lo, hi, _ in parts))
    if cached is not None and cached[0] == key:
        return cached[1]
    from dataclasses import replace
    out = []
    for lo, hi, _ in parts:
        if lo % 128 or (hi % 128 and hi != prep.n):
            raise ValueError(f"fused: row split [{lo}, {hi}) of {type(lin).__name__} is not 128-aligned")
        hp = -(-hi // 128) * 128
        # w_tiled is [Np, K/2] bytes in 128-row tiles (both layouts), so a 128-aligned row range is a slice
        rows = lambda t: None if t is None else t[lo:hp]
        cols = lambda t: None if t is None else t[:, lo:hp].contiguous()
        out.append(replace(prep, w_tiled=prep.w_tiled[lo:hp], w_scales=cols(prep.w_scales), bias=rows(prep.bias),
                           lora_up=rows(prep.lora_up), n=hi - lo, alt={}, w_chscale=rows(prep.w_chscale),
                           w_exp=cols(prep.w_exp)))
    object.__setattr__(lin, "_fused_row_split", (key, out))
    return out


# ---------------------------------------------------------------------------------------------------------
# Blocks


@dataclass
class JointQKV:
    """The q, k, v buffers [B, L, H, D] of a joint attention, reused by every block of a step."""
    q: Tensor
    k: Tensor
    v: Tensor

    @classmethod
    def empty(cls, b: int, L: int, h: int, d: int, like: Tensor) -> "JointQKV":
        return cls(*(torch.empty(b, L, h, d, dtype=like.dtype, device=like.device) for _ in range(3)))

    def fits(self, b: int, L: int, h: int, d: int, like: Tensor) -> bool:
        return tuple(self.q.shape) == (b, L, h, d) and self.q.dtype == like.dtype and self.q.device == like.device

    def attention(self) -> Tensor:
        """SDPA over the buffers -> [B, L, H*D]."""
        b, L, h, d = self.q.shape
        x = F.scaled_dot_product_attention(self.q.transpose(1, 2), self.k.transpose(1, 2), self.v.transpose(1, 2))
        return x.transpose(1, 2).reshape(b, L, h * d)


def _buffers(bufs: JointQKV | None, b, L, h, d, like) -> JointQKV:
    return bufs if bufs is not None and bufs.fits(b, L, h, d, like) else JointQKV.empty(b, L, h, d, like)


def _chunks(mod_out: Tensor, n: int) -> list[Tensor]:
    """[B, n*D] modulation output -> n views [B, D] (shift, scale, gate, ...)."""
    return list(mod_out.chunk(n, dim=-1))


def double_block(block: nn.Module, img: Tensor, txt: Tensor, silu_vec: Tensor, pe: Tensor,
                 bufs: JointQKV | None = None) -> tuple[Tensor, Tensor]:
    """DoubleStreamBlock.forward with fused ops; silu_vec = F.silu(vec) (shared by all blocks of a step)."""
    B, Li, D = img.shape
    Lt = txt.shape[1]
    H = block.num_heads
    hd = D // H
    bufs = _buffers(bufs, B, Lt + Li, H, hd, img)
    im = _chunks(linear(block.img_mod.lin, silu_vec), 6)
    tm = _chunks(linear(block.txt_mod.lin, silu_vec), 6)
    img2, txt2 = img.reshape(B * Li, D), txt.reshape(B * Lt, D)

    for x2, L, m, attn_mod, norm1, off in ((txt2, Lt, tm, block.txt_attn, block.txt_norm1, 0),
                                            (img2, Li, im, block.img_attn, block.img_norm1, Lt)):
        qkv = ln_linear(attn_mod.qkv, x2, m[0], m[1], L, norm1.eps)
        qn = attn_mod.norm
        qknorm_rope(qkv, L, H, qn.query_norm.scale, qn.key_norm.scale, pe, bufs.q, bufs.k, bufs.v, off)
    attn = bufs.attention()

    outs = []
    for x, x2, L, m, s, off in ((img, img2, Li, im, "img", Lt), (txt, txt2, Lt, tm, "txt", 0)):
        a = attn[:, off: off + L].reshape(B * L, D)
        x = gate_residual(x, m[2], linear(getattr(block, f"{s}_attn").proj, a))
        mlp = getattr(block, f"{s}_mlp")
        h = ln_linear(mlp[0], x.view(B * L, D), m[3], m[4], L, getattr(block, f"{s}_norm2").eps, act="gelu",
                      nxt=mlp[2])
        x = gate_residual(x, m[5], linear(mlp[2], h))
        outs.append(x)
    return outs[0], outs[1]


def single_block(block: nn.Module, x: Tensor, silu_vec: Tensor, pe: Tensor, bufs: JointQKV | None = None) -> Tensor:
    """SingleStreamBlock.forward with fused ops."""
    B, L, D = x.shape
    H, F_ = block.num_heads, block.mlp_hidden
    hd = D // H
    bufs = _buffers(bufs, B, L, H, hd, x)
    shift, scale, gate = _chunks(linear(block.modulation.lin, silu_vec), 3)
    x2 = x.reshape(B * L, D)
    lin1, lin2, qn = block.linear1, block.linear2, block.norm
    w4a4 = _w4a4_fast(lin1, x2)
    if _dense_cuda(lin1, lin2, x2):  # split both linears by rows/columns: no GELU pass, no concatenation
        xm = layernorm_modulate(x2, shift, scale, L, block.pre_norm.eps)
        w1, b1, w2 = lin1.weight, lin1.bias, lin2.weight
        qkv = torch.addmm(b1[: 3 * D], xm, w1[: 3 * D].t())
        mlp = torch._addmm_activation(b1[3 * D:], xm, w1[3 * D:].t(), use_gelu=True)  # GELU in the epilogue
        qknorm_rope(qkv, L, H, qn.query_norm.scale, qn.key_norm.scale, pe, bufs.q, bufs.k, bufs.v, 0)
        attn = bufs.attention().reshape(B * L, D)
        y = torch.addmm(lin2.bias, attn, w2[:, :D].t()) if lin2.bias is not None else attn @ w2[:, :D].t()
        return gate_residual(x, gate, y.addmm_(mlp, w2[:, D:].t()))  # + gelu(mlp) @ W2b^T, accumulated in place
    if not w4a4:
        # generic layout (CPU, other linears): one buffer [q | k | v | gelu(mlp)]; the attention output goes into
        # the consumed v slot, so a dense linear2 reads [attn | gelu(mlp)] as a strided view (no cat)
        y1 = _single_linear1(lin1, x2, shift, scale, L, block.pre_norm.eps, 3 * D)
        qknorm_rope(y1, L, H, qn.query_norm.scale, qn.key_norm.scale, pe, bufs.q, bufs.k, bufs.v, 0)
        mlp = y1[:, 3 * D:]
        attn = bufs.attention()
        if type(lin2) is nn.Linear:
            y1[:, 2 * D: 3 * D].view(B, L, D).copy_(attn)
            return gate_residual(x, gate, linear(lin2, y1[:, 2 * D:]))
        return gate_residual(x, gate, _linear2(lin2, attn.reshape(B * L, D), mlp))
    mlp_in = lin2.parts[1] if isinstance(lin2, SplitInputLinear) and lin2.splits == [D, F_] else None
    qkv, mlp = ln_linear(lin1, x2, shift, scale, L, block.pre_norm.eps,
                         parts=[(0, 3 * D, None), (3 * D, 3 * D + F_, "gelu")], nxt=mlp_in)
    qknorm_rope(qkv, L, H, qn.query_norm.scale, qn.key_norm.scale, pe, bufs.q, bufs.k, bufs.v, 0)
    attn = bufs.attention()
    return gate_residual(x, gate, _linear2(lin2, attn.reshape(B * L, D), mlp))


def _dense_cuda(lin1: nn.Module, lin2: nn.Module, x: Tensor) -> bool:
    """The single block's 16-bit CUDA layout: linear1 as two GEMMs (qkv rows; mlp rows with cuBLASLt's GELU
    epilogue), linear2 as two GEMMs over its column blocks, the second accumulating in place (beta = 1: one
    extra bf16 rounding of the attention half's partial sum, instead of a GELU pass and a concatenation)."""
    return (type(lin1) is nn.Linear and type(lin2) is nn.Linear and x.is_cuda and lin1.bias is not None
            and _lt_gelu_is_tanh(x.device))


def _single_linear1(lin1: nn.Module, x: Tensor, shift: Tensor, scale: Tensor, L: int, eps: float, n_qkv: int):
    """[qkv | gelu(mlp)] = linear1(LN-modulated x) with GELU in place on the columns from n_qkv on."""
    y1 = linear(lin1, layernorm_modulate(x, shift, scale, L, eps))
    torch.ops.aten.gelu_(y1[:, n_qkv:], approximate="tanh")
    return y1


def _linear2(lin2: nn.Module, attn: Tensor, mlp: Tensor) -> Tensor:
    """The single block's linear2 on [attn | gelu(mlp)]: a SplitInputLinear of two parts takes each part
    directly (no concatenation), anything else gets the concatenated input."""
    if isinstance(lin2, SplitInputLinear) and (isinstance(mlp, Prequantized)
                                               or lin2.splits == [attn.shape[1], _width(mlp)]):
        return linear(lin2.parts[1], mlp, acc=linear(lin2.parts[0], attn))  # an add_, or (W4A4_ACCUMULATE)
        # in the second GEMM's stores
    return linear(lin2, torch.cat((attn, mlp.y if isinstance(mlp, Scaled) else mlp), dim=1))


def _width(x) -> int:
    return (x.y if isinstance(x, Scaled) else x).shape[1]


def last_layer(layer: nn.Module, x: Tensor, silu_vec: Tensor) -> Tensor:
    B, L, D = x.shape
    shift, scale = _chunks(linear(layer.adaLN_modulation[1], silu_vec), 2)
    y = ln_linear(layer.linear, x.reshape(B * L, D), shift, scale, L, layer.norm_final.eps)
    return y.view(B, L, -1)


# ---------------------------------------------------------------------------------------------------------
# The whole model


_PE_CACHE = True


def _pe(model: nn.Module, txt_ids: Tensor, img_ids: Tensor) -> Tensor:
    """pe_embedder(cat(txt_ids, img_ids)), cached on the model while the same ids tensors come back unchanged
    (the sampler passes the same ids every step)."""
    if not _PE_CACHE:
        return model.pe_embedder(torch.cat((txt_ids, img_ids), dim=1)).contiguous()
    c = getattr(model, "_fused_pe", None)
    ver = tuple(None if t.is_inference() else t._version for t in (txt_ids, img_ids))  # inference tensors have
    # no version counter (they cannot change outside inference mode; the sampler never writes its ids)
    if c is not None and c[0] is txt_ids and c[1] is img_ids and c[2] == ver:
        return c[3]
    pe = model.pe_embedder(torch.cat((txt_ids, img_ids), dim=1)).contiguous()
    object.__setattr__(model, "_fused_pe", (txt_ids, img_ids, ver, pe))  # strong refs: no id reuse
    return pe


def flux_forward(model: nn.Module, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                 y: Tensor, guidance: Tensor | None = None) -> Tensor:
    """models.dit.Flux.forward with fused blocks (the caller has checked the inputs)."""
    vec = model.conditioning(timesteps, y, guidance, img.dtype)
    img = model.img_in(img)
    txt = model.txt_in(txt.to(img.dtype))
    pe = _pe(model, txt_ids, img_ids)
    silu_vec = F.silu(vec)
    B, Lt, Li = img.shape[0], txt.shape[1], img.shape[1]
    bufs = JointQKV.empty(B, Lt + Li, model.num_heads, model.hidden_size // model.num_heads, img)
    for block in model.double_blocks:
        img, txt = double_block(block, img, txt, silu_vec, pe, bufs)
    x = torch.cat((txt, img), dim=1)
    for block in model.single_blocks:
        x = single_block(block, x, silu_vec, pe, bufs)
    return last_layer(model.final_layer, x[:, Lt:], silu_vec)


# ---------------------------------------------------------------------------------------------------------
# CUDA graph of a whole step (optional: Flux.enable_cuda_graph)


@dataclass
class _Graph:
    key: tuple
    graph: "torch.cuda.CUDAGraph"
    inputs: dict
    out: Tensor


def _graph_key(model: nn.Module, inputs: dict) -> tuple:
    # shapes/dtypes of the inputs and the identity of every weight: a replaced or reallocated tensor (e.g.
    # quantization in place, .to()) re-captures instead of replaying stale pointers
    shapes = tuple((k, None if v is None else (tuple(v.shape), v.dtype, v.device)) for k, v in inputs.items())
    weights = tuple(t.data_ptr() for t in model.parameters()) + tuple(t.data_ptr() for t in model.buffers())
    return (shapes, weights, W4A4_GELU_EPILOGUE, W4A4_ACCUMULATE, W4A4_TOKEN_SCALE,
            torch.is_inference_mode_enabled())


def graphed_forward(model: nn.Module, **inputs) -> Tensor:
    """flux_forward replayed from a CUDA graph (captured on the first call for these shapes and weights, after
    two warmup steps): no per-kernel launch cost on the host. The inputs are copied into the graph's static
    buffers; the output is a fresh tensor. The rope table is computed inside the graph (ids may change)."""
    key = _graph_key(model, inputs)
    g = getattr(model, "_fused_graph", None)
    if g is None or g.key != key:
        object.__setattr__(model, "_fused_graph", None)  # free the old graph's pool first
        static = {k: None if v is None else v.clone() for k, v in inputs.items()}
        side = torch.cuda.Stream(inputs["img"].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # allocator warmup, one-time probes and weight preparation happen here
                flux_forward(model, **static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        object.__setattr__(model, "_fused_pe", None)
        with _no_pe_cache(), torch.cuda.graph(graph):
            out = flux_forward(model, **static)
        g = _Graph(key, graph, static, out)
        object.__setattr__(model, "_fused_graph", g)
    for k, v in inputs.items():
        if v is not None:
            g.inputs[k].copy_(v)
    g.graph.replay()
    return g.out.clone()


class _no_pe_cache:
    """Inside a graph capture the rope table must be computed by the graph itself, not taken from the cache."""

    def __enter__(self):
        global _PE_CACHE
        self.prev, _PE_CACHE = _PE_CACHE, False

    def __exit__(self, *exc):
        global _PE_CACHE
        _PE_CACHE = self.prev
