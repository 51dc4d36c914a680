// Activation quantization + low-rank down projection, optionally preceded by LayerNorm + modulation.
// References: quant/ops.py quantize_act (codes, scales), pack_act_fp8_tiles (the sm_90 layout),
// layernorm_modulate (the fused prologue) and x @ lora_down^T (the low-rank half of the SVDQuant branch).
//
// Math, per token m and 64-wide group g (fp32, IEEE division, bit-identical codes and scales):
//   a     = x                                         (nl_quantize_act)
//   a     = (1 + mscale[b]) * LN(x) + mshift[b]       (nl_layernorm_quantize_act, b = m / tokens_per_batch;
//            LN without affine over K; LN(x), 1 + mscale, the product and the sum each rounded to x's dtype,
//            exactly the ops of the unfused torch path)
//   xs    = (a + shift) / smooth                      (shift 0 for signed layers; smooth omitted when NULL)
//   scale = max|xs| / 7,  codes = clamp(rint(xs / scale), -8, 7)        signed
//   scale = max|xs| / 15, codes = clamp(rint(xs / scale),  0, 15)       unsigned;   scale == 0 -> codes 0
//   lora_act[m, :] = a[m, :] @ lora_down^T            (16-bit operands on tensor cores, fp32 accumulation)
// rint(xs / scale) is evaluated as rint(xs * RN(1/scale)) and recomputed with an IEEE division only where
// that product lies within 1e-5 of a rounding boundary (x.5): the product is within 2e-6 of the true
// quotient (|xs/scale| <= 15.0001), so elsewhere both round to the same integer. This keeps the codes
// bit-identical while avoiding one division per element (the kernel is otherwise instruction-bound).
//
// Layouts written (`layout`):
//   NL_ACT_PACKED     codes uint8 [M, K/2] (low nibble = even k), scales float [K/64, ldm] (rows >= M: 0)
//   NL_ACT_FP8_TILES  codes uint8 [K/64, ldm, 64]: byte (g, m, k) at g*ldm*64 + ((m/8)*4 + k/16)*128
//                     + (m%8)*16 + k%16 = e4m3 encoding of the code; scales float [K/64, ldm] with the
//                     16-token permutation 8b+2q+e -> 4q+2b+e; rows >= M are 0 (ldm = Mp, multiple of 256)
//   lora_act float [M, rank] in both.
//
// Tiling: a CTA of NWARPS warps owns BM tokens and streams K in stages of KC columns (KC/64 groups) through
// a STAGES-deep cp.async ring shared by all warps: x tile [BM x KC] and lora_down tile [rank x KC] (16-byte
// chunks XOR-swizzled within each 128-byte run so ldmatrix and the quantizer's reads are conflict-free).
// lora_down is thus read once per CTA (from L2) for BM tokens. Quantization: a warp pass covers 8 tokens x one
// group, 4 lanes per token (lane = c*8 + token, 16 elements each: chunks c and c+4), amax by 2 shuffles.
// Low-rank: warp w owns m-tile w % (BM/16) and every (BM/16)-th... k-step of the stage; partial sums over the
// k-split warps are reduced through shared memory in a fixed order at the end (deterministic).
// LayerNorm: the CTA first computes each row's mean and rstd (two passes over the row: the second hits L1),
// while the first stages are already in flight; each landed stage is then normalized and modulated in place.
#include "common.cuh"

