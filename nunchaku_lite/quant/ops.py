"""Reference ops for SVDQuant W4A4 / W4A16: the exact semantics the CUDA kernels must reproduce.

Everything here is plain PyTorch (CPU or CUDA). Kernels must match the integer codes bit for bit and the
outputs to ~1e-3 relative; `w4a4_linear_f64` gives a float64 ground truth on given codes for kernel tests.

Groups. GROUP = 64 consecutive elements along K (the input dimension). K must be a multiple of 64
(modules.py pads at build time).

Activation quantization (per token m, per group g), all in float32, every operation separately rounded:
    xs = x.float()
    xs = xs + shift                      (shift = 0.171875 for the unsigned post-GELU inputs, else 0)
    xs = xs * inv_smooth                 (per input channel; inv_smooth = 1 / smooth, correctly rounded:
                                          `smooth_reciprocal`)
    amax = max |xs| over the group
    scale = amax / 7     (signed)    or  amax / 15     (unsigned)             (IEEE division)
    codes = clamp(round_half_even(xs * (1 / scale)), -8, 7)    or  clamp(..., 0, 15)
                                         (1 / scale correctly rounded, the product rounded to float32,
                                          then rounded to an integer: two roundings, no fused multiply-add)
    scale below 2^-126 (subnormal or 0: an all-zero or all-but-zero group) -> codes 0, the scale kept as it is
                                         (1 / scale would overflow; never NaN)
Reciprocals rather than divisions: the kernels spend one multiplication per element on each, where a
correctly rounded division per element took several instructions in kernels bound by instruction issue; the
codes differ from division's only where a quotient lies within an ulp or two of a rounding boundary (and in
groups whose scale is below 2^-126, all codes 0 here).
Inputs are expected finite (codes of non-finite xs are unspecified; scales follow amax).
The shift is added *before* the smoothing, as in Nunchaku's kernels (NUNCHAKU_FORMAT.md §4.1).
Power-of-two variant (`quantize_act(..., pow2=True)`, layers with `act_pow2`; `pow2_act_scales`): with
s = the token's largest plain scale, each group's scale becomes s * 2^-e for the largest e <= POW2_MAX_EXP with
s * 2^-e >= its plain scale (so nothing clips), and the codes are computed with that scale. Same format; it lets
the Hopper GEMM fold every group scale into 8-bit integer operands (`pack_act_s8_tiles`).

Weight quantization (per output row n, per group g): scale = amax / 7, first rounded to the storage dtype
of the scales (bf16 by default); codes = clamp(round_half_even(w / float(scale_rounded)), -8, 7).
Power-of-two variant (`quantize_weight(..., pow2=True)`, the Hopper fast path's format): every group scale
is the row's channel scale times 2^-e, 0 <= e <= POW2_MAX_EXP (see `pow2_group_scales`). Same format and
same linear semantics; the constraint only lets the sm_90 GEMMs fold 2^-e into their weight operand
(`pow2_split`): into e4m3 (any e <= FP8_FOLD_MAX_EXP), which removes one of two fp32 operations per group, or,
together with power-of-two activation scales, into int8 (code << (4 - e)), which removes the per-group
promotion altogether (one integer accumulation over all of K).

Packed storage ("canonical order", row-major over [N, K]): byte j of a row holds elements 2j (low nibble)
and 2j+1 (high nibble), each the 4-bit two's complement of a signed code (or the plain unsigned code):
    byte = (c[2j] & 0xF) | (c[2j+1] & 0xF) << 4          -> uint8 [..., K/2]
Scales are stored [N, K/64] (row = output channel), unlike Nunchaku's tiled [K/64, N].

W4A4 linear, x [..., K] (leading dims flattened to M tokens), weight codes C [N, K], weight scales sw [N, G]:
    qa, sa = quantize_act(x, smooth, unsigned, shift)
    dot[m, n, g] = sum_k qa[m, g, k] * C[n, g, k]          exact integer (|dot| <= 64*8*15 < 2^24, so exact
                                                             in float32 too, whatever the summation order)
    acc = 0 (float32);  for g = 0 .. G-1 in index order:
        acc = acc + (sa[m, g] * sw[n, g]) * dot[m, n, g]     three separately rounded fp32 ops: the two scales
                                                             are multiplied first, no fused multiply-add
    acc = acc + (x.float() @ lora_down.float().T) @ lora_up.float().T   low-rank branch on the RAW input x
                                                             (1/smooth is folded into lora_down; no shift)
    acc = acc + bias.float()
    y = acc.to(out_dtype or x.dtype)
Only the integer part and its in-order fp32 group accumulation are bit-exact requirements; the low-rank
matmuls may use any fp32-accumulating order (outputs then agree to ~1e-3).

W4A16 linear (modulation layers, weight-only): W = dequantize(codes, scales) in float32 (plus the zero
point, W = U * s + z with unsigned codes U, when `wzeros` is given: Nunchaku's AWQ layers);
y = (x.float() @ W.T + bias.float()).to(x.dtype).
"""
import torch

