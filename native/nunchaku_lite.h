/* nunchaku_lite native W4A4 kernels: plain C ABI (loaded from Python with cffi in ABI mode).
 *
 * Every function returns 0 on success or an NL_ERR_* code; nl_last_error() then gives a message (kept per
 * host thread) naming the kernel and the bad argument. All pointers are device pointers; `stream` is a
 * cudaStream_t passed as void*. Kernels are asynchronous on that stream. Data layouts:
 *
 *   act codes     uint8 [M, K/2]   (NL_ACT_PACKED; NL_ACT_FP8_TILES: see nl_quantize_act) row-major, two INT4 codes per byte, low nibble = even k
 *                                  (quant/ops.py pack_int4 order); signed or unsigned codes
 *   act scales    float [K/64, ldm] group-major ("GEMM operand order"), ldm = M rounded up to 128;
 *                                  rows M..ldm-1 are written as 0 by nl_quantize_act
 *   lora act      float [M, rank]  x @ lora_down^T (fp32)
 *   weight tiled  uint8 [N/128, K/64, 128, 32]: nl_repack_weight output (see repack.cu)
 *   act fp8 tiles uint8 [K/64, Mp, 64] + float [K/64, Mp] (NL_ACT_FP8_TILES, sm_90 GEMM; see below)
 *   weight scales float [K/64, N]  (exact=0 needs values with <= 11 significant bits, i.e. bf16/fp16
 *                                  values; the Python binding switches to exact=1 otherwise)
 *
 * N must be a multiple of 128 for the W4A4 GEMM and repacking, K a multiple of 64; M is arbitrary (>= 1).
 * The lines between CDEF BEGIN / CDEF END are parsed by cffi: keep them plain C declarations.
 */
#ifndef NUNCHAKU_LITE_H
#define NUNCHAKU_LITE_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

/* CDEF BEGIN */
enum {
    NL_OK = 0,
    NL_ERR_ARGUMENT = 1,   /* bad shape, dtype code, alignment or null pointer */
    NL_ERR_CUDA = 2,       /* a CUDA runtime call or kernel launch failed */
    NL_ERR_UNSUPPORTED = 3 /* no kernel for this device / option combination */
};
enum { NL_F32 = 0, NL_BF16 = 1, NL_F16 = 2 };                    /* dtype codes */
enum { NL_PATH_AUTO = 0, NL_PATH_S4 = 1, NL_PATH_S8 = 2 };       /* W4A4 tensor-core path */
/* GEMM epilogue: activation, or (nl_w4a4_gemm_s8 only) NL_EPI_ACCUMULATE: out = out + result, the result rounded
 * to out_dtype first and the sum formed in fp32 and rounded again (torch's out.add_(result)) */
enum { NL_EPI_NONE = 0, NL_EPI_GELU_TANH = 1, NL_EPI_ACCUMULATE = 2 };
enum { NL_ACT_PACKED = 0, NL_ACT_FP8_TILES = 1, NL_ACT_S8_TILES = 2 }; /* quantized activation layout */

const char *nl_last_error(void);
int nl_version(void); /* the ABI version: nunchaku_lite/native.py loads only its own (ABI_VERSION) */
/* Compute path chosen for `device` by NL_PATH_AUTO: NL_PATH_S8 on sm_90, NL_PATH_S4 on sm_80..sm_89. */
int nl_default_path(int device, int *path);

/* INT4 quantization of xs = x * inv_smooth (or (x + shift) * inv_smooth, unsigned) per token and 64-group
 * (quant/ops.py quantize_act: codes = rint(xs * (1 / scale)), every op rounded separately), plus the low-rank
 * down projection lora_act = x @ lora_down^T in fp32. x: [M, K] of x_dtype with row stride ldx (elements);
 * inv_smooth: float [K] = 1 / smooth correctly rounded (quant/ops.py smooth_reciprocal), or NULL;
 * lora_down: [rank, K] of x_dtype or NULL (rank 0); rank a multiple of 16, <= 128.
 * layout NL_ACT_PACKED: codes uint8 [M, K/2], scales float [K/64, ldm], ldm a multiple of 128 >= M.
 * layout NL_ACT_FP8_TILES (sm_90 GEMM operand, quant/ops.py pack_act_fp8_tiles): codes uint8 [K/64, ldm, 64]
 * (e4m3 bytes in 8x16-byte core matrices), scales float [K/64, ldm] (16-token permutation), ldm = Mp, a
 * multiple of 256 >= M; rows >= M are written as 0 in both layouts' scales and in the fp8 codes.
 * token_scale: NULL for plain group scales (amax / qmax), or float [M] from nl_act_stats of the same
 * input for the power-of-two format (quant/ops.py quantize_act(pow2=True)): each group scale is s * 2^-e, the
 * largest e <= 4 that still covers the plain scale, and the codes are computed with it. Only then layout
 * NL_ACT_S8_TILES (operand of nl_w4a4_gemm_s8, quant/ops.py pack_act_s8_tiles) is allowed: codes uint8
 * [K/64, ldm, 64] holding code << (4 - e) (int8, or uint8 for unsigned) in the NL_ACT_FP8_TILES order,
 * scales float [ldm] = s / 16 (16-token permutation), ldm = M rounded up to 256, rows >= M zero. */