namespace {

constexpr int NWARPS = 8;
constexpr int NTHREADS = NWARPS * 32;
constexpr float MAGIC = 12582912.0f;  // 1.5 * 2^23: t + MAGIC rounds t to an integer (ties to even)
constexpr float BOUNDARY = 0.5f - 1e-5f;

template <int BM_, int MAXR_>
struct Cfg {
  static constexpr int BM = BM_;
  static constexpr int MAXR = MAXR_;
  static constexpr int MTILES = BM / 16;          // 16-token mma tiles
  static constexpr int KSPLIT = NWARPS / MTILES;  // warps sharing one m-tile (split over k-steps)
  static constexpr int KC = BM == 16 ? 256 : 128; // columns per stage: one quantizer pass per warp (BM <= 32)
  static constexpr int GS = KC / 64;              // groups per stage
  static constexpr int ROW_BYTES = KC * 2;
  static constexpr int X_BYTES = BM * ROW_BYTES;
  static constexpr int STAGES = MAXR > 64 ? 3 : 4;
  static constexpr int MIN_BLOCKS = MAXR > 64 ? 1 : 2;  // 2 x 8 warps per SM without register spills
};

// Byte offset of logical 16-byte chunk `c` of row `row` in a tile with rows of `row_bytes`.
__device__ __forceinline__ int swz(int row, int c, int row_bytes) {
  return row * row_bytes + (((c & ~7) | ((c & 7) ^ (row & 7))) << 4);
}

// Low 4 bits of each of 8 words -> 8 nibbles (element 0 in the low nibble).
__device__ __forceinline__ uint32_t pack_nibbles(const uint32_t (&b)[8]) {
  const uint32_t e = __byte_perm(__byte_perm(b[0], b[2], 0x0040), __byte_perm(b[4], b[6], 0x0040), 0x5410);
  const uint32_t o = __byte_perm(__byte_perm(b[1], b[3], 0x0040), __byte_perm(b[5], b[7], 0x0040), 0x5410);
  return (e & 0x0f0f0f0fu) | ((o << 4) & 0xf0f0f0f0u);
}

// e4m3 bytes of two small integers held in floats (|v| <= 15: exact).
__device__ __forceinline__ uint32_t e4m3x2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
#else
  auto one = [](float v) -> uint32_t {
    const int n = static_cast<int>(v);
    const uint32_t a = n < 0 ? -n : n;
    if (a == 0) return 0u;
    const int e = 31 - __clz(a);  // 0..3
    return (n < 0 ? 0x80u : 0u) | (uint32_t)((e + 7) << 3) | ((a << (3 - e)) & 7u);
  };
  return one(lo) | (one(hi) << 8);
#endif
}

// a / b correctly rounded without a division instruction, given y = RN(1/b): two Newton corrections with
// exact fma residuals (the second is Markstein's theorem: y within half an ulp of 1/b and a first quotient
// within one ulp give RN(a/b)). Valid without underflow in the residuals: callers require |a| >= 2^-100 or
// a == 0, and 2^-100 <= |b| <= 2^100 (else they take the IEEE division path).
__device__ __forceinline__ float div_rn_by(float a, float b, float y) {
  const float q0 = a * y;
  const float q1 = fmaf(fmaf(-b, q0, a), y, q0);
  return fmaf(fmaf(-b, q1, a), y, q1);
}
__device__ __forceinline__ bool div_operand_ok(float a) { return !(fabsf(a) < 0x1p-100f) || a == 0.f; }

struct Args {
  const void *x;
  int M, K;
  int64_t ldx;
  const float *smooth;
  float shift;
  int act_unsigned;
  const void *lora_down;
  int rank;
  int layout;
  uint8_t *codes;
  float *scales;
  int64_t ldm;
  float *lora_act;
  // LayerNorm + modulation (LN kernels only)
  const void *mshift, *mscale;
  int64_t tokens_per_batch;
  float eps;
  void *y_out;
  int exact_div;  // 1: IEEE division for every code (debug / verification of the fast rounding)
};

// Zero rows [m0, m0 + BM) of the scales (and fp8 codes) of a tile that lies entirely in the padding.
template <typename C>
__device__ void write_padding_tile(const Args &p, int m0) {
  const int G = p.K / 64;
  for (int i = threadIdx.x; i < G * C::BM; i += NTHREADS)
    p.scales[(int64_t)(i / C::BM) * p.ldm + m0 + i % C::BM] = 0.f;
  if (p.layout == NL_ACT_FP8_TILES) {
    // rows m0..m0+BM of every group slab are one contiguous run of BM*64 bytes (m0 is a multiple of 8)
    for (int i = threadIdx.x; i < G * C::BM * 4; i += NTHREADS) {
      const int g = i / (C::BM * 4), j = i % (C::BM * 4);
      reinterpret_cast<uint4 *>(p.codes + (int64_t)g * p.ldm * 64 + (int64_t)m0 * 64)[j] = make_uint4(0, 0, 0, 0);
    }
  }
}