GROUP = 64
MIN_NORMAL = 2.0 ** -126  # the smallest normal float32: activation scales below it give codes 0
UNSIGNED_SHIFT = 0.171875  # Nunchaku's constant shift of post-GELU (fc2) inputs: min gelu_tanh > -0.1702

# Bound on elements of the [rows, N, G] integer-dot intermediate per chunk (keeps the reference usable on
# full-size layers: 2^26 fp32 = 256 MiB).
_CHUNK_ELEMS = 1 << 26


def _check_groups(k: int, what: str) -> int:
    if k % GROUP != 0:
        raise ValueError(f"{what}: K={k} is not a multiple of the group size {GROUP} (pad it first)")
    return k // GROUP


def quantize_act(x: torch.Tensor, smooth: torch.Tensor | None = None, unsigned: bool = False,
                 shift: float = 0.0, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-64-group INT4 activation quantization.

    x [..., K] -> (codes int8 [M, K], scales float32 [M, K//64]) with M = prod(leading dims).
    Signed: codes in [-8, 7], scale = amax/7. Unsigned: codes in [0, 15], scale = amax/15 (negative values
    clamp to 0). `shift` is added before the multiplication by 1/smooth [K] (`smooth_reciprocal`). pow2:
    power-of-two group scales per token (`pow2_act_scales`). See the module docstring for the exact sequence.
    """
    k = x.shape[-1]
    g = _check_groups(k, "quantize_act")
    if smooth is not None and smooth.shape != (k,):
        raise ValueError(f"quantize_act: smooth has shape {tuple(smooth.shape)}, expected ({k},)")
    xs = x.reshape(-1, k).float()
    if shift:
        xs = xs + shift
    if smooth is not None:
        xs = xs * smooth_reciprocal(smooth)
    xs = xs.view(-1, g, GROUP)
    qmax, lo, hi = (15.0, 0, 15) if unsigned else (7.0, -8, 7)
    amax = xs.abs().amax(dim=-1)
    # A tensor divisor, not a Python float: PyTorch's CUDA division by a scalar multiplies by its reciprocal,
    # which differs from IEEE division in the last bit (and from the CPU and the kernels).
    scales = amax / amax.new_tensor(qmax)
    if pow2:
        scales = pow2_act_scales(scales)
    # Scales below 2^-126 (0 for an all-zero group) multiply by 0 instead of an overflowing 1/scale: codes 0.
    inv = torch.where(scales >= MIN_NORMAL, _reciprocal(scales), torch.zeros_like(scales))
    codes = torch.round(xs * inv[..., None]).clamp_(lo, hi).to(torch.int8)
    return codes.view(-1, k), scales


def _reciprocal(t: torch.Tensor) -> torch.Tensor:
    # A tensor division (IEEE on CPU and CUDA alike): 1 / t correctly rounded, as the kernels' __frcp_rn.
    return torch.ones_like(t) / t


def smooth_reciprocal(smooth: torch.Tensor) -> torch.Tensor:
    """1 / smooth in float32, correctly rounded: the factor activations are multiplied by (`quantize_act`).
    The native kernels take this vector (native.PreparedW4A4.inv_smooth), computed once per layer."""
    return _reciprocal(smooth.float())


def quantize_weight(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16, pow2: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row, per-64-group symmetric INT4 weight quantization.

    w [N, K] -> (codes int8 [N, K] in [-8, 7], scales [N, K//64] in `scale_dtype`). The scale is rounded to
    `scale_dtype` first and the codes are computed with the rounded scale, so codes * scale is what the
    kernels see. pow2=True: power-of-two group scales (`pow2_group_scales`) for the Hopper fast path.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_weight: expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    g = _check_groups(k, "quantize_weight")
    wg = w.float().view(n, g, GROUP)
    if pow2:
        scales = pow2_group_scales(w, scale_dtype)
    else:
        amax = wg.abs().amax(dim=-1)
        scales = (amax / amax.new_tensor(7.0)).to(scale_dtype)  # IEEE division on CUDA too (see quantize_act)
    s = scales.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round(wg / safe[..., None]).clamp_(-8, 7).to(torch.int8)
    return codes.view(n, k), scales


POW2_MAX_EXP = 4  # code << (4 - e) fits int8 for codes -8..7 (uint8 for unsigned 0..15) when e <= 4
FP8_FOLD_MAX_EXP = 9  # |code| * 2^-e is exact in e4m3 for codes -8..15 and e <= 9 (subnormals included)


def pow2_act_scales(scales: torch.Tensor) -> torch.Tensor:
    """Plain activation group scales [M, G] (amax / qmax) -> the power-of-two format's: per token m with
    s = max_g scales[m, g], scale[m, g] = s * 2^-e for the largest e in 0 .. POW2_MAX_EXP with s * 2^-e >=
    scales[m, g] (exact comparisons and products; an all-zero token keeps scale 0)."""
    top = scales.amax(dim=-1, keepdim=True)
    out = top.expand_as(scales).clone()
    for e in range(1, POW2_MAX_EXP + 1):  # the candidates shrink with e: keep the last that still covers
        cand = top * 2.0 ** -e
        out = torch.where(cand >= scales, cand, out)
    return out


POW2_CHANNEL_STEPS = 8  # channel-scale candidates c0 * 2^(-i/8), i < 8: the grid's alignment to the row


def _keep_least(best, cand, err):
    """Running argmin: best = (values, errors) or None; keeps cand where err is smaller (ties: the earlier)."""
    if best is None:
        return cand, err
    better = err < best[1]
    return torch.where(better, cand, best[0]), torch.minimum(err, best[1])


def least_error_scales(wg: torch.Tensor, candidates) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 64-wide weight group of wg [..., 64], the candidate scale (tensors [...], each in its storage dtype)
    of least squared INT4 rounding error -> (scales, errors [...]); ties go to the earlier candidate."""
    best = None
    for s in candidates:
        sf = s.float()[..., None]
        safe = torch.where(sf > 0, sf, torch.ones_like(sf))
        best = _keep_least(best, s, (torch.round(wg / safe).clamp_(-8, 7) * sf - wg).square().sum(-1))
    return best


def pow2_candidates(ch: torch.Tensor, shape, scale_dtype: torch.dtype):
    """The power-of-two format's candidate group scales ch * 2^-e, e = 0 .. POW2_MAX_EXP (in that order), in
    scale_dtype, ch broadcast to `shape`."""
    return ((ch * 2.0 ** -e).to(scale_dtype).expand(shape) for e in range(POW2_MAX_EXP + 1))


def _pow2_best(wg: torch.Tensor, ch: torch.Tensor, scale_dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of wg [N, G, 64], the scale ch[n] * 2^-e (e = 0 .. POW2_MAX_EXP, in scale_dtype) of least
    squared rounding error -> (scales [N, G], errors [N, G]); ties go to the smaller e."""
    return least_error_scales(wg, pow2_candidates(ch[:, None], wg.shape[:2], scale_dtype))


def pow2_channel_scale(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The channel scale of the power-of-two weight format for w [N, K] -> float32 [N] (a scale_dtype value):
    among c0 * 2^(-i/POW2_CHANNEL_STEPS) (c0 = the widest group's absmax / 7), the one whose grid of scales
    c * 2^-e gives the row the least squared rounding error, each group taking its best exponent."""
    n, k = w.shape
    wg = w.float().view(n, _check_groups(k, "pow2_channel_scale"), GROUP)
    c0 = wg.abs().amax(dim=(1, 2)) / 7.0
    best = None
    for i in range(POW2_CHANNEL_STEPS):
        c = (c0 * 2.0 ** (-i / POW2_CHANNEL_STEPS)).to(scale_dtype).float()
        best = _keep_least(best, c, _pow2_best(wg, c, scale_dtype)[1].sum(dim=1))
    return best[0]


def pow2_group_scales(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Group scales of the power-of-two weight format for w [N, K] -> [N, K//64] in `scale_dtype`: the
    channel scale c of `pow2_channel_scale`, and per group the c * 2^-e (0 <= e <= POW2_MAX_EXP) of least
    squared rounding error (it may clip the group's largest values)."""
    n, k = w.shape
    wg = w.float().view(n, _check_groups(k, "pow2_group_scales"), GROUP)
    return _pow2_best(wg, pow2_channel_scale(w, scale_dtype), scale_dtype)[0].to(scale_dtype)


def pow2_split(wscales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """wscales [N, G] -> (channel scale float32 [N], exponents uint8 [N, G]) with wscales[n, g] ==
    chscale[n] * 2^-exp[n, g] exactly and exp <= FP8_FOLD_MAX_EXP, or None when the scales are not of that
    form (the int8 fold needs exp <= POW2_MAX_EXP, which the quantizer gives). Zero scales get exponent 0
    (their groups contribute 0; callers zero those codes before folding).
    """
    s = wscales.float()
    if not torch.isfinite(s).all() or (s < 0).any():
        return None
    ch = s.amax(dim=1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    e = torch.round(torch.log2(ch[:, None] / safe))
    e = torch.where(s > 0, e, torch.zeros_like(e))
    if ((e < 0) | (e > FP8_FOLD_MAX_EXP)).any():
        return None
    if not torch.equal(torch.where(s > 0, ch[:, None] * torch.exp2(-e), s), s):
        return None
    return ch, e.to(torch.uint8)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None) -> torch.Tensor:
    """codes [N, K] (int), scales [N, K//64] (and optional zero points, same shape) -> float32 [N, K]."""
    n, k = codes.shape
    g = _check_groups(k, "dequantize")
    if scales.shape != (n, g):
        raise ValueError(f"dequantize: scales shape {tuple(scales.shape)} does not match codes {(n, k)}")
    w = codes.float().view(n, g, GROUP) * scales.float()[..., None]
    if zeros is not None:
        w = w + zeros.float()[..., None]
    return w.view(n, k)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int codes [..., K] (signed -8..7 or unsigned 0..15) -> uint8 [..., K//2]; low nibble = even element."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4: last dimension {codes.shape[-1]} is odd")
    nib = codes.to(torch.int16) & 0xF  # two's complement nibble of signed codes
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """uint8 [..., K//2] -> int8 [..., K] codes (sign-extended when `signed`)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: expected uint8, got {packed.dtype}")
    p = packed.to(torch.int16)
    nib = torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)
    if signed:
        nib = nib - ((nib >> 3) << 4)  # 8..15 -> -8..-1
    return nib.to(torch.int8)


FP8_TILE_ROWS = 256  # token padding of the sm_90 activation operand (the GEMM's largest token tile)


def pack_act_fp8_tiles(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation operand of the sm_90 (Hopper) W4A4 GEMM, defined in PyTorch (the kernels must match it).

    codes int [M, K] (signed -8..7 or unsigned 0..15), scales float32 [M, K/64] (quantize_act's output) ->
      codes8  uint8 [K/64, Mp, 64]: byte (g, m, k) at flat offset g*Mp*64 + ((m//8)*4 + k//16)*128
              + (m%8)*16 + k%16 is the e4m3 encoding of codes[m, 64g + k] (every code is exact in e4m3), i.e.
              each 64-wide group is a slab of 8-token x 16-byte "core matrices" (the no-swizzle K-major
              layout of wgmma's shared-memory operand), rows m >= M are 0;
      scales8 float32 [K/64, Mp]: within every 16 tokens, token 8b + 2q + e (b, e in {0,1}, q in 0..3) sits
              at position 4q + 2b + e, the order in which one thread of a wgmma accumulator fragment reads its
              columns (one 16-byte load for four tokens); rows m >= M are 0.
    Mp = M rounded up to FP8_TILE_ROWS. Codes stay 4-bit values; only their container is one byte, because
    Hopper's 8-bit tensor cores read the shared-memory operand as bytes.
    """
    _check_groups(codes.shape[1], "pack_act_fp8_tiles")
    byte = codes.float().to(torch.float8_e4m3fn).view(torch.uint8)  # code 0 is byte 0: padding stays 0
    return _byte_tiles(byte), _permute16(scales.float().t())


def _tile_tokens(m: int) -> int:
    """Mp: m rounded up to FP8_TILE_ROWS (at least one tile)."""
    return max(FP8_TILE_ROWS, -(-m // FP8_TILE_ROWS) * FP8_TILE_ROWS)


def _byte_tiles(byte: torch.Tensor) -> torch.Tensor:
    """uint8 [M, K] -> the sm_90 activation tiles uint8 [K/64, Mp, 64] (8-token x 16-byte core matrices), rows
    M .. Mp zero."""
    m, k = byte.shape
    g, mp = k // GROUP, _tile_tokens(m)
    b = torch.zeros(mp, k, dtype=torch.uint8, device=byte.device)
    b[:m] = byte
    # [Mp, K] -> [Mp/8, 8, G, 4, 16] -> [G, Mp/8, 4 (k16), 8 (m%8), 16 (k%16)]
    return b.view(mp // 8, 8, g, 4, 16).permute(2, 0, 3, 1, 4).contiguous().view(g, mp, 64)


def _permute16(t: torch.Tensor) -> torch.Tensor:
    """float32 [..., M] per-token values -> [..., Mp] in the GEMM epilogue's order (token 8b + 2q + e at
    position 4q + 2b + e within every 16), rows M .. Mp zero."""
    m, mp = t.shape[-1], _tile_tokens(t.shape[-1])
    s = t.new_zeros(*t.shape[:-1], mp)
    s[..., :m] = t
    return s.reshape(*t.shape[:-1], mp // 16, 2, 4, 2).transpose(-3, -2).reshape(*t.shape[:-1], mp).contiguous()


def pack_act_s8_tiles(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation operand of the sm_90 integer GEMM (nl_w4a4_gemm_s8) for power-of-two activation scales.

    codes int [M, K], scales float32 [M, K/64] of `quantize_act(..., pow2=True)` -> (bytes8, tscale):
      bytes8 uint8 [K/64, Mp, 64]: the tile layout of pack_act_fp8_tiles; each byte is code << (4 - e) as an
             int8 (signed codes, -128..112) or a uint8 (unsigned codes, 0..240), where scales[m, g] =
             s[m] * 2^-e, s[m] = the token's largest scale; rows m >= M are 0;
      tscale float32 [Mp]: s[m] / 16, in pack_act_fp8_tiles's 16-token order (rows >= M are 0),
    so that codes[m, k] * scales[m, g] == byte * tscale[m] exactly. Raises ValueError when the scales are not
    of the power-of-two form.
    """
    _check_groups(codes.shape[1], "pack_act_s8_tiles")
    split = pow2_split(scales)  # the token's largest scale plays the weight row's channel scale
    if split is None or (split[1] > POW2_MAX_EXP).any():
        raise ValueError("pack_act_s8_tiles: the scales are not power-of-two activation scales "
                         "(quantize_act(..., pow2=True))")
    top, e = split
    mult = torch.exp2(POW2_MAX_EXP - e.float()).repeat_interleave(GROUP, dim=1)  # 2^(4 - e) per element
    vals = (codes.float() * mult).to(torch.int16)
    byte = (vals & 0xFF).to(torch.uint8)  # two's complement byte of signed values; unsigned as is
    return _byte_tiles(byte), _permute16(top / 2.0 ** POW2_MAX_EXP)


WGMMA_TILE_ROWS = 128  # weight rows per CTA of the sm_90 GEMM (two warpgroups x 64)


def pack_weight_wgmma(qweight: torch.Tensor) -> torch.Tensor:
    """Weight operand of the sm_90 W4A4 GEMM (native nl_repack_weight_sm90 must match it byte for byte).

    qweight uint8 [N, K/2] (canonical, N % 128 == 0) -> uint8 [N/128, K/64, 2, 128, 16]: for CTA weight tile
    nb, group g, warpgroup c and thread t = 32w + 4gq + q, 16 bytes = 4 little-endian words; word j holds
    the 4 codes k = 64g + 16j + 4q .. +3 of row r = 128nb + 64c + 16w + gq in its low 16 bits and those of
    row r + 8 in its high 16 bits (low nibble first). Those are exactly the thread's wgmma A-fragment codes
    of the group (k32 step j // 2, registers 2(j % 2) and 2(j % 2) + 1 of the PTX ISA's 64x32 8-bit A layout:
    row 16w + gq (+8), k 4q + byte (+16)), so one 16-byte shared load feeds both k32 steps of a group.
    """
    n, kh = qweight.shape
    if n % WGMMA_TILE_ROWS or (2 * kh) % GROUP:
        raise ValueError(f"pack_weight_wgmma: qweight {tuple(qweight.shape)} needs N % 128 == 0 and K % 64 == 0")
    g = 2 * kh // GROUP
    # rows: [nb, c, w, half (+8), gq]; bytes of a row: [g, j, q, 2 bytes]
    v = qweight.reshape(n // 128, 2, 4, 2, 8, g, 4, 4, 2)
    # -> [nb, g, c, w, gq, q, j, half, byte]
    return v.permute(0, 5, 1, 2, 4, 7, 6, 3, 8).contiguous().view(n // 128, g, 2, 128, 16)


def unpack_weight_wgmma(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of pack_weight_wgmma: uint8 (any shape, N*K/2 bytes) -> canonical uint8 [N, K/2]."""
    g = k // GROUP
    v = packed.reshape(n // 128, g, 2, 4, 8, 4, 4, 2, 2)  # [nb, g, c, w, gq, q, j, half, byte]
    return v.permute(0, 2, 3, 7, 4, 1, 6, 5, 8).contiguous().view(n, k // 2)


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(1 + scale) * LayerNorm(x) + shift exactly as the unfused DiT path computes it (models/dit.py
    `ModulationOut.apply(layer_norm(dim)(x))`): the reference of the fused LayerNorm + modulation + quantize
    kernel (native.layernorm_quantize_act).

    x [..., K] (bf16/fp16/fp32); shift, scale broadcastable to x (e.g. [B, 1, K] for x [B, L, K]), same dtype.
    LayerNorm has no affine and normalizes over the last dim in fp32; its output is rounded to x's dtype, then
    `1 + scale`, the product and the sum are each rounded to x's dtype (torch's 16-bit elementwise ops).
    """
    xn = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)
    return (1 + scale) * xn + shift


def _group_dots(qa: torch.Tensor, cw: torch.Tensor) -> torch.Tensor:
    """Exact integer dot products per group as float32: qa [M, K], cw [N, K] -> [G, M, N]."""
    m, k = qa.shape
    n = cw.shape[0]
    g = k // GROUP
    a = qa.float().view(m, g, GROUP).transpose(0, 1)  # [G, M, 64]
    b = cw.float().view(n, g, GROUP).transpose(0, 1)  # [G, N, 64]
    return torch.bmm(a, b.transpose(1, 2))  # integers below 2^24: exact in fp32 in any order


def _low_rank(x: torch.Tensor, lora_down: torch.Tensor | None, lora_up: torch.Tensor | None) -> torch.Tensor | None:
    if lora_down is None or lora_up is None or lora_down.shape[0] == 0:
        return None
    return (x.float() @ lora_down.float().T) @ lora_up.float().T


def w4a4_linear(x: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor,
                lora_down: torch.Tensor | None = None, lora_up: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, smooth: torch.Tensor | None = None,
                act_unsigned: bool = False, act_shift: float = 0.0,
                out_dtype: torch.dtype | None = None, act_pow2: bool = False) -> torch.Tensor:
    """The W4A4 SVDQuant linear (see the module docstring for the exact arithmetic).

    x [..., K]; qweight uint8 [N, K//2] (canonical packing); wscales [N, K//64]; lora_down [r, K] (reads the
    raw x); lora_up [N, r]; bias [N] or None; smooth [K] or None; act_pow2: power-of-two activation scales.
    Returns [..., N] in out_dtype (default x.dtype).
    """
    k = x.shape[-1]
    n = qweight.shape[0]
    if qweight.shape != (n, k // 2) or wscales.shape != (n, k // GROUP):
        raise ValueError(f"w4a4_linear: input K={k} does not match qweight {tuple(qweight.shape)} / "
                         f"wscales {tuple(wscales.shape)}")
    xf = x.reshape(-1, k)
    qa, sa = quantize_act(xf, smooth, act_unsigned, act_shift, act_pow2)
    cw = unpack_int4(qweight)
    sw = wscales.float()
    m, g = sa.shape
    acc = torch.empty(m, n, dtype=torch.float32, device=x.device)
    rows = max(1, _CHUNK_ELEMS // max(1, n * g))
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        dots = _group_dots(qa[r0:r1], cw)  # [G, rows, N]
        part = torch.zeros(r1 - r0, n, dtype=torch.float32, device=x.device)
        for gi in range(g):  # in group order, one rounding per op (no FMA): bit-exact target for kernels
            part = part + (sa[r0:r1, gi, None] * sw[None, :, gi]) * dots[gi]
        acc[r0:r1] = part
    low = _low_rank(xf, lora_down, lora_up)
    if low is not None:
        acc = acc + low
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype or x.dtype).view(*x.shape[:-1], n)


def w4a4_linear_f64(x: torch.Tensor, act_codes: torch.Tensor, act_scales: torch.Tensor,
                    qweight: torch.Tensor, wscales: torch.Tensor,
                    lora_down: torch.Tensor | None = None, lora_up: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 evaluation of the W4A4 linear on given activation codes/scales (e.g. a kernel's own).

    x [M, K] (raw input, for the low-rank branch); act_codes int [M, K]; act_scales [M, K//64].
    Returns float64 [M, N]: sum_g sa*sw*dot_g + (x @ down^T) @ up^T + bias, all in float64.
    """
    m, k = act_codes.shape
    g = k // GROUP
    cw = unpack_int4(qweight).double().view(-1, g, GROUP)
    qa = act_codes.double().view(m, g, GROUP)
    dots = torch.einsum("mgk,ngk->mng", qa, cw)
    y = (dots * act_scales.double()[:, None, :] * wscales.double()[None, :, :]).sum(-1)
    if lora_down is not None and lora_up is not None and lora_down.shape[0] > 0:
        y = y + (x.reshape(m, k).double() @ lora_down.double().T) @ lora_up.double().T
    if bias is not None:
        y = y + bias.double()
    return y


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor,
                 bias: torch.Tensor | None = None, wzeros: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only 4-bit linear: y = x @ W^T + b with W dequantized in float32, matmul in float32.

    qweight uint8 [N, K//2]; wscales [N, K//64]. Without `wzeros` the codes are signed and W = C * s; with
    `wzeros` [N, K//64] the codes are unsigned and W = U * s + z (Nunchaku's AWQ modulation layers).
    """
    w = dequantize(unpack_int4(qweight, signed=wzeros is None), wscales, wzeros)
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"w4a16_linear: input K={x.shape[-1]} does not match the weight's K={w.shape[1]}")
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
