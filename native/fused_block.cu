// Memory-bound pieces of a FLUX DiT block, each fused into one pass (references: nunchaku_lite/fused.py
// qknorm_rope_ref and layernorm_modulate_ref; the unfused originals are models/dit.py QKNorm + apply_rope and
// LayerNorm + ModulationOut.apply).
//
// nl_qknorm_rope: reads the QKV projection output, row m = token (b, t) with b = m / L, t = m % L:
//   row[0 : HD] = q, row[HD : 2HD] = k, row[2HD : 3HD] = v, each head-major (h*D + d), row stride ld elements.
//   For q and k of each head (D values), in fp32:
//     rrms = rsqrt(mean(x^2) + eps);  y = T(T(x * rrms) * scale[d])       (T = rounding to the 16-bit dtype;
//                                                                           exactly RMSNorm's two roundings)
//     pairs (y[2i], y[2i+1]) rotated by pe's 2x2 matrix [[a, b], [c, e]] of token tok_offset + t, pair i:
//     out[2i] = T(a*y0 + b*y1), out[2i+1] = T(c*y0 + e*y1)             (separate mul/add roundings, no FMA,
//                                                                           as apply_rope computes them)
//   v is copied unchanged. Outputs q, k, v: [B, L_out, H, D] (token-major: SDPA reads them as
//   .transpose(1, 2) views, its FlashAttention output is then [B, L, H*D] after a view); this call writes
//   tokens tok_offset .. tok_offset + L - 1, so the txt and img streams of a double block fill one joint buffer.
//   pe: float [Bpe, L_out, D/2, 2, 2] (EmbedND output without the head axis), batch stride pe_stride_b floats
//   (0: shared by all batch rows), or NULL for no rotation.
//   Mapping: head dims D of 64, 128 or 256 with 16-byte aligned rows and buffers (FLUX: D = 128): D/8 lanes per
//   (token, head), each with 8 consecutive elements (4 pairs) of q, k and v in one 16-byte load each, the
//   sum of squares reduced over those lanes (qknorm_rope_vec_kernel: 3 loads per lane; the 32-bit form below
//   took 6 per lane for D = 128 and ran at ~half the H200's bandwidth, h200-2026-12-07e/profile_w4a4_main.txt:
//   3.9 ms per FLUX.1-dev 1024 step). Other shapes: one warp per (token, head), lane l owning pairs l, l+32, ...
//   (32-bit loads). The two differ only in the fp32 order of the sum of squares.
//
// nl_layernorm_modulate: out[m, :] = T(T(T(1 + scale[b]) * T((x - mean) * rstd)) + shift[b]): the roundings
//   of the unfused `(1 + scale) * LayerNorm(x) + shift` on 16-bit tensors (so a W4A4 linear fed by it gets the
//   same activation codes); mean and the biased variance in two fp32 passes over the row held in registers,
//   rstd = rsqrt(var + eps) (nn.LayerNorm without affine). shift/scale: [B, K] vectors of x's dtype with batch stride mod_stride_b
//   elements (the chunks of the modulation output are views), b = m / L. One warp per token row, 16-byte
//   loads; K a multiple of 8 and at most 32 * 8 * MAX_CHUNKS.
//
// nl_gate_residual: out[m, :] = T(x[m, :] + T(gate[b] * y[m, :])) (the unfused residual update, two roundings),
//   clamped to +-65504 for fp16 (clip_fp16). x, out [M, N] contiguous; y [M, N] with row stride ldy; gate
//   [B, N] with batch stride gate_stride_b, b = m / L. One thread per 8 elements (16-byte loads).
#include <type_traits>

#include "common.cuh"