int nl_quantize_act(const void *x, int x_dtype, int64_t M, int64_t K, int64_t ldx,
                    const float *inv_smooth, float shift, int act_unsigned,
                    const void *lora_down, int rank, int layout,
                    uint8_t *codes, float *scales, int64_t ldm, float *lora_act, const float *token_scale,
                    void *stream);

/* nl_quantize_act of y = (1 + mod_scale[b]) * LayerNorm(x) + mod_shift[b] (LayerNorm without affine over K,
 * eps; b = row / tokens_per_batch; mod_shift, mod_scale: [B, K] of x_dtype), each op rounded to x_dtype as
 * the unfused torch path (quant/ops.py layernorm_modulate); lora_act = y @ lora_down^T. y_out: [M, K] of
 * x_dtype receiving y, or NULL. row_stats: float [M, 2] (mean, rstd per row) from nl_act_stats of the same x
 * and modulation (required); token_scale (power-of-two format) from the same call. */
int nl_layernorm_quantize_act(const void *x, int x_dtype, int64_t M, int64_t K, int64_t ldx,
                              const void *mod_shift, const void *mod_scale, int64_t tokens_per_batch, float eps,
                              const float *inv_smooth, float shift, int act_unsigned,
                              const void *lora_down, int rank, int layout,
                              uint8_t *codes, float *scales, int64_t ldm, float *lora_act, void *y_out,
                              const float *token_scale, const float *row_stats, void *stream);

/* Per-token statistics for the quantize kernels, one read of x. With mod_shift and mod_scale non-NULL: the
 * LayerNorm row statistics (mean, rstd) of x into row_stats float [M, 2] (required), for
 * nl_layernorm_quantize_act. token_scale float [M] or NULL: the power-of-two format's token scale
 * max_k |xs[m, k]| / qmax (qmax 7, or 15 unsigned), xs as nl_quantize_act forms it (with LayerNorm: of
 * nl_layernorm_quantize_act's y); required without LayerNorm. */
int nl_act_stats(const void *x, int x_dtype, int64_t M, int64_t K, int64_t ldx,
                 const void *mod_shift, const void *mod_scale, int64_t tokens_per_batch, float eps,
                 const float *inv_smooth, float shift, int act_unsigned, float *token_scale, float *row_stats,
                 void *stream);

/* Canonical packed weight [N, K/2] -> kernel tile order [N/128, K/64, 128, 32] (run once at load). */
int nl_repack_weight(const uint8_t *qweight, int64_t N, int64_t K, uint8_t *tiled, void *stream);

/* out[M, N] = sum_g sa*sw*dot_g + lora_act @ lora_up^T + bias, then the epilogue activation.
 * lora_up: [N, rank] of lora_dtype (NL_BF16 or NL_F16) or NULL; bias: float [N] or NULL;
 * out: [M, N] of out_dtype, row stride ldo. exact=1 rounds the group accumulation like quant/ops.py
 * (three fp32 roundings per group); exact=0 uses fused multiply-adds (one rounding per group). */
int nl_w4a4_gemm(const uint8_t *act_codes, const float *act_scales, int64_t ldm, int act_unsigned,
                 const uint8_t *w_tiled, const float *w_scales,
                 const float *lora_act, const void *lora_up, int lora_dtype, int rank,
                 const float *bias, void *out, int out_dtype, int64_t ldo,
                 int64_t M, int64_t N, int64_t K, int epilogue, int path, int exact, void *stream);