template <typename T, typename C, bool LN>
__global__ void __launch_bounds__(NTHREADS, C::MIN_BLOCKS) quantize_kernel(const Args p) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ float row_mean[C::BM], row_rstd[C::BM];
  __shared__ int row_batch[C::BM];
  // smooth and RN(1/smooth) of the stage's channels, double-buffered (NaN reciprocal: use IEEE division)
  __shared__ __align__(16) float s_smooth[2][C::KC], s_rcp[2][C::KC];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tid = threadIdx.x;
  const int m0 = blockIdx.x * C::BM;
  if (m0 >= p.M) {
    write_padding_tile<C>(p, m0);
    return;
  }
  const int K = p.K, G = K / 64, rank = p.rank;
  const int nstages = (G + C::GS - 1) / C::GS;
  const int L_BYTES = rank * C::ROW_BYTES;
  const int STAGE_BYTES = C::X_BYTES + L_BYTES;
  const T *x = static_cast<const T *>(p.x);
  const T *ld = static_cast<const T *>(p.lora_down);

  auto load_stage = [&](int s) {
    uint8_t *xs = smem + (s % C::STAGES) * STAGE_BYTES, *ls = xs + C::X_BYTES;
    const int k0 = s * C::KC;
    const int valid = min(C::GS, G - s * C::GS) * 8;  // 16-byte chunks per row in this stage
    constexpr int CPR = C::KC / 8;
#pragma unroll
    for (int i = tid; i < C::BM * CPR; i += NTHREADS) {
      const int row = i / CPR, c = i % CPR, m = m0 + row;
      if (c < valid)
        cp_async16(xs + swz(row, c, C::ROW_BYTES), x + (int64_t)(m < p.M ? m : 0) * p.ldx + k0 + c * 8,
                   m < p.M ? 16 : 0);
    }
    for (int i = tid; i < rank * CPR; i += NTHREADS) {
      const int row = i / CPR, c = i % CPR;
      if (c < valid) cp_async16(ls + swz(row, c, C::ROW_BYTES), ld + (int64_t)row * K + k0 + c * 8);
    }
  };

#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < nstages) load_stage(s);
    cp_async_commit();
  }
  auto smooth_stage = [&](int s) {  // one channel per thread (KC <= NTHREADS)
    const int k = s * C::KC + tid;
    if (p.smooth && tid < C::KC && k < K) {
      const float v = p.smooth[k];
      const bool ok = fabsf(v) >= 0x1p-100f && fabsf(v) <= 0x1p100f;
      s_smooth[s & 1][tid] = v;
      s_rcp[s & 1][tid] = ok ? __frcp_rn(v) : __int_as_float(0x7fffffff);
    }
  };
  static_assert(C::KC <= NTHREADS, "one smooth channel per thread");
  smooth_stage(0);

  if constexpr (LN) {
    // Row statistics while the first stages land: mean, then the centred sum of squares (second pass from
    // L1), as torch does in fp32; rstd = rsqrt(var + eps) with the same approximate rsqrt instruction.
    constexpr int RCH = 12;  // 16-byte chunks per lane held in registers: rows up to 3072 in one load
    for (int row = warp; row < C::BM; row += NWARPS) {
      const int m = m0 + row;
      float mean = 0.f, rstd = 0.f;
      if (m < p.M) {
        const T *xr = x + (int64_t)m * p.ldx;
        uint4 buf[RCH];
        float s = 0.f;
        for (int k0 = 0; k0 < K; k0 += RCH * 256) {
#pragma unroll
          for (int i = 0; i < RCH; ++i) {
            const int k = k0 + i * 256 + lane * 8;
            buf[i] = k < K ? __ldg(reinterpret_cast<const uint4 *>(xr + k)) : make_uint4(0, 0, 0, 0);
          }
#pragma unroll
          for (int i = 0; i < RCH; ++i) {
            const uint32_t w[4] = {buf[i].x, buf[i].y, buf[i].z, buf[i].w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const float2 f = unpack2<T>(w[j]);
              s += f.x + f.y;
            }
          }
        }
#pragma unroll
        for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        mean = s / (float)K;
        float q = 0.f;
        for (int k0 = 0; k0 < K; k0 += RCH * 256) {
          if (K > RCH * 256) {  // long rows: reload (L1/L2 hits)
#pragma unroll
            for (int i = 0; i < RCH; ++i) {
              const int k = k0 + i * 256 + lane * 8;
              buf[i] = k < K ? __ldg(reinterpret_cast<const uint4 *>(xr + k)) : make_uint4(0, 0, 0, 0);
            }
          }
#pragma unroll
          for (int i = 0; i < RCH; ++i) {
            if (k0 + i * 256 + lane * 8 < K) {
              const uint32_t w[4] = {buf[i].x, buf[i].y, buf[i].z, buf[i].w};
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                const float2 f = unpack2<T>(w[j]);
                const float a = f.x - mean, b = f.y - mean;
                q = fmaf(a, a, q);
                q = fmaf(b, b, q);
              }
            }
          }
        }
#pragma unroll
        for (int o = 16; o; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
        rstd = rsqrtf(q / (float)K + p.eps);
      }
      if (lane == 0) {
        row_mean[row] = mean;
        row_rstd[row] = rstd;
        row_batch[row] = m < p.M ? (int)(m / p.tokens_per_batch) : 0;
      }
    }
  }

  float acc[C::MAXR / 8][4];
