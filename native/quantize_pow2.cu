// Power-of-two activation quantization (quant/ops.py quantize_act(..., pow2=True) and pack_act_s8_tiles): the
// second pass after nl_quantize_act, which gives the plain group scales (and the low-rank activation).
//
// Math, per token m and 64-wide group g (fp32, IEEE divisions, bit-identical to the reference):
//   p[m, g] = the plain scale amax / qmax (nl_quantize_act's output, NL_ACT_PACKED scales [K/64, lds])
//   s[m]    = max_g p[m, g]
//   e       = the largest e in 0..4 with s * 2^-e >= p[m, g];   gs = s * 2^-e (exact)
//   xs      = (x + shift) / smooth                           (shift 0 for signed layers; smooth omitted if NULL)
//   code    = clamp(rint(xs / gs), -8, 7) signed, (0, 15) unsigned;   gs == 0 -> code 0
// (IEEE divisions per element: simple and exact. The bracketed-reciprocal rounding of quantize.cu was tried
// here and was no faster on the H100: the pass is bound by memory traffic, h100-2026-12-07/README.md.)
// Layouts written (`layout`):
//   NL_ACT_PACKED    codes uint8 [M, K/2] (low nibble = even k), scales float [K/64, ldm] = gs (rows >= M: 0)
//   NL_ACT_FP8_TILES codes uint8 [K/64, ldm, 64]: e4m3 bytes of the codes, scales float [K/64, ldm] = gs, both in
//                    the layout of nl_quantize_act (16-token permutation of the scales), rows >= M are 0
//   NL_ACT_S8_TILES  bytes uint8 [K/64, ldm, 64] in the NL_ACT_FP8_TILES core-matrix order, each byte the int8
//                    (signed) or uint8 (unsigned) code << (4 - e); scales float [ldm] = s / 16 in the 16-token
//                    permutation 8b+2q+e -> 4q+2b+e; rows >= M are 0 (ldm = Mp, a multiple of 256)
// Two kernels: token_scale (one thread per token: s over the K/64 plain scales, coalesced across tokens) and
// requantize (one thread per 16-element chunk of a token's group: one 16-byte store in the tile layout or 8
// bytes of packed codes; rows is a multiple of 8). Memory-bound; it reads x a second time (from L2 for the
// sizes of a DiT layer).
#include "common.cuh"
#include <cuda_fp8.h>

namespace {

constexpr int MAX_EXP = 4;  // quant/ops.py POW2_MAX_EXP: code << (4 - e) fits 8 bits
constexpr int THREADS = 256;
constexpr int TS_THREADS = 64;  // token_scale: one thread per token, small blocks to spread 4608 tokens over the SMs

__device__ __forceinline__ int64_t permuted16(int64_t m) {  // token 8b + 2q + e sits at 4q + 2b + e
  const int64_t t = m & 15;
  return (m & ~15LL) + 4 * ((t & 7) >> 1) + 2 * (t >> 3) + (t & 1);
}

__global__ void token_scale_kernel(const float *__restrict__ plain, int64_t lds, int64_t M, int G, int64_t rows,
                                   float *__restrict__ top, float *__restrict__ tscale) {
  const int64_t m = blockIdx.x * (int64_t)TS_THREADS + threadIdx.x;
  if (m >= rows) return;
  float s = 0.f;
  if (m < M) {
#pragma unroll 8
    for (int g = 0; g < G; ++g) s = fmaxf(s, plain[g * lds + m]);  // loads batched: latency, not bandwidth
  }
  top[m] = s;
  if (tscale) tscale[permuted16(m)] = s * (1.f / (1 << MAX_EXP));
}

template <typename T, int LAYOUT>
__global__ void requantize_kernel(const T *__restrict__ x, int64_t ldx, int64_t M, int K, int64_t rows,
                                  const float *__restrict__ smooth, float shift, bool uns,
                                  const float *__restrict__ plain, int64_t lds, const float *__restrict__ top,
                                  uint8_t *__restrict__ codes, float *__restrict__ scales, int64_t ldm) {
  // Thread order: token within 8 fastest, then the 16-element chunk, then the 8-token block: eight neighbouring
  // threads write one 128-byte core-matrix row block of the tile layout (coalesced stores), and each thread
  // reads one 32-byte sector of x.
  const int chunks = K / 16;  // per token
  const int64_t idx = blockIdx.x * (int64_t)THREADS + threadIdx.x;
  if (idx >= rows * chunks) return;
  const int64_t blk = idx / (8 * chunks), m = blk * 8 + (idx & 7);
  const int ch = (int)((idx >> 3) % chunks), g = ch >> 2, kb = ch & 3, k0 = ch * 16;
  uint8_t out[16];
  float gs = 0.f;
  int e = MAX_EXP;
  if (m < M) {
    const float s = top[m], p = plain[g * lds + m];
    e = 0;
    while (e < MAX_EXP && s * (1.f / (2 << e)) >= p) ++e;  // s * 2^-(e+1) still covers p
    gs = s * (1.f / (1 << e));
    const float lo = uns ? 0.f : -8.f, hi = uns ? 15.f : 7.f;
    const uint4 *xr = reinterpret_cast<const uint4 *>(x + m * ldx + k0);  // 16-byte aligned (host check)
    float xv[16];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint4 u = xr[h];
      const uint32_t wv[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = unpack2<T>(wv[j]);
        xv[8 * h + 2 * j] = f.x;
        xv[8 * h + 2 * j + 1] = f.y;
      }
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      float v = xv[i];
      if (shift != 0.f) v = v + shift;
      if (smooth) v = __fdiv_rn(v, smooth[k0 + i]);
      const float c = gs > 0.f ? fminf(fmaxf(rintf(__fdiv_rn(v, gs)), lo), hi) : 0.f;
      out[i] = (uint8_t)(int)c;  // packed: the code's low nibble is all that is kept
    }
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) out[i] = 0;
  }
  if constexpr (LAYOUT != NL_ACT_PACKED) {
    uint32_t w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t v = 0;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int code = uns ? (int)out[4 * j + b] : (int)(int8_t)out[4 * j + b];
        const uint32_t byte = LAYOUT == NL_ACT_S8_TILES
                                  ? (uint32_t)((code * (1 << (MAX_EXP - e))) & 0xFF)
                                  : (uint32_t)__nv_cvt_float_to_fp8((float)code, __NV_SATFINITE, __NV_E4M3);
        v |= byte << (8 * b);
      }
      w[j] = v;
    }
    uint8_t *dst = codes + ((int64_t)g * ldm + (m & ~7LL)) * 64 + (kb * 128) + (m & 7) * 16;
    *reinterpret_cast<uint4 *>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    if (LAYOUT == NL_ACT_FP8_TILES && kb == 0) scales[(int64_t)g * ldm + permuted16(m)] = gs;
  } else {
    if (m < M) {
      uint32_t w[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        uint32_t v = 0;
#pragma unroll
        for (int b = 0; b < 8; ++b) v |= (uint32_t)(out[8 * j + b] & 0xF) << (4 * b);
        w[j] = v;
      }
      *reinterpret_cast<uint2 *>(codes + m * (K / 2) + k0 / 2) = make_uint2(w[0], w[1]);
    }
    if (kb == 0) scales[(int64_t)g * ldm + m] = gs;  // rows M .. ldm: 0
  }
}