/* Hopper (sm_90a) W4A4 GEMM on fp8 tensor cores (gemm_w4a4_sm90.cu); NL_ERR_UNSUPPORTED on other devices.
 * act_codes8 uint8 [K/64, mp, 64] and act_scales8 float [K/64, mp]: the NL_ACT_FP8_TILES activation layout
 * (quant/ops.py pack_act_fp8_tiles; mp = M rounded up to 256, padded rows 0; signed or unsigned codes);
 * w_packed: nl_repack_weight_sm90 output; w_scales float [K/64, N]; lora_act float [M, rank]; lora_up [N, rank]
 * of lora_dtype; bias float [N] or NULL; out [M, N] of out_dtype, row stride ldo (16-byte aligned rows). Same
 * math as nl_w4a4_gemm (one fma per group: acc = fma(dot, sa*sw, acc)). N % 128 == 0, K % 64 == 0. */
int nl_w4a4_gemm_fp8(const uint8_t *act_codes8, const float *act_scales8, int64_t mp,
                     const uint8_t *w_packed, const float *w_scales,
                     const float *lora_act, const void *lora_up, int lora_dtype, int rank,
                     const float *bias, void *out, int out_dtype, int64_t ldo,
                     int64_t M, int64_t N, int64_t K, int epilogue, void *stream);

/* The same GEMM for weights with power-of-two group scales (quant/ops.py pow2_split): w_scales[g, n] =
 * w_chscale[n] * 2^-w_exp[g, n] with w_exp uint8 [K/64, N] in 0..9, so each code * 2^-e is exact in e4m3 and is
 * folded into the weight operand; one fma per group (acc = fma(dot_e, sa, acc)) and the channel scale once in
 * the epilogue. Other arguments as nl_w4a4_gemm_fp8 (w_chscale float [N]). */
int nl_w4a4_gemm_fp8_pow2(const uint8_t *act_codes8, const float *act_scales8, int64_t mp,
                          const uint8_t *w_packed, const float *w_chscale, const uint8_t *w_exp,
                          const float *lora_act, const void *lora_up, int lora_dtype, int rank,
                          const float *bias, void *out, int out_dtype, int64_t ldo,
                          int64_t M, int64_t N, int64_t K, int epilogue, void *stream);

/* The sm_90 GEMM (plain scales, or folded when w_exp != NULL) with the GELU -> quantize epilogue: instead of
 * writing GELU(x W^T + low-rank + bias) (rounded to dtype, bf16/fp16), it quantizes that output for the next
 * layer (next_inv_smooth float [N] or NULL, next_shift, next_unsigned: quant/ops.py quantize_act, codes and scales
 * bit-identical) into the NL_ACT_FP8_TILES operand next_codes8 uint8 [N/64, next_mp, 64] / next_scales8 float
 * [N/64, next_mp] (rows M .. 128*ceil(M/128) written as 0; the caller zeroes rows beyond), and writes the
 * next layer's low-rank down partial sums over each 128-column block, next_lora_part float [N/128, M, next_rank]
 * (next_lora_down [next_rank, N] of dtype; next_rank a multiple of 16 up to 64; the caller sums over the first
 * axis). lora_up is of dtype too. Default tile only. */
int nl_w4a4_gemm_fp8_gelu_quantize(const uint8_t *act_codes8, const float *act_scales8, int64_t mp,
                                   const uint8_t *w_packed, const float *w_scales, const float *w_chscale,
                                   const uint8_t *w_exp, const float *lora_act, const void *lora_up, int rank,
                                   const float *bias, int dtype, int64_t M, int64_t N, int64_t K,
                                   const float *next_inv_smooth, float next_shift, int next_unsigned,
                                   const void *next_lora_down, int next_rank, uint8_t *next_codes8,
                                   float *next_scales8, int64_t next_mp, float *next_lora_part, void *stream);

/* Hopper (sm_90a) W4A4 GEMM for power-of-two scales on both operands (gemm_w4a4_s8_sm90.cu): one int8 wgmma
 * accumulation over all of K (no per-group promotion). act_bytes8 uint8 [K/64, mp, 64] and act_tscale float
 * [mp]: the NL_ACT_S8_TILES layout (nl_quantize_act with token_scale; signed, or unsigned when
 * act_unsigned); w_packed: nl_repack_weight_sm90 output; w_chscale float [N] and w_exp uint8 [K/64, N] with
 * every exponent <= 4 (quant/ops.py pow2_split). out = float(int dot) * act_tscale[m] * w_chscale[n] / 16
 * + lora_act @ lora_up^T + bias, then the epilogue. Other arguments as nl_w4a4_gemm_fp8; K <= 65536.
 * workspace: NULL, or int32 memory of workspace_bytes that lets 16-bit outputs split tiles across CTAs
 * (stream-K) where one CTA per tile would leave many SMs idle on a long K: 1024 hand-over flags, which must
 * be zero (allocate it zero-filled; every call leaves them zero), then 256 x 128 partial sums per CTA of the
 * split grid (at most one CTA per SM): (1024 + SMs x 256 x 128) x 4 bytes suffice for any call; a call whose
 * grid would need more than workspace_bytes runs unsplit. Calls sharing a workspace must not run
 * concurrently. next_token_scale: NULL, or float [M] receiving the power-of-two token scale of out for the
 * layer that reads it (nl_act_stats of out with next_inv_smooth (float [N] or NULL), next_shift and
 * next_unsigned: max_n |(out[m, n] + next_shift) * next_inv_smooth[n]| / qmax, out as written, after the
 * epilogue), combined by maximum with what the array holds (zero it first); 16-bit outputs, epilogue
 * NL_EPI_NONE or NL_EPI_GELU_TANH. */