#pragma unroll
  for (int b = 0; b < C::MAXR / 8; ++b)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[b][c] = 0.f;

  const bool uns = p.act_unsigned;
  const float qmax = uns ? 15.f : 7.f, flo = MAGIC + (uns ? 0.f : -8.f), fhi = MAGIC + (uns ? 15.f : 7.f);
  const float rqmax = uns ? 1.f / 15.f : 1.f / 7.f;  // RN(1/qmax), folded by the compiler
  const float shift = p.shift;
  const int tok = lane & 7, ch = lane >> 3;  // quantizer: token within the 8-token pass, chunk pair (ch, ch+4)
  const int mt = warp % C::MTILES, ks = warp / C::MTILES;

  for (int it = 0; it < nstages; ++it) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();
    if (it + C::STAGES - 1 < nstages) load_stage(it + C::STAGES - 1);
    cp_async_commit();
    if (it + 1 < nstages) smooth_stage(it + 1);  // read at it + 1, after that iteration's barrier

    uint8_t *xs = smem + (it % C::STAGES) * STAGE_BYTES;
    const uint8_t *ls = xs + C::X_BYTES;
    const int g0 = it * C::GS;
    const int ngs = min(C::GS, G - g0);

    if constexpr (LN) {
      // a = (1 + mscale[b]) * T(LN(x)) + mshift[b], every op rounded to T like the torch path
      constexpr int CPR = C::KC / 8;
      const T *msh = static_cast<const T *>(p.mshift), *msc = static_cast<const T *>(p.mscale);
      for (int i = tid; i < C::BM * CPR; i += NTHREADS) {
        const int row = i / CPR, c = i % CPR, m = m0 + row;
        if (c >= ngs * 8 || m >= p.M) continue;
        const int k = g0 * 64 + c * 8;
        const int64_t b = row_batch[row];
        uint4 *ptr = reinterpret_cast<uint4 *>(xs + swz(row, c, C::ROW_BYTES));
        const uint4 raw = *ptr;
        const uint4 rsc = __ldg(reinterpret_cast<const uint4 *>(msc + b * K + k));
        const uint4 rsh = __ldg(reinterpret_cast<const uint4 *>(msh + b * K + k));
        const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w}, wsc[4] = {rsc.x, rsc.y, rsc.z, rsc.w},
                       wsh[4] = {rsh.x, rsh.y, rsh.z, rsh.w};
        const float mean = row_mean[row], rstd = row_rstd[row];
        uint32_t o[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 v = unpack2<T>(w[j]), sc = unpack2<T>(wsc[j]), sh = unpack2<T>(wsh[j]);
          const float2 n = unpack2<T>(pack2<T>((v.x - mean) * rstd, (v.y - mean) * rstd));
          const float2 s1 = unpack2<T>(pack2<T>(1.f + sc.x, 1.f + sc.y));
          const float2 pr = unpack2<T>(pack2<T>(s1.x * n.x, s1.y * n.y));
          o[j] = pack2<T>(pr.x + sh.x, pr.y + sh.y);
        }
        const uint4 out = make_uint4(o[0], o[1], o[2], o[3]);
        *ptr = out;
        if (p.y_out) *reinterpret_cast<uint4 *>(static_cast<T *>(p.y_out) + (int64_t)m * K + k) = out;
      }
      __syncthreads();
    }

    // ---- quantization: units of (8 tokens, one group)
    const float *sm_s = s_smooth[it & 1], *sm_r = s_rcp[it & 1];
    for (int u = warp; u < (C::BM / 8) * ngs; u += NWARPS) {
      const int gg = u % ngs, row = (u / ngs) * 8 + tok, m = m0 + row, g = g0 + gg;
      const uint4 r0 = *reinterpret_cast<const uint4 *>(xs + swz(row, gg * 8 + ch, C::ROW_BYTES));
      const uint4 r1 = *reinterpret_cast<const uint4 *>(xs + swz(row, gg * 8 + ch + 4, C::ROW_BYTES));
      const uint32_t w[8] = {r0.x, r0.y, r0.z, r0.w, r1.x, r1.y, r1.z, r1.w};
      const int kc0 = gg * 64 + ch * 8;  // channel of element 0 within the stage; elements 8.. are +32
      float f[16], scale;
      // exact = false: divisions by precomputed reciprocals + exactness checks; exact = true: IEEE divisions
      // everywhere (the reference's own sequence), taken by the whole warp when any check failed.
      auto quantize = [&](bool exact) -> bool {
        bool ok = true;
        float v[16];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float2 t = unpack2<T>(w[j]);
          v[2 * j] = t.x;
          v[2 * j + 1] = t.y;
        }
        if (shift != 0.f) {
#pragma unroll
          for (int j = 0; j < 16; ++j) v[j] = __fadd_rn(v[j], shift);
        }
        if (p.smooth) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float4 a0 = *reinterpret_cast<const float4 *>(sm_s + kc0 + 32 * h);
            const float4 a1 = *reinterpret_cast<const float4 *>(sm_s + kc0 + 32 * h + 4);
            const float sv[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            if (exact) {
#pragma unroll
              for (int j = 0; j < 8; ++j) v[8 * h + j] = __fdiv_rn(v[8 * h + j], sv[j]);
            } else {
              const float4 b0 = *reinterpret_cast<const float4 *>(sm_r + kc0 + 32 * h);
              const float4 b1 = *reinterpret_cast<const float4 *>(sm_r + kc0 + 32 * h + 4);
              const float yv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
              for (int j = 0; j < 8; ++j) {
                ok &= div_operand_ok(v[8 * h + j]);
                v[8 * h + j] = div_rn_by(v[8 * h + j], sv[j], yv[j]);  // NaN reciprocal -> NaN -> check fails
              }
            }
          }
        }
        if (m >= p.M) {  // tail rows: zero codes and scale (the fp8 layout stores them)
#pragma unroll
          for (int j = 0; j < 16; ++j) v[j] = 0.f;
        }
        float amax = 0.f;