template <typename T>
int launch(const void *x, int64_t M, int64_t K, int64_t ldx, const float *smooth, float shift, bool uns,
           const float *plain, int64_t lds, int layout, uint8_t *codes, float *scales, int64_t ldm, float *top,
           cudaStream_t s) {
  const char *k = "nl_quantize_act_pow2";
  token_scale_kernel<<<(unsigned)((ldm + TS_THREADS - 1) / TS_THREADS), TS_THREADS, 0, s>>>(
      plain, lds, M, (int)(K / 64), ldm, top, layout == NL_ACT_S8_TILES ? scales : nullptr);
  NL_CHECK_LAUNCH(k);
  const int64_t units = ldm * (K / 16);
  const unsigned blocks = (unsigned)((units + THREADS - 1) / THREADS);
  const T *xt = static_cast<const T *>(x);
  auto kern = layout == NL_ACT_S8_TILES    ? requantize_kernel<T, NL_ACT_S8_TILES>
              : layout == NL_ACT_FP8_TILES ? requantize_kernel<T, NL_ACT_FP8_TILES>
                                           : requantize_kernel<T, NL_ACT_PACKED>;
  kern<<<blocks, THREADS, 0, s>>>(xt, ldx, M, (int)K, ldm, smooth, shift, uns, plain, lds, top, codes, scales, ldm);
  NL_CHECK_LAUNCH(k);
  return NL_OK;
}

}  // namespace

extern "C" int nl_quantize_act_pow2(const void *x, int x_dtype, int64_t M, int64_t K, int64_t ldx,
                                    const float *smooth, float shift, int act_unsigned, const float *plain_scales,
                                    int64_t lds, int layout, uint8_t *codes, float *scales, int64_t ldm,
                                    float *workspace, void *stream) {
  const char *k = "nl_quantize_act_pow2";
  NL_CHECK_ARG(x_dtype == NL_BF16 || x_dtype == NL_F16, "%s: x dtype code %d is not bf16/fp16", k, x_dtype);
  NL_CHECK_ARG(M >= 1 && M < (1LL << 31), "%s: M=%lld out of range", k, (long long)M);
  NL_CHECK_ARG(K >= 64 && K % 64 == 0 && K < (1LL << 24), "%s: K=%lld must be a positive multiple of 64", k,
               (long long)K);
  NL_CHECK_ARG(ldx >= K, "%s: x row stride %lld < K", k, (long long)ldx);
  NL_CHECK_ARG(layout == NL_ACT_PACKED || layout == NL_ACT_FP8_TILES || layout == NL_ACT_S8_TILES,
               "%s: layout %d must be NL_ACT_PACKED, NL_ACT_FP8_TILES or NL_ACT_S8_TILES", k, layout);
  NL_CHECK_ARG(lds >= M, "%s: plain scale row stride %lld < M", k, (long long)lds);
  if (layout != NL_ACT_PACKED)
    NL_CHECK_ARG(ldm >= M && ldm % 256 == 0, "%s: ldm=%lld must be M rounded up to a multiple of 256", k,
                 (long long)ldm);
  else
    NL_CHECK_ARG(ldm >= M && ldm % 128 == 0, "%s: ldm=%lld must be a multiple of 128 >= M", k, (long long)ldm);
  NL_CHECK_ARG(x && plain_scales && codes && scales && workspace, "%s: x, plain_scales, codes, scales and "
               "workspace must be non-null", k);
  NL_CHECK_ARG(nl_aligned(codes, 16) && nl_aligned(scales, 16), "%s: codes and scales must be 16-byte aligned", k);
  NL_CHECK_ARG(nl_aligned(x, 16) && ldx % 8 == 0, "%s: x must be 16-byte aligned with a row stride that is a "
               "multiple of 8 elements", k);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return x_dtype == NL_F16
             ? launch<__half>(x, M, K, ldx, smooth, shift, act_unsigned != 0, plain_scales, lds, layout, codes,
                              scales, ldm, workspace, s)
             : launch<__nv_bfloat16>(x, M, K, ldx, smooth, shift, act_unsigned != 0, plain_scales, lds, layout,
                                     codes, scales, ldm, workspace, s);
}