int nl_w4a4_gemm_s8(const uint8_t *act_bytes8, const float *act_tscale, int64_t mp, int act_unsigned,
                    const uint8_t *w_packed, const float *w_chscale, const uint8_t *w_exp,
                    const float *lora_act, const void *lora_up, int lora_dtype, int rank,
                    const float *bias, void *out, int out_dtype, int64_t ldo,
                    int64_t M, int64_t N, int64_t K, int epilogue, int *workspace, int64_t workspace_bytes,
                    const float *next_inv_smooth, float next_shift, int next_unsigned, float *next_token_scale,
                    void *stream);

/* Canonical packed weight [N, K/2] -> the sm_90 GEMM's order [N/128, K/64, 2, 128, 16] (each thread's A
 * fragments of one group as 16 bytes; quant/ops.py pack_weight_wgmma). Runs on any device. */
int nl_repack_weight_sm90(const uint8_t *qweight, int64_t N, int64_t K, uint8_t *packed, void *stream);

/* Weight-only 4-bit linear: out[M, N] = x @ W^T + bias, W[n, k] = code * scale (+ zero when zeros != NULL,
 * codes then unsigned). qweight canonical [N, K/2]; scales/zeros float [N, K/64]; bias float [N] or NULL;
 * x and out of x_dtype (row strides ldx, ldo). Memory-bound GEMV for small M (modulation layers). */
int nl_w4a16_gemm(const void *x, int x_dtype, int64_t ldx, const uint8_t *qweight, const float *scales,
                  const float *zeros, const float *bias, void *out, int64_t ldo,
                  int64_t M, int64_t N, int64_t K, void *stream);
/* Fused DiT block pieces (fused_block.cu). q/k RMSNorm + RoPE: qkv [M, >= 3*H*D] of dtype (row stride ld; row
 * m = token (m / L, m % L)), q_scale/k_scale [D] of scale_dtype, pe float [Bpe, L_out, D/2, 2, 2] with batch
 * stride pe_stride_b floats (0: shared) or NULL; writes q, k, v [B, L_out, H, D] at tokens tok_offset + t.
 * D a multiple of 64 up to 256. */
int nl_qknorm_rope(const void *qkv, int dtype, int64_t M, int64_t L, int64_t ld, int H, int D,
                   const void *q_scale, const void *k_scale, int scale_dtype, float eps,
                   const float *pe, int64_t pe_stride_b, void *q, void *k, void *v, int64_t L_out,
                   int64_t tok_offset, void *stream);

/* out[m, :] = (1 + scale[m / L]) * LayerNorm(x[m, :]) + shift[m / L] with the unfused roundings. x, out [M, K]
 * of dtype (row strides ldx, ldo); shift/scale [B, K] of dtype with batch stride mod_stride_b. K a multiple of
 * 8 up to 3072; strides multiples of 8, pointers 16-byte aligned. */
int nl_layernorm_modulate(const void *x, int dtype, int64_t M, int64_t K, int64_t ldx, int64_t L,
                          const void *shift, const void *scale, int64_t mod_stride_b, float eps,
                          void *out, int64_t ldo, void *stream);

/* out[m, :] = x[m, :] + gate[m / L] * y[m, :] with the unfused roundings (product, then sum), clamped to
 * +-65504 for fp16. x, out [M, N] contiguous; y row stride ldy; gate [B, N] with batch stride gate_stride_b.
 * N, ldy, gate_stride_b multiples of 8; pointers 16-byte aligned. */
int nl_gate_residual(const void *x, const void *y, int64_t ldy, const void *gate, int64_t gate_stride_b,
                     int dtype, int64_t M, int64_t N, int64_t L, void *out, void *stream);
/* CDEF END */

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

#ifdef __cplusplus
}
#endif
#endif