#pragma unroll
        for (int j = 0; j < 16; ++j) amax = fmaxf(amax, fabsf(v[j]));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 8));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 16));
        if (exact) {
          scale = __fdiv_rn(amax, qmax);
#pragma unroll
          for (int j = 0; j < 16; ++j)
            f[j] = fminf(fmaxf(scale > 0.f ? rintf(__fdiv_rn(v[j], scale)) + MAGIC : MAGIC, flo), fhi);
          return true;
        }
        ok &= div_operand_ok(amax);
        scale = div_rn_by(amax, qmax, rqmax);
        // a normal scale bounds |xs / scale| by qmax (1 + 2^-23), so only unsigned codes need a clamp (at 0)
        ok &= scale == 0.f || scale >= 0x1p-120f;
        const float rc = scale > 0.f ? __frcp_rn(scale) : 0.f;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          const float t = v[j] * rc;
          f[j] = t + MAGIC;
          ok &= fabsf(t - (f[j] - MAGIC)) < BOUNDARY;  // NaN fails too
          f[j] = fmaxf(f[j], flo);
        }
        return ok;
      };
      const bool ok = quantize(p.exact_div != 0);
      if (__any_sync(0xffffffffu, !ok)) quantize(true);  // rare; warp-uniform (amax is shared by 4 lanes)

      if (p.layout == NL_ACT_PACKED) {
        if (m < p.M) {
          uint32_t b0[8], b1[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            b0[j] = __float_as_uint(f[j]);
            b1[j] = __float_as_uint(f[8 + j]);
          }
          uint8_t *cp = p.codes + (int64_t)m * (K / 2) + g * 32 + ch * 4;
          *reinterpret_cast<uint32_t *>(cp) = pack_nibbles(b0);
          *reinterpret_cast<uint32_t *>(cp + 16) = pack_nibbles(b1);
        }
        if (ch == 0) p.scales[(int64_t)g * p.ldm + m] = scale;
      } else {
        uint32_t e[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) e[j] = e4m3x2(f[2 * j] - MAGIC, f[2 * j + 1] - MAGIC);
        // elements 0..7 are k = 8ch..8ch+7 (16-byte column ch/2, half ch%2); 8..15 are k + 32
        uint8_t *cp = p.codes + (int64_t)g * p.ldm * 64 + (int64_t)(m >> 3) * 512 + (ch >> 1) * 128 +
                      (m & 7) * 16 + (ch & 1) * 8;
        *reinterpret_cast<uint2 *>(cp) = make_uint2(__byte_perm(e[0], e[1], 0x5410), __byte_perm(e[2], e[3], 0x5410));
        *reinterpret_cast<uint2 *>(cp + 256) =
            make_uint2(__byte_perm(e[4], e[5], 0x5410), __byte_perm(e[6], e[7], 0x5410));
        if (ch == 0) {
          const int i = m & 15;  // 8b + 2q + e -> 4q + 2b + e
          const int pos = ((i >> 1) & 3) * 4 + (i >> 3) * 2 + (i & 1);
          p.scales[(int64_t)g * p.ldm + (m & ~15) + pos] = scale;
        }
      }
    }

    // ---- low-rank down: acc[16 x rank] += a_tile[mt] @ lora_tile^T over this warp's k-steps
    if (rank > 0) {
      for (int kk = ks; kk < ngs * 4; kk += C::KSPLIT) {
        uint32_t a[4];
        {
          const int row = mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          ldmatrix_x4(a, xs + swz(row, kk * 2 + (lane >> 4), C::ROW_BYTES));
        }
#pragma unroll
        for (int np = 0; np < C::MAXR / 16; ++np) {
          if (np * 16 < rank) {
            uint32_t b[4];
            const int row = np * 16 + (lane & 7) + (lane >> 4) * 8;
            ldmatrix_x4(b, ls + swz(row, kk * 2 + ((lane >> 3) & 1), C::ROW_BYTES));
            mma_16816<T>(acc[2 * np], a, b[0], b[1]);
            mma_16816<T>(acc[2 * np + 1], a, b[2], b[3]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  if (rank == 0) return;

  // ---- reduce the k-split partial sums in a fixed order and write lora_act
  __syncthreads();
  const int RS = rank + 4;  // padded row (floats): spreads the fragment writes over banks
  float *red = reinterpret_cast<float *>(smem);
#pragma unroll
  for (int nt = 0; nt < C::MAXR / 8; ++nt)
    if (nt * 8 < rank)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = (lane >> 2) + (i >= 2 ? 8 : 0), col = nt * 8 + (lane & 3) * 2 + (i & 1);
        red[(warp * 16 + r) * RS + col] = acc[nt][i];
      }
  __syncthreads();
  for (int idx = tid; idx < C::BM * rank; idx += NTHREADS) {
    const int row = idx / rank, col = idx % rank, m = m0 + row;
    const int t = row / 16, r = row % 16;
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < C::KSPLIT; ++k) s += red[((k * C::MTILES + t) * 16 + r) * RS + col];
    if (m < p.M) p.lora_act[(int64_t)m * rank + col] = s;
  }
}

template <typename T, int BM, int MAXR, bool LN>
int launch(const Args &p, cudaStream_t stream, const char *kname) {
  using C = Cfg<BM, MAXR>;
  auto kern = quantize_kernel<T, C, LN>;
  const int stage = C::X_BYTES + p.rank * C::ROW_BYTES;
  const int red = NWARPS * 16 * (p.rank + 4) * 4;
  const int smem = max(C::STAGES * stage, red);
  // The attribute is set once per (kernel, device) for the largest size: keeps launches legal inside
  // CUDA-graph capture.
  static bool attr_set[64] = {};
  int dev = 0;
  NL_CHECK_CUDA(cudaGetDevice(&dev), kname);
  if (dev >= 64 || !attr_set[dev]) {
    const int most = max(C::STAGES * (C::X_BYTES + C::MAXR * C::ROW_BYTES), NWARPS * 16 * (C::MAXR + 4) * 4);
    NL_CHECK_CUDA(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, most), kname);
    if (dev < 64) attr_set[dev] = true;
  }
  const int blocks = (int)((p.ldm + BM - 1) / BM);
  kern<<<blocks, NTHREADS, smem, stream>>>(p);
  NL_CHECK_LAUNCH(kname);
  return NL_OK;
}

// Tokens per CTA: 32 by default (M = 4608 gives 144 CTAs, all resident); NUNCHAKU_LITE_QUANT_BM=16|64
// selects the other tilings for rank <= 32 (benchmarks).
int tile_rows(int rank) {
  if (rank > 32) return 32;
  const char *env = getenv("NUNCHAKU_LITE_QUANT_BM");
  if (env && (env[0] == '1' && env[1] == '6')) return 16;
  if (env && (env[0] == '6' && env[1] == '4')) return 64;
  return 32;
}

template <typename T, bool LN>
int dispatch(const Args &p, cudaStream_t s, const char *kname) {
  if (p.rank <= 32) {
    switch (tile_rows(p.rank)) {
      case 16: return launch<T, 16, 32, LN>(p, s, kname);
      case 64: return launch<T, 64, 32, LN>(p, s, kname);
      default: return launch<T, 32, 32, LN>(p, s, kname);
    }
  }
  if (p.rank <= 64) return launch<T, 32, 64, LN>(p, s, kname);
  return launch<T, 32, 128, LN>(p, s, kname);
}

int check_common(const char *k, const void *x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const float *smooth,
                 const void *lora_down, int rank, int layout, const uint8_t *codes, const float *scales, int64_t ldm,
                 const float *lora_act) {
  NL_CHECK_ARG(x_dtype == NL_BF16 || x_dtype == NL_F16, "%s: x dtype code %d is not bf16/fp16", k, x_dtype);
  NL_CHECK_ARG(M >= 1 && M < (1LL << 31) - 256, "%s: M=%lld out of range", k, (long long)M);
  NL_CHECK_ARG(K >= 64 && K % 64 == 0 && K < (1LL << 24), "%s: K=%lld must be a positive multiple of 64", k,
               (long long)K);
  NL_CHECK_ARG(ldx >= K && ldx % 8 == 0, "%s: x row stride %lld must be >= K and a multiple of 8", k,
               (long long)ldx);
  NL_CHECK_ARG(layout == NL_ACT_PACKED || layout == NL_ACT_FP8_TILES, "%s: layout=%d is not NL_ACT_PACKED (0) or "
               "NL_ACT_FP8_TILES (1)", k, layout);
  if (layout == NL_ACT_PACKED)
    NL_CHECK_ARG(ldm >= M && ldm % 128 == 0, "%s: scales stride ldm=%lld must be >= M and a multiple of 128", k,
                 (long long)ldm);
  else
    NL_CHECK_ARG(ldm >= M && ldm % 256 == 0, "%s: padded rows ldm=%lld must be >= M and a multiple of 256 for "
                 "the fp8 tile layout", k, (long long)ldm);
  NL_CHECK_ARG(rank >= 0 && rank <= 128 && rank % 16 == 0, "%s: rank=%d must be a multiple of 16 in [0, 128]", k,
               rank);
  NL_CHECK_ARG(x && nl_aligned(x, 16), "%s: x must be a non-null 16-byte aligned pointer", k);
  NL_CHECK_ARG(codes && nl_aligned(codes, 16), "%s: codes must be a non-null 16-byte aligned pointer", k);
  NL_CHECK_ARG(scales && nl_aligned(scales, 16), "%s: scales must be a non-null 16-byte aligned pointer", k);
  NL_CHECK_ARG(!smooth || nl_aligned(smooth, 16), "%s: smooth must be 16-byte aligned", k);
  NL_CHECK_ARG(rank == 0 || (lora_down && nl_aligned(lora_down, 16)),
               "%s: lora_down must be a non-null 16-byte aligned pointer when rank > 0", k);
  NL_CHECK_ARG(rank == 0 || lora_act, "%s: lora_act must be non-null when rank > 0", k);
  return NL_OK;
}

int exact_div_requested() {
  const char *env = getenv("NUNCHAKU_LITE_QUANT_EXACT_DIV");
  return env && env[0] == '1';
}

}  // namespace