namespace {

constexpr int QK_WARPS = 8;       // warps per block of nl_qknorm_rope (each a (token, head))
constexpr int QK_MAX_PAIRS = 4;   // pairs per lane: head dim up to 32 * 2 * 4 = 256
constexpr int LN_WARPS = 8;       // token rows per block of nl_layernorm_modulate
constexpr int LN_MAX_CHUNKS = 12; // 8-element chunks per lane: K up to 3072 (FLUX's hidden size)
constexpr int GR_THREADS = 256;   // threads per block of nl_gate_residual (one 8-element chunk each)

template <typename T> __device__ __forceinline__ float round_to(float v);
template <> __device__ __forceinline__ float round_to<__nv_bfloat16>(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}
template <> __device__ __forceinline__ float round_to<__half>(float v) { return __half2float(__float2half_rn(v)); }

__device__ __forceinline__ float load_scale(const void *p, int dtype, int i) {
  if (dtype == NL_F32) return static_cast<const float *>(p)[i];
  if (dtype == NL_BF16) return __bfloat162float(static_cast<const __nv_bfloat16 *>(p)[i]);
  return __half2float(static_cast<const __half *>(p)[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Normalize + rotate one head vector (q or k) held as `np` pairs per lane; writes to dst (head start).
template <typename T>
__device__ __forceinline__ void norm_rope_head(const uint32_t (&in)[QK_MAX_PAIRS], int np, int D, int lane,
                                               const void *scale, int scale_dtype, float eps,
                                               const float *pe_tok, T *dst) {
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < QK_MAX_PAIRS; ++j) {
    if (j < np) {
      const float2 v = unpack2<T>(in[j]);
      ss += v.x * v.x + v.y * v.y;
    }
  }
  const float rrms = rsqrtf(warp_sum(ss) / D + eps);
#pragma unroll
  for (int j = 0; j < QK_MAX_PAIRS; ++j) {
    if (j < np) {
      const int p = lane + 32 * j;
      const float2 v = unpack2<T>(in[j]);
      const float y0 = round_to<T>(round_to<T>(v.x * rrms) * load_scale(scale, scale_dtype, 2 * p));
      const float y1 = round_to<T>(round_to<T>(v.y * rrms) * load_scale(scale, scale_dtype, 2 * p + 1));
      float o0 = y0, o1 = y1;
      if (pe_tok != nullptr) {
        const float4 r = reinterpret_cast<const float4 *>(pe_tok)[p];  // [[a, b], [c, e]] row-major
        o0 = __fadd_rn(__fmul_rn(r.x, y0), __fmul_rn(r.y, y1));
        o1 = __fadd_rn(__fmul_rn(r.z, y0), __fmul_rn(r.w, y1));
      }
      reinterpret_cast<uint32_t *>(dst)[p] = pack2<T>(o0, o1);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(QK_WARPS * 32)
qknorm_rope_kernel(const T *__restrict__ qkv, int64_t M, int64_t L, int64_t ld, int H, int D,
                   const void *q_scale, const void *k_scale, int scale_dtype, float eps,
                   const float *__restrict__ pe, int64_t pe_stride_b, T *__restrict__ q, T *__restrict__ k,
                   T *__restrict__ v, int64_t L_out, int64_t tok_offset) {
  pdl_trigger();  // launched by nl_launch: see common.cuh
  pdl_wait();
  const int lane = threadIdx.x & 31;
  const int64_t item = (int64_t)blockIdx.x * QK_WARPS + (threadIdx.x >> 5);  // (token, head)
  if (item >= M * H) return;
  const int64_t m = item / H;
  const int h = (int)(item % H);
  const int64_t b = m / L, t = m % L;
  const int np = D / 64;  // pairs per lane
  const int64_t HD = (int64_t)H * D;
  const T *row = qkv + m * ld + (int64_t)h * D;
  const int64_t out_off = ((b * L_out + tok_offset + t) * H + h) * D;
  const float *pe_tok = pe ? pe + b * pe_stride_b + (tok_offset + t) * (int64_t)(2 * D) : nullptr;

  uint32_t xq[QK_MAX_PAIRS], xk[QK_MAX_PAIRS], xv[QK_MAX_PAIRS];
#pragma unroll
  for (int j = 0; j < QK_MAX_PAIRS; ++j) {
    if (j < np) {
      const int p = lane + 32 * j;
      xq[j] = reinterpret_cast<const uint32_t *>(row)[p];
      xk[j] = reinterpret_cast<const uint32_t *>(row + HD)[p];
      xv[j] = reinterpret_cast<const uint32_t *>(row + 2 * HD)[p];
    }
  }
  norm_rope_head<T>(xq, np, D, lane, q_scale, scale_dtype, eps, pe_tok, q + out_off);
  norm_rope_head<T>(xk, np, D, lane, k_scale, scale_dtype, eps, pe_tok, k + out_off);
#pragma unroll
  for (int j = 0; j < QK_MAX_PAIRS; ++j)
    if (j < np) reinterpret_cast<uint32_t *>(v + out_off)[lane + 32 * j] = xv[j];
}

// 8 consecutive scale values (RMSNorm weights) of element index i as floats, any scale dtype (uniform branch).
__device__ __forceinline__ void load_scale8(const void *p, int dtype, int i, float (&out)[8]) {
  if (dtype == NL_F32) {
    const float4 a = reinterpret_cast<const float4 *>(static_cast<const float *>(p) + i)[0];
    const float4 b = reinterpret_cast<const float4 *>(static_cast<const float *>(p) + i)[1];
    out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
    return;
  }
  const uint4 r = *reinterpret_cast<const uint4 *>(static_cast<const uint16_t *>(p) + i);
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = dtype == NL_BF16 ? unpack2<__nv_bfloat16>(w[j]) : unpack2<__half>(w[j]);
    out[2 * j] = f.x, out[2 * j + 1] = f.y;
  }
}

// RMSNorm + RoPE of 8 elements (c8: the lane's 16-byte chunk of a q or k head) whose head's sum of squares is
// spread over LPH lanes (aligned groups); the same per-element ops as norm_rope_head.
template <typename T, int LPH>
__device__ __forceinline__ uint4 norm_rope8(uint4 c8, int c, int D, const void *scale, int scale_dtype, float eps,
                                           const float *pe_tok) {
  const uint32_t w[4] = {c8.x, c8.y, c8.z, c8.w};
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 v = unpack2<T>(w[j]);
    ss += v.x * v.x + v.y * v.y;
  }
#pragma unroll
  for (int o = LPH / 2; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  const float rrms = rsqrtf(ss / D + eps);
  float sc[8];
  load_scale8(scale, scale_dtype, 8 * c, sc);
  uint32_t o[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 v = unpack2<T>(w[j]);
    const float y0 = round_to<T>(round_to<T>(v.x * rrms) * sc[2 * j]);
    const float y1 = round_to<T>(round_to<T>(v.y * rrms) * sc[2 * j + 1]);
    float o0 = y0, o1 = y1;
    if (pe_tok != nullptr) {
      const float4 r = reinterpret_cast<const float4 *>(pe_tok)[4 * c + j];  // pair 4c + j: [[a, b], [c, e]]
      o0 = __fadd_rn(__fmul_rn(r.x, y0), __fmul_rn(r.y, y1));
      o1 = __fadd_rn(__fmul_rn(r.z, y0), __fmul_rn(r.w, y1));
    }
    o[j] = pack2<T>(o0, o1);
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

// D/8 = LPH lanes per (token, head) item, 32 / LPH items per warp. (4 blocks per SM in the launch bounds: 64
// registers; without it ptxas chose 48 and spilled in the bf16 instances.)
template <typename T, int LPH>
__global__ void __launch_bounds__(QK_WARPS * 32, 4)
qknorm_rope_vec_kernel(const T *__restrict__ qkv, int64_t M, int64_t L, int64_t ld, int H,
                       const void *q_scale, const void *k_scale, int scale_dtype, float eps,
                       const float *__restrict__ pe, int64_t pe_stride_b, T *__restrict__ q, T *__restrict__ k,
                       T *__restrict__ v, int64_t L_out, int64_t tok_offset) {
  pdl_trigger();  // launched by nl_launch: see common.cuh
  pdl_wait();
  constexpr int D = 8 * LPH;
  const int lane = threadIdx.x & 31, c = lane % LPH;
  const int64_t item = ((int64_t)blockIdx.x * QK_WARPS + (threadIdx.x >> 5)) * (32 / LPH) + lane / LPH;
  const bool live = item < M * H;  // (dead lanes still take part in the shuffles)
  const int64_t it = live ? item : 0;
  const int64_t m = it / H;
  const int h = (int)(it % H);
  const int64_t b = m / L, t = m % L;
  const int64_t HD = (int64_t)H * D;
  const T *row = qkv + m * ld + (int64_t)h * D + 8 * c;
  const int64_t out_off = ((b * L_out + tok_offset + t) * H + h) * D + 8 * c;
  const float *pe_tok = pe ? pe + b * pe_stride_b + (tok_offset + t) * (int64_t)(2 * D) : nullptr;
  const uint4 xq = *reinterpret_cast<const uint4 *>(row);
  const uint4 xk = *reinterpret_cast<const uint4 *>(row + HD);
  const uint4 xv = *reinterpret_cast<const uint4 *>(row + 2 * HD);
  const uint4 oq = norm_rope8<T, LPH>(xq, c, D, q_scale, scale_dtype, eps, pe_tok);
  const uint4 ok = norm_rope8<T, LPH>(xk, c, D, k_scale, scale_dtype, eps, pe_tok);
  if (live) {
    *reinterpret_cast<uint4 *>(q + out_off) = oq;
    *reinterpret_cast<uint4 *>(k + out_off) = ok;
    *reinterpret_cast<uint4 *>(v + out_off) = xv;
  }
}

template <typename T, int LPH>
void launch_qknorm_rope_vec(const void *qkv, int64_t M, int64_t L, int64_t ld, int H, const void *q_scale,
                            const void *k_scale, int scale_dtype, float eps, const float *pe, int64_t pe_stride_b,
                            void *q, void *k, void *v, int64_t L_out, int64_t tok_offset, cudaStream_t s) {
  const int64_t per_block = (int64_t)QK_WARPS * (32 / LPH);
  const dim3 grid((unsigned)((M * H + per_block - 1) / per_block)), block(QK_WARPS * 32);
  (void)nl_launch(qknorm_rope_vec_kernel<T, LPH>, grid, block, 0, s, static_cast<const T *>(qkv), M, L, ld, H,
                  q_scale, k_scale, scale_dtype, eps, pe, pe_stride_b, static_cast<T *>(q), static_cast<T *>(k),
                  static_cast<T *>(v), L_out, tok_offset);
}

// (1 + scale) * xhat + shift with the unfused code's roundings: LayerNorm's output, 1 + scale, the product (the
// sum is rounded by the caller's pack2). Same roundings -> the same W4A4 activation codes as the plain path.
template <typename T>
__device__ __forceinline__ float modulate(float xhat, float scale, float shift) {
  return __fadd_rn(round_to<T>(__fmul_rn(round_to<T>(1.f + scale), round_to<T>(xhat))), shift);
}

// T(x + T(gate * y)) (the unfused `x + gate * y`), saturated to +-65504 for fp16 (models/dit.py clip_fp16).
template <typename T>
__device__ __forceinline__ float gate_residual(float x, float gate, float y) {
  const float v = __fadd_rn(x, round_to<T>(__fmul_rn(gate, y)));
  return std::is_same<T, __half>::value ? fminf(fmaxf(v, -65504.f), 65504.f) : v;
}

template <typename T>
__global__ void __launch_bounds__(GR_THREADS)
gate_residual_kernel(const T *__restrict__ x, const T *__restrict__ y, int64_t ldy, const T *__restrict__ gate,
                     int64_t gate_stride_b, int64_t M, int N, int64_t L, T *__restrict__ out) {
  pdl_trigger();  // launched by nl_launch: see common.cuh
  pdl_wait();
  const int nch = N / 8;
  const int64_t i = (int64_t)blockIdx.x * GR_THREADS + threadIdx.x;  // one 8-element chunk per thread
  if (i >= M * nch) return;
  const int64_t m = i / nch;
  const int c = (int)(i % nch);
  const uint4 xv = reinterpret_cast<const uint4 *>(x + m * N)[c];
  const uint4 yv = reinterpret_cast<const uint4 *>(y + m * ldy)[c];
  const uint4 gv = reinterpret_cast<const uint4 *>(gate + (m / L) * gate_stride_b)[c];
  const uint32_t xw[4] = {xv.x, xv.y, xv.z, xv.w}, yw[4] = {yv.x, yv.y, yv.z, yv.w};
  const uint32_t gw[4] = {gv.x, gv.y, gv.z, gv.w};
  uint32_t o[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 a = unpack2<T>(xw[j]), b = unpack2<T>(yw[j]), g = unpack2<T>(gw[j]);
    o[j] = pack2<T>(gate_residual<T>(a.x, g.x, b.x), gate_residual<T>(a.y, g.y, b.y));
  }
  reinterpret_cast<uint4 *>(out + m * N)[c] = make_uint4(o[0], o[1], o[2], o[3]);
}

template <typename T>
__global__ void __launch_bounds__(LN_WARPS * 32)
layernorm_modulate_kernel(const T *__restrict__ x, int64_t M, int K, int64_t ldx, int64_t L,
                          const T *__restrict__ shift, const T *__restrict__ scale, int64_t mod_stride_b,
                          float eps, T *__restrict__ out, int64_t ldo) {
  pdl_trigger();  // launched by nl_launch: see common.cuh
  pdl_wait();
  const int lane = threadIdx.x & 31;
  const int64_t m = (int64_t)blockIdx.x * LN_WARPS + (threadIdx.x >> 5);
  if (m >= M) return;
  const int nch = K / 8;  // 8-element chunks in the row; lane owns chunks lane, lane + 32, ...
  const uint4 *src = reinterpret_cast<const uint4 *>(x + m * ldx);
  uint4 buf[LN_MAX_CHUNKS];
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < LN_MAX_CHUNKS; ++j) {
    const int c = lane + 32 * j;
    if (c < nch) {
      buf[j] = src[c];
      const uint32_t w[4] = {buf[j].x, buf[j].y, buf[j].z, buf[j].w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = unpack2<T>(w[i]);
        sum += f.x + f.y;
      }
    }
  }
  const float mean = warp_sum(sum) / K;
  float var = 0.f;
#pragma unroll
  for (int j = 0; j < LN_MAX_CHUNKS; ++j) {
    if (lane + 32 * j < nch) {
      const uint32_t w[4] = {buf[j].x, buf[j].y, buf[j].z, buf[j].w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = unpack2<T>(w[i]);
        var += (f.x - mean) * (f.x - mean) + (f.y - mean) * (f.y - mean);
      }
    }
  }
  const float rstd = rsqrtf(warp_sum(var) / K + eps);
  const int64_t b = m / L;
  const uint4 *sh = reinterpret_cast<const uint4 *>(shift + b * mod_stride_b);
  const uint4 *sc = reinterpret_cast<const uint4 *>(scale + b * mod_stride_b);
  uint4 *dst = reinterpret_cast<uint4 *>(out + m * ldo);
#pragma unroll
  for (int j = 0; j < LN_MAX_CHUNKS; ++j) {
    const int c = lane + 32 * j;
    if (c < nch) {
      const uint4 s4 = sh[c], g4 = sc[c];
      const uint32_t w[4] = {buf[j].x, buf[j].y, buf[j].z, buf[j].w};
      const uint32_t ws[4] = {s4.x, s4.y, s4.z, s4.w}, wg[4] = {g4.x, g4.y, g4.z, g4.w};
      uint32_t o[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = unpack2<T>(w[i]), s = unpack2<T>(ws[i]), g = unpack2<T>(wg[i]);
        o[i] = pack2<T>(modulate<T>((f.x - mean) * rstd, g.x, s.x), modulate<T>((f.y - mean) * rstd, g.y, s.y));
      }
      dst[c] = make_uint4(o[0], o[1], o[2], o[3]);
    }
  }
}

}  // namespace

extern "C" int nl_qknorm_rope(const void *qkv, int dtype, int64_t M, int64_t L, int64_t ld, int H, int D,
                              const void *q_scale, const void *k_scale, int scale_dtype, float eps,
                              const float *pe, int64_t pe_stride_b, void *q, void *k, void *v, int64_t L_out,
                              int64_t tok_offset, void *stream) {
  const char *kn = "nl_qknorm_rope";
  NL_CHECK_ARG(dtype == NL_BF16 || dtype == NL_F16, "%s: dtype must be NL_BF16 or NL_F16, got %d", kn, dtype);
  NL_CHECK_ARG(scale_dtype >= NL_F32 && scale_dtype <= NL_F16, "%s: bad scale_dtype %d", kn, scale_dtype);
  NL_CHECK_ARG(M >= 0 && L >= 1 && H >= 1, "%s: need M >= 0, L >= 1, H >= 1 (M=%lld L=%lld H=%d)", kn,
               (long long)M, (long long)L, H);
  NL_CHECK_ARG(D % 64 == 0 && D >= 64 && D <= 64 * QK_MAX_PAIRS, "%s: head dim D=%d must be a multiple of 64 "
               "in [64, %d]", kn, D, 64 * QK_MAX_PAIRS);
  NL_CHECK_ARG(M % L == 0, "%s: M=%lld is not a multiple of the tokens per batch L=%lld", kn, (long long)M,
               (long long)L);
  NL_CHECK_ARG(ld >= 3LL * H * D && ld % 2 == 0, "%s: row stride ld=%lld must be even and >= 3*H*D=%lld", kn,
               (long long)ld, 3LL * H * D);
  NL_CHECK_ARG(tok_offset >= 0 && tok_offset + L <= L_out, "%s: tokens %lld..%lld do not fit L_out=%lld", kn,
               (long long)tok_offset, (long long)(tok_offset + L), (long long)L_out);
  NL_CHECK_ARG(qkv && q && k && v && q_scale && k_scale, "%s: null pointer", kn);
  NL_CHECK_ARG(nl_aligned(qkv, 4) && nl_aligned(q, 4) && nl_aligned(k, 4) && nl_aligned(v, 4),
               "%s: qkv, q, k, v must be 4-byte aligned", kn);
  NL_CHECK_ARG(pe == nullptr || nl_aligned(pe, 16), "%s: pe must be 16-byte aligned", kn);
  if (M == 0) return NL_OK;
  const int64_t items = M * H;
  const dim3 grid((unsigned)((items + QK_WARPS - 1) / QK_WARPS)), block(QK_WARPS * 32);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool vec = (D == 64 || D == 128 || D == 256) && ld % 8 == 0 && nl_aligned(qkv, 16) && nl_aligned(q, 16) &&
                   nl_aligned(k, 16) && nl_aligned(v, 16) && nl_aligned(q_scale, 16) && nl_aligned(k_scale, 16);
  if (vec) {
    auto go = [&](auto tag, auto lph) {
      using T = decltype(tag);
      launch_qknorm_rope_vec<T, decltype(lph)::value>(qkv, M, L, ld, H, q_scale, k_scale, scale_dtype, eps, pe,
                                                      pe_stride_b, q, k, v, L_out, tok_offset, s);
    };
    auto by_d = [&](auto tag) {
      if (D == 64) go(tag, std::integral_constant<int, 8>{});
      else if (D == 128) go(tag, std::integral_constant<int, 16>{});
      else go(tag, std::integral_constant<int, 32>{});
    };
    if (dtype == NL_BF16) by_d(__nv_bfloat16{});
    else by_d(__half{});
    NL_CHECK_LAUNCH(kn);
    return NL_OK;
  }
  if (dtype == NL_BF16)
    (void)nl_launch(qknorm_rope_kernel<__nv_bfloat16>, dim3(grid), dim3(block), 0, s,
        static_cast<const __nv_bfloat16 *>(qkv), M, L, ld, H, D, q_scale, k_scale, scale_dtype, eps, pe,
        pe_stride_b, static_cast<__nv_bfloat16 *>(q), static_cast<__nv_bfloat16 *>(k),
        static_cast<__nv_bfloat16 *>(v), L_out, tok_offset);
  else
    (void)nl_launch(qknorm_rope_kernel<__half>, dim3(grid), dim3(block), 0, s,
        static_cast<const __half *>(qkv), M, L, ld, H, D, q_scale, k_scale, scale_dtype, eps, pe, pe_stride_b,
        static_cast<__half *>(q), static_cast<__half *>(k), static_cast<__half *>(v), L_out, tok_offset);
  NL_CHECK_LAUNCH(kn);
  return NL_OK;
}

extern "C" int nl_layernorm_modulate(const void *x, int dtype, int64_t M, int64_t K, int64_t ldx, int64_t L,
                                     const void *shift, const void *scale, int64_t mod_stride_b, float eps,
                                     void *out, int64_t ldo, void *stream) {
  const char *kn = "nl_layernorm_modulate";
  NL_CHECK_ARG(dtype == NL_BF16 || dtype == NL_F16, "%s: dtype must be NL_BF16 or NL_F16, got %d", kn, dtype);
  NL_CHECK_ARG(M >= 0 && L >= 1 && M % L == 0, "%s: M=%lld must be a multiple of L=%lld", kn, (long long)M,
               (long long)L);
  NL_CHECK_ARG(K % 8 == 0 && K >= 8 && K <= 32LL * 8 * LN_MAX_CHUNKS, "%s: K=%lld must be a multiple of 8 "
               "in [8, %d]", kn, (long long)K, 32 * 8 * LN_MAX_CHUNKS);
  NL_CHECK_ARG(ldx >= K && ldo >= K && ldx % 8 == 0 && ldo % 8 == 0 && mod_stride_b % 8 == 0,
               "%s: strides ldx=%lld ldo=%lld mod_stride_b=%lld must be multiples of 8 (and ldx, ldo >= K)", kn,
               (long long)ldx, (long long)ldo, (long long)mod_stride_b);
  NL_CHECK_ARG(x && shift && scale && out, "%s: null pointer", kn);
  NL_CHECK_ARG(nl_aligned(x, 16) && nl_aligned(shift, 16) && nl_aligned(scale, 16) && nl_aligned(out, 16),
               "%s: x, shift, scale and out must be 16-byte aligned", kn);
  if (M == 0) return NL_OK;
  const dim3 grid((unsigned)((M + LN_WARPS - 1) / LN_WARPS)), block(LN_WARPS * 32);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == NL_BF16)
    (void)nl_launch(layernorm_modulate_kernel<__nv_bfloat16>, dim3(grid), dim3(block), 0, s,
        static_cast<const __nv_bfloat16 *>(x), M, (int)K, ldx, L, static_cast<const __nv_bfloat16 *>(shift),
        static_cast<const __nv_bfloat16 *>(scale), mod_stride_b, eps, static_cast<__nv_bfloat16 *>(out), ldo);
  else
    (void)nl_launch(layernorm_modulate_kernel<__half>, dim3(grid), dim3(block), 0, s,
        static_cast<const __half *>(x), M, (int)K, ldx, L, static_cast<const __half *>(shift),
        static_cast<const __half *>(scale), mod_stride_b, eps, static_cast<__half *>(out), ldo);
  NL_CHECK_LAUNCH(kn);
  return NL_OK;
}

extern "C" int nl_gate_residual(const void *x, const void *y, int64_t ldy, const void *gate, int64_t gate_stride_b,
                                int dtype, int64_t M, int64_t N, int64_t L, void *out, void *stream) {
  const char *kn = "nl_gate_residual";
  NL_CHECK_ARG(dtype == NL_BF16 || dtype == NL_F16, "%s: dtype must be NL_BF16 or NL_F16, got %d", kn, dtype);
  NL_CHECK_ARG(M >= 0 && L >= 1 && M % L == 0, "%s: M=%lld must be a multiple of L=%lld", kn, (long long)M,
               (long long)L);
  NL_CHECK_ARG(N % 8 == 0 && N >= 8 && ldy >= N && ldy % 8 == 0 && gate_stride_b % 8 == 0,
               "%s: N=%lld, ldy=%lld and gate_stride_b=%lld must be multiples of 8 (ldy >= N)", kn, (long long)N,
               (long long)ldy, (long long)gate_stride_b);
  NL_CHECK_ARG(x && y && gate && out, "%s: null pointer", kn);
  NL_CHECK_ARG(nl_aligned(x, 16) && nl_aligned(y, 16) && nl_aligned(gate, 16) && nl_aligned(out, 16),
               "%s: x, y, gate and out must be 16-byte aligned", kn);
  if (M == 0) return NL_OK;
  const int64_t chunks = M * (N / 8);
  const dim3 grid((unsigned)((chunks + GR_THREADS - 1) / GR_THREADS)), block(GR_THREADS);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == NL_BF16)
    (void)nl_launch(gate_residual_kernel<__nv_bfloat16>, dim3(grid), dim3(block), 0, s,
        static_cast<const __nv_bfloat16 *>(x), static_cast<const __nv_bfloat16 *>(y), ldy,
        static_cast<const __nv_bfloat16 *>(gate), gate_stride_b, M, (int)N, L, static_cast<__nv_bfloat16 *>(out));
  else
    (void)nl_launch(gate_residual_kernel<__half>, dim3(grid), dim3(block), 0, s,
        static_cast<const __half *>(x), static_cast<const __half *>(y), ldy, static_cast<const __half *>(gate),
        gate_stride_b, M, (int)N, L, static_cast<__half *>(out));
  NL_CHECK_LAUNCH(kn);
  return NL_OK;
}