extern "C" int nl_quantize_act(const void *x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const float *smooth,
                               float shift, int act_unsigned, const void *lora_down, int rank, int layout,
                               uint8_t *codes, float *scales, int64_t ldm, float *lora_act, void *stream) {
  const char *k = "nl_quantize_act";
  if (int rc = check_common(k, x, x_dtype, M, K, ldx, smooth, lora_down, rank, layout, codes, scales, ldm, lora_act))
    return rc;
  Args p{x, (int)M, (int)K, ldx, smooth, shift, act_unsigned, lora_down, rank, layout, codes, scales, ldm,
         lora_act, nullptr, nullptr, 1, 0.f, nullptr, exact_div_requested()};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return x_dtype == NL_BF16 ? dispatch<__nv_bfloat16, false>(p, s, k) : dispatch<__half, false>(p, s, k);
}

extern "C" int nl_layernorm_quantize_act(const void *x, int x_dtype, int64_t M, int64_t K, int64_t ldx,
                                         const void *mod_shift, const void *mod_scale, int64_t tokens_per_batch,
                                         float eps, const float *smooth, float shift, int act_unsigned,
                                         const void *lora_down, int rank, int layout, uint8_t *codes,
                                         float *scales, int64_t ldm, float *lora_act, void *y_out, void *stream) {
  const char *k = "nl_layernorm_quantize_act";
  if (int rc = check_common(k, x, x_dtype, M, K, ldx, smooth, lora_down, rank, layout, codes, scales, ldm, lora_act))
    return rc;
  NL_CHECK_ARG(tokens_per_batch >= 1, "%s: tokens_per_batch=%lld must be >= 1", k, (long long)tokens_per_batch);
  NL_CHECK_ARG(mod_shift && nl_aligned(mod_shift, 16), "%s: mod_shift must be a non-null 16-byte aligned pointer",
               k);
  NL_CHECK_ARG(mod_scale && nl_aligned(mod_scale, 16), "%s: mod_scale must be a non-null 16-byte aligned pointer",
               k);
  NL_CHECK_ARG(!y_out || nl_aligned(y_out, 16), "%s: y_out must be 16-byte aligned", k);
  NL_CHECK_ARG(eps >= 0.f, "%s: eps=%g must be >= 0", k, (double)eps);
  Args p{x, (int)M, (int)K, ldx, smooth, shift, act_unsigned, lora_down, rank, layout, codes, scales, ldm,
         lora_act, mod_shift, mod_scale, tokens_per_batch, eps, y_out, exact_div_requested()};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return x_dtype == NL_BF16 ? dispatch<__nv_bfloat16, true>(p, s, k) : dispatch<__half, true>(p, s, k);
}
