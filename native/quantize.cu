// Activation quantization + low-rank down projection, optionally preceded by LayerNorm + modulation.
// References: quant/ops.py quantize_act (codes, scales), pack_act_fp8_tiles (the sm_90 layout),
// layernorm_modulate (the fused prologue) and x @ lora_down^T (the low-rank half of the SVDQuant branch).
//
// Math, per token m and 64-wide group g (fp32, every op correctly rounded; bit-identical codes and scales):
//   a     = x                                         (nl_quantize_act)
//   a     = (1 + mscale[b]) * LN(x) + mshift[b]       (nl_layernorm_quantize_act, b = m / tokens_per_batch;
//            LN without affine over K, its mean and rstd per row from stats_kernel; LN(x), 1 + mscale, the
//            product and the sum each rounded to x's dtype, exactly the ops of the unfused torch path)
//   xs    = (a + shift) * inv_smooth                  (shift 0 for signed layers; inv_smooth = RN(1/smooth),
//                                                      given by the caller; omitted when NULL)
//   scale = max|xs| / 7,  codes = clamp(rint(xs * RN(1/scale)), -8, 7)  signed
//   scale = max|xs| / 15, codes = clamp(rint(xs * RN(1/scale)),  0, 15)  unsigned;   scale < 2^-126 -> codes 0
//   (each op rounded to fp32 on its own: __fadd_rn, __fmul_rn, __fdiv_rn, __frcp_rn; no contraction to fma)
//   lora_act[m, :] = a[m, :] @ lora_down^T            (16-bit operands on tensor cores, fp32 accumulation)
// Power-of-two format (ops.quantize_act(pow2=True), when a token_scale array is given):
//   s[m]  = max_k |xs[m, k]| / qmax  (= the largest plain group scale: IEEE division is monotone), computed
//           before by stats_kernel (nl_act_stats: one read of x, one warp per token or up to NWARPS for small
//           M; with LayerNorm from the same row statistics it hands to the quantize kernel, so both see the
//           same a)
//   e     = the largest e in 0..4 with s * 2^-e >= scale (the plain group scale above);  gs = s * 2^-e (exact)
//   codes = clamp(rint(xs * RN(1/gs)), ...) as above, with gs in the place of scale
// so the codes are written in one pass (the earlier second pass over x, after the plain scales, is gone).
// Per element that is one multiplication for the smoothing and a multiplication and an addition of 1.5 * 2^23
// (round to an integer, ties to even) for the code; divisions happen once per group. (Until 2026-12 the
// reference divided by smooth and by the scale, and the kernel reproduced the IEEE quotients with Newton
// corrections and bracketed roundings, plus a per-warp fallback: about twice the instructions per element.)
//
// Layouts written (`layout`):
//   NL_ACT_PACKED     codes uint8 [M, K/2] (low nibble = even k), scales float [K/64, ldm] (rows >= M: 0)
//   NL_ACT_FP8_TILES  codes uint8 [K/64, ldm, 64]: byte (g, m, k) at g*ldm*64 + ((m/8)*4 + k/16)*128
//                     + (m%8)*16 + k%16 = e4m3 encoding of the code; scales float [K/64, ldm] with the
//                     16-token permutation 8b+2q+e -> 4q+2b+e; rows >= M are 0 (ldm = Mp, multiple of 256)
//   NL_ACT_S8_TILES   (power-of-two format only; operand of the integer GEMM, ops.pack_act_s8_tiles) bytes
//                     uint8 [K/64, ldm, 64] in the NL_ACT_FP8_TILES order, each code << (4 - e) (int8 signed,
//                     uint8 unsigned), scales float [ldm] = s / 16 in the same 16-token permutation
//   lora_act float [M, rank] in all.
//   The power-of-two format writes gs as the group scale of the other two layouts.
//
// Tiling: a token tile is BM tokens (16 by default; 32 for rank > 32); a CTA of NWARPS = 8 warps streams K
// in stages of KC columns (256, or 128 for rank > 32) through a STAGES = 3 deep cp.async ring shared by all
// warps (units = (tile, stage) pairs in tile-major order; the ring runs across tile ends):
// x tile [BM x KC] and lora_down tile [rank x KC], 16-byte chunks XOR-swizzled within each 128-byte run so
// that ldmatrix and the quantizer's reads are conflict-free. lora_down is read once per CTA (from L2) for
// BM tokens. Each thread's copy slots (shared offsets) are fixed. Quantization: a unit is 8 tokens x one group,
// 4 lanes per token (lane = c*8 + token, 16 elements each: chunks c and c+4), amax by a tree and 2 shuffles;
// the units of a stage split evenly over the warps (UPW per warp, computed before any store for ILP).
// Low-rank: warp w owns m-tile w % (BM/16) and every (NWARPS/(BM/16))-th k-step of the stage
// (mma.m16n8k16, fp32 accumulators); the k-split partial sums are reduced through shared memory in a fixed
// order at each tile end (deterministic).
// Work split (BM 16, rank <= 32, the default): a persistent grid of n = min(tiles, resident CTAs) CTAs, CTA c
// taking units [c W / n, (c + 1) W / n) of the W = tiles x stages. Each run is at least one tile long, so a
// tile is shared by at most two CTAs; their low-rank partial sums are atomically added onto a lora_act that
// the launch zeroed (two addends onto 0: the same float sum in either order, still deterministic). Without
// it, M = 4608 (288 tiles) on 132 SMs x 2 CTAs left a second wave of 24 CTAs as long as the first. Small M
// (2 x tiles resident at once, e.g. M <= 2112 on 132 SMs): n = 2 x tiles, so each run is exactly half a tile
// (still two addends), instead of a few dozen CTAs each sweeping a whole K (M = 512: 32 of 132 SMs).
// LayerNorm: at each tile start the CTA reads its rows' mean and rstd (stats_kernel's); each landed stage is
// normalized and modulated in place. (Computing the statistics here, at each tile start while later stages
// were in flight, cost 66-68 us at M=4608, K=3072 fp8_tiles, and 283-366 us at K=12288-15360, where the rows
// no longer fit in registers; the separate pass was cheaper in the power-of-two format, which needs it anyway.)
// Measured with the reciprocals (H100 SXM, rank 32, h100-2026-12-07g/p3_quant_final.log): M=4608 K=3072 28.0 us
// packed (54% of copy), 29.5 us fp8_tiles (61%), s8_tiles 42.4 us (10.9 of it the token scales), LayerNorm-fused
// 47.7 us packed; K=15360 110.5 / 112.9 us packed / fp8_tiles (67% / 79%). The default instance went from 124 to
// 80 registers. Before, with the division semantics (Newton-corrected divisions per element; H100 SXM,
// `python -m nunchaku_lite.bench kernels --quantize`, rank 32, copy ~2.4 TB/s; h100-2026-12-07c/quant_final.log):
//   M=4608 K=3072: 32.7 us packed (46% of copy), 34.5 us fp8_tiles (52%), LayerNorm-fused 59.5 us (with the
//   statistics kernel, 8.6 us); power-of-two s8_tiles 50.6 us (14.1 of it the token scales; the two-pass
//   version it replaced: 65.6), LayerNorm-fused 77.0 (113.0);
//   M=4608 K=12288 / 15360: 109 / 133 us packed, 115 / 142 us fp8_tiles (62-63%; 104 / 128 before the power-of-
//   two mode's runtime branches were added; POW2 below removed them: on an H200, K = 15360, 127.6 packed and
//   130.4 fp8_tiles against 134.5 / 141.4 with the branches, h200-2026-12-07e), s8_tiles 181 / 221 us
//   (223 / 287 two-pass);
//   M=1536 K=3072 (two CTAs per tile): 17.3 us fp8_tiles (20.1 with one), s8_tiles 23.5 (34.3 two-pass).
//   The single-wave grid before the split: 49 / 50 / 73 us, 180 / 220 us, 25 us.
// ncu (M=4608, K=3072, packed): one wave of 264 CTAs at 124 registers (2 per SM), 0.61 warp instructions
// issued per scheduler and cycle, ~36 warp instructions per 32 elements.
// Tried and slower: lora_down B fragments read by each warp from L2 (no shared lora tile) with 512-column
// stages and 2 units per warp (39 us at M=4608, K=3072: fewer instructions, but the exposed L2 latency
// dropped the issue rate to 0.51; 4 stages instead of 3 did not recover it).
#include "common.cuh"

#include <climits>
#include <cstdlib>
#include <type_traits>

namespace {

constexpr int NWARPS = 8;
constexpr int POW2_MAX_EXP = 4;  // quant/ops.py POW2_MAX_EXP: code << (4 - e) fits 8 bits
constexpr int NTHREADS = NWARPS * 32;
constexpr float MAGIC = 12582912.0f;  // 1.5 * 2^23: t + MAGIC rounds t to an integer (ties to even)

template <int BM_, int MAXR_>
struct Cfg {
  static constexpr int BM = BM_;
  static constexpr int MAXR = MAXR_;
  static constexpr int MTILES = BM / 16;            // 16-token mma tiles
  static constexpr int KSPLIT = NWARPS / MTILES;    // warps sharing one m-tile (split over k-steps)
  static constexpr int KC = MAXR > 32 ? 128 : 256;  // columns per stage (the lora_down tile grows with rank)
  static constexpr int GS = KC / 64;                // groups per stage
  static constexpr int KSTEPS = KC / 16;            // mma k-steps per stage
  static constexpr int UPW = (BM / 8) * GS / NWARPS;  // quantizer units (8 tokens x 1 group) per warp
  static constexpr int ROW_BYTES = KC * 2;
  static constexpr int X_BYTES = BM * ROW_BYTES;
  static constexpr int STAGES = 3;
  static constexpr int MIN_BLOCKS = MAXR > 64 ? 1 : 2;  // 2 x 8 warps per SM without register spills
  // SPLIT: a persistent grid of CTAs shares the (token tile, stage) units evenly, a tile's low-rank sums
  // then come from at most two CTAs (atomic adds onto a zeroed lora_act: two addends, still deterministic)
  // and a CTA reduces its k-split partial sums at every tile end (a dedicated shared buffer).
  static constexpr bool SPLIT = BM == 16 && MAXR == 32;
  static constexpr int RED_BYTES = NWARPS * 16 * (MAXR + 4) * 4;
  static_assert(UPW >= 1 && (BM / 8) * GS == UPW * NWARPS, "quantizer units must split evenly over warps");
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

// Mean and rstd of one row xr [K] (a whole warp; every lane gets both): the mean, then the centred sum of
// squares (its second read of the row comes from L1/L2 beyond RCH * 256 elements), in fp32 as torch does;
// rstd = rsqrt(var + eps), the approximate rsqrt. RCH = 6 keeps stats_kernel at 46 registers: 40 warps per
// SM, one wave for M = 4608 rows on 132 SMs (RCH = 12, the whole 3072-wide row in registers, needs 64: two
// waves). Each lane sums its elements in the same order for any RCH.
template <typename T>
__device__ __forceinline__ float2 warp_row_stats(const T *__restrict__ xr, int K, float eps, int lane) {
  constexpr int RCH = 6;
  uint4 buf[RCH];
  auto load = [&](int k0) {  // the lane's chunks k0 + 256 i + 8 lane, zeros past K
#pragma unroll
    for (int i = 0; i < RCH; ++i) {
      const int k = k0 + i * 256 + lane * 8;
      buf[i] = k < K ? __ldg(reinterpret_cast<const uint4 *>(xr + k)) : make_uint4(0, 0, 0, 0);
    }
  };
  float s = 0.f;
  for (int k0 = 0; k0 < K; k0 += RCH * 256) {
    load(k0);
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
  const float mean = s / (float)K;
  float q = 0.f;
  for (int k0 = 0; k0 < K; k0 += RCH * 256) {
    if (K > RCH * 256) load(k0);  // long rows: reload (L1/L2 hits)
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
  return make_float2(mean, rsqrtf(q / (float)K + eps));
}

// y = (1 + sc) * T(LN(x)) + sh for 8 elements (uint4 of T each), every op rounded to T like the torch path.
template <typename T>
__device__ __forceinline__ uint4 ln_modulate8(uint4 raw, uint4 rsc, uint4 rsh, float mean, float rstd) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w}, wsc[4] = {rsc.x, rsc.y, rsc.z, rsc.w},
                 wsh[4] = {rsh.x, rsh.y, rsh.z, rsh.w};
  uint32_t o[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = unpack2<T>(w[i]), sc = unpack2<T>(wsc[i]), sh = unpack2<T>(wsh[i]);
    const float2 n = unpack2<T>(pack2<T>((v.x - mean) * rstd, (v.y - mean) * rstd));
    const float2 s1 = unpack2<T>(pack2<T>(1.f + sc.x, 1.f + sc.y));
    const float2 pr = unpack2<T>(pack2<T>(s1.x * n.x, s1.y * n.y));
    o[i] = pack2<T>(pr.x + sh.x, pr.y + sh.y);
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

struct Args {
  const void *x;
  int M, K;
  int64_t ldx;
  const float *inv_smooth;  // RN(1/smooth) [K] or NULL
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
  // power-of-two format: s[m] of nl_act_stats (NULL: plain group scales)
  const float *tok_scale;
  // LN kernels: (mean, rstd) per row from nl_act_stats
  const float2 *row_stats;
  int nctas;      // CTAs sharing the real tiles (the launch sets it; more CTAs write the padding tiles)
};

// Zero rows [m0, m0 + BM) of the scales (and fp8 codes) of a tile that lies entirely in the padding.
template <typename C>
__device__ void write_padding_tile(const Args &p, int m0) {
  const int G = p.K / 64;
  if (p.layout == NL_ACT_S8_TILES) {  // one token scale per row
    for (int i = threadIdx.x; i < C::BM; i += NTHREADS) p.scales[m0 + i] = 0.f;
  } else {
    for (int i = threadIdx.x; i < G * C::BM; i += NTHREADS)
      p.scales[(int64_t)(i / C::BM) * p.ldm + m0 + i % C::BM] = 0.f;
  }
  if (p.layout != NL_ACT_PACKED) {
    // rows m0..m0+BM of every group slab are one contiguous run of BM*64 bytes (m0 is a multiple of 8)
    for (int i = threadIdx.x; i < G * C::BM * 4; i += NTHREADS) {
      const int g = i / (C::BM * 4), j = i % (C::BM * 4);
      reinterpret_cast<uint4 *>(p.codes + (int64_t)g * p.ldm * 64 + (int64_t)m0 * 64)[j] = make_uint4(0, 0, 0, 0);
    }
  }
}

// POW2: the power-of-two format (token scales given), a compile-time switch: as a runtime branch it cost the
// plain kernel ~10% at K = 12288 (h100-2026-12-07c/quant_final.log).
template <typename T, typename C, bool LN, bool POW2>
__global__ void __launch_bounds__(NTHREADS, C::MIN_BLOCKS) quantize_kernel(const Args p) {
  pdl_trigger();  // launched by nl_launch: see common.cuh
  pdl_wait();
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ float row_mean[C::BM], row_rstd[C::BM];
  __shared__ int row_batch[C::BM];
  // inv_smooth of the stage's channels, double-buffered
  __shared__ __align__(16) float s_inv[2][C::KC];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tid = threadIdx.x;
  const int K = p.K, G = K / 64, rank = p.rank;
  const int nst = (G + C::GS - 1) / C::GS;  // stages per token tile
  const int ntiles = (p.M + C::BM - 1) / C::BM;
  if ((int)blockIdx.x >= p.nctas) {
    write_padding_tile<C>(p, (ntiles + (int)blockIdx.x - p.nctas) * C::BM);
    return;
  }
  // this CTA's units [u0, u0 + nu) of the tile-major (tile, stage) sequence; nctas <= ntiles keeps every run
  // at least one tile long, nctas == 2 ntiles makes each exactly half a tile: a tile is shared by at most two
  const int64_t W = (int64_t)ntiles * nst;
  const int64_t u0 = W * blockIdx.x / p.nctas;
  const int nu = (int)(W * (blockIdx.x + 1) / p.nctas - u0);
  const int tile0 = (int)(u0 / nst), st0 = (int)(u0 - (int64_t)tile0 * nst);
  const int STAGE_BYTES = C::X_BYTES + rank * C::ROW_BYTES;
  float *red = reinterpret_cast<float *>(smem + (C::SPLIT ? C::STAGES * STAGE_BYTES : 0));
  const T *x = static_cast<const T *>(p.x);
  const T *ld = static_cast<const T *>(p.lora_down);
  constexpr int CPR = C::KC / 8;  // 16-byte chunks per tile row

  // ---- per-thread copy slots, fixed for the whole K loop (stage s adds s * KC elements)
  constexpr int XSLOTS = C::BM * CPR / NTHREADS, LSLOTS = C::MAXR * CPR / NTHREADS;
  static_assert(XSLOTS >= 1 && LSLOTS >= 1, "tile too small for the copy slots");
  int xoff[XSLOTS];
  const int slot_c = tid % CPR;  // every slot of a thread has the same chunk column (NTHREADS % CPR == 0)
#pragma unroll
  for (int j = 0; j < XSLOTS; ++j) xoff[j] = swz((tid + j * NTHREADS) / CPR, slot_c, C::ROW_BYTES);
  const T *lsrc = ld + (int64_t)(tid / CPR) * K + slot_c * 8;  // slot j: + j * (NTHREADS / CPR) rows
  // loads are issued in unit order: (ltile, lst) is the next unit to load
  int ltile = tile0, lst = st0;
  auto load_stage = [&](int i) {
    uint8_t *xs = smem + (i % C::STAGES) * STAGE_BYTES, *ls = xs + C::X_BYTES;
    const int k0 = lst * C::KC;
    if (slot_c < min(C::GS, G - lst * C::GS) * 8) {  // columns past K in a partial last stage stay unread
#pragma unroll
      for (int j = 0; j < XSLOTS; ++j) {
        const int m = ltile * C::BM + (tid + j * NTHREADS) / CPR;
        cp_async16(xs + xoff[j], x + (int64_t)(m < p.M ? m : 0) * p.ldx + k0 + slot_c * 8, m < p.M ? 16 : 0);
      }
#pragma unroll
      for (int j = 0; j < LSLOTS; ++j) {
        const int row = (tid + j * NTHREADS) / CPR;
        if (row < rank)
          cp_async16(ls + swz(row, slot_c, C::ROW_BYTES), lsrc + (int64_t)j * (NTHREADS / CPR) * K + k0);
      }
    }
    if (++lst == nst) {
      lst = 0;
      ++ltile;
    }
  };
  // inv_smooth of iteration i's stage, one channel per thread (KC <= NTHREADS), loaded one iteration ahead
  // of its use so the global load's latency is not waited for inside the stage loop
  int sst = st0;  // stage (within its tile) of the next smooth_load, which is called in unit order
  auto smooth_load = [&](int i) -> float {
    const int k = sst * C::KC + tid;
    if (++sst == nst) sst = 0;
    return (p.inv_smooth && tid < C::KC && i < nu && k < K) ? __ldg(p.inv_smooth + k) : 1.f;
  };
  auto smooth_stage = [&](int s, float v) {
    if (p.inv_smooth && tid < C::KC) s_inv[s & 1][tid] = v;
  };
  static_assert(C::KC <= NTHREADS && NTHREADS % CPR == 0, "one smooth channel per thread");

#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < nu) load_stage(s);
    cp_async_commit();
  }
  smooth_stage(0, smooth_load(0));
  float smooth_next = smooth_load(1);

  // Row statistics of the tile at m0 (at each tile start), computed before by stats_kernel.
  auto row_stats = [&](int m0) {
    if (tid < C::BM) {
      const int m = m0 + tid;
      const float2 v = m < p.M ? p.row_stats[m] : make_float2(0.f, 0.f);
      row_mean[tid] = v.x;
      row_rstd[tid] = v.y;
      row_batch[tid] = m < p.M ? (int)(m / p.tokens_per_batch) : 0;
    }
  };

  float acc[C::MAXR / 8][4];
#pragma unroll
  for (int b = 0; b < C::MAXR / 8; ++b)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[b][c] = 0.f;

  const bool uns = p.act_unsigned;
  const float qmax = uns ? 15.f : 7.f, flo = MAGIC + (uns ? 0.f : -8.f);
  const float shift = p.shift;
  const bool has_smooth = p.inv_smooth != nullptr;
  constexpr bool pow2 = POW2;
  const int tok = lane & 7, ch = lane >> 3;  // quantizer: token within the 8-token unit, chunk pair (ch, ch+4)
  const int mt = warp % C::MTILES, ks = warp / C::MTILES;

  int tile = tile0, st = st0, seg_st0 = st0;  // the current unit; the stage its tile segment began at
  for (int it = 0; it < nu; ++it) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();
    if (it + C::STAGES - 1 < nu) load_stage(it + C::STAGES - 1);
    cp_async_commit();
    if (it + 1 < nu) {  // read at it + 1, after that iteration's barrier
      smooth_stage(it + 1, smooth_next);
      smooth_next = smooth_load(it + 2);
    }
    const int m0 = tile * C::BM;
    if constexpr (LN) {
      if (it == 0 || st == 0) {  // row_* of the previous tile were last read before this iteration's barrier
        row_stats(m0);
        __syncthreads();
      }
    }

    uint8_t *xs = smem + (it % C::STAGES) * STAGE_BYTES;
    const uint8_t *ls = xs + C::X_BYTES;
    const int g0 = st * C::GS;
    const int ngs = min(C::GS, G - g0);

    if constexpr (LN) {
      // a = (1 + mscale[b]) * T(LN(x)) + mshift[b], every op rounded to T like the torch path
      const T *msh = static_cast<const T *>(p.mshift), *msc = static_cast<const T *>(p.mscale);
#pragma unroll
      for (int j = 0; j < XSLOTS; ++j) {
        const int row = (tid + j * NTHREADS) / CPR, m = m0 + row;
        if (slot_c >= ngs * 8 || m >= p.M) continue;
        const int k = g0 * 64 + slot_c * 8;
        const int64_t b = row_batch[row];
        uint4 *ptr = reinterpret_cast<uint4 *>(xs + xoff[j]);
        const uint4 rsc = __ldg(reinterpret_cast<const uint4 *>(msc + b * K + k));
        const uint4 rsh = __ldg(reinterpret_cast<const uint4 *>(msh + b * K + k));
        const uint4 out = ln_modulate8<T>(*ptr, rsc, rsh, row_mean[row], row_rstd[row]);
        *ptr = out;
        if (p.y_out) *reinterpret_cast<uint4 *>(static_cast<T *>(p.y_out) + (int64_t)m * K + k) = out;
      }
      __syncthreads();
    }

    // ---- quantization: UPW units of (8 tokens, one group) per warp, all computed before any store (ILP)
    const float *sm_r = s_inv[it & 1];
    uint32_t w[C::UPW][8];
    float f[C::UPW][16], scale[C::UPW];
    float tsc[C::UPW];  // power-of-two format: the token's scale s (0 for rows >= M)
    int ex[C::UPW] = {};  // and the group's exponent e
#pragma unroll
    for (int uu = 0; uu < C::UPW; ++uu) {
      const int u = warp + uu * NWARPS, gg = u % C::GS, row = (u / C::GS) * 8 + tok;
      tsc[uu] = pow2 && m0 + row < p.M ? __ldg(p.tok_scale + m0 + row) : 0.f;
      const uint4 r0 = *reinterpret_cast<const uint4 *>(xs + swz(row, gg * 8 + ch, C::ROW_BYTES));
      const uint4 r1 = *reinterpret_cast<const uint4 *>(xs + swz(row, gg * 8 + ch + 4, C::ROW_BYTES));
      w[uu][0] = r0.x; w[uu][1] = r0.y; w[uu][2] = r0.z; w[uu][3] = r0.w;
      w[uu][4] = r1.x; w[uu][5] = r1.y; w[uu][6] = r1.z; w[uu][7] = r1.w;
    }
    // rows >= M were zero-filled by the copy; their codes and scales must be 0 even with a shift. Units of
    // groups past K (partial last stage) compute garbage that is never stored.
    const bool tail_tile = m0 + C::BM > p.M;
    // The scale the codes are computed with: the plain group scale, or in the power-of-two format the token's
    // s * 2^-e for the largest e <= POW2_MAX_EXP with s * 2^-e >= the plain scale (monotone in e: count the hits).
    auto coding_scale = [&](float plain, int uu) -> float {
      if (!pow2) return plain;
      const float s = tsc[uu];
      int e = 0;
#pragma unroll
      for (int i = 1; i <= POW2_MAX_EXP; ++i) e += s * (1.f / (1 << i)) >= plain;
      ex[uu] = e;
      return s * (1.f / (1 << e));
    };
    // The `general` tag adds the shift and clamps unsigned codes at 0; signed layers without a shift (most of
    // them) skip both (separate code, no per-element cost). Signed codes need no clamp: |xs| <= amax makes
    // |xs * RN(1/scale)| at most qmax (1 + 2^-22), which rounds to qmax.
    auto quantize = [&](auto general) {
#pragma unroll
      for (int uu = 0; uu < C::UPW; ++uu) {
        const int u = warp + uu * NWARPS, gg = u % C::GS, row = (u / C::GS) * 8 + tok;
        const int kc0 = gg * 64 + ch * 8;  // stage channel of element 0; elements 8..15 are +32
        float v[16];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float2 t = unpack2<T>(w[uu][j]);
          v[2 * j] = t.x;
          v[2 * j + 1] = t.y;
        }
        if constexpr (decltype(general)::value) {
#pragma unroll
          for (int j = 0; j < 16; ++j) v[j] = __fadd_rn(v[j], shift);
        }
        if (has_smooth) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float4 b0 = *reinterpret_cast<const float4 *>(sm_r + kc0 + 32 * h);
            const float4 b1 = *reinterpret_cast<const float4 *>(sm_r + kc0 + 32 * h + 4);
            const float yv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int j = 0; j < 8; ++j) v[8 * h + j] = __fmul_rn(v[8 * h + j], yv[j]);
          }
        }
        // (without a shift, the zero-filled rows give zeros already)
        if (decltype(general)::value && tail_tile && m0 + row >= p.M) {
#pragma unroll
          for (int j = 0; j < 16; ++j) v[j] = 0.f;
        }
        float am[8];  // a tree: short dependency chain
#pragma unroll
        for (int j = 0; j < 8; ++j) am[j] = fmaxf(fabsf(v[2 * j]), fabsf(v[2 * j + 1]));
#pragma unroll
        for (int j = 0; j < 4; ++j) am[j] = fmaxf(am[j], am[j + 4]);
        float amax = fmaxf(fmaxf(am[0], am[2]), fmaxf(am[1], am[3]));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 8));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 16));
        const float sc = coding_scale(__fdiv_rn(amax, qmax), uu);
        scale[uu] = sc;
        const float rc = sc >= 0x1p-126f ? __frcp_rn(sc) : 0.f;  // below: codes 0 (ops.MIN_NORMAL)
        // rc = 0 (scale below 2^-126, or not finite: an overflowed xs, NaN input): codes 0, as the reference's
        // xs * 0 (where an infinite xs gives NaN, which torch turns into the int8 0)
        if (rc > 0.f) {
#pragma unroll
          for (int j = 0; j < 16; ++j) {
            const float fj = __fadd_rn(__fmul_rn(v[j], rc), MAGIC);  // MAGIC + rint(RN(xs * rc))
            f[uu][j] = decltype(general)::value ? fmaxf(fj, flo) : fj;
          }
        } else {
#pragma unroll
          for (int j = 0; j < 16; ++j) f[uu][j] = MAGIC;
        }
      }
    };
    if (uns || shift != 0.f)
      quantize(std::true_type{});
    else
      quantize(std::false_type{});

#pragma unroll
    for (int uu = 0; uu < C::UPW; ++uu) {
      const int u = warp + uu * NWARPS, gg = u % C::GS, row = (u / C::GS) * 8 + tok, m = m0 + row, g = g0 + gg;
      if (gg >= ngs) continue;
      if (p.layout == NL_ACT_PACKED) {
        if (m < p.M) {
          uint32_t b0[8], b1[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            b0[j] = __float_as_uint(f[uu][j]);
            b1[j] = __float_as_uint(f[uu][8 + j]);
          }
          uint8_t *cp = p.codes + (int64_t)m * (K / 2) + g * 32 + ch * 4;
          *reinterpret_cast<uint32_t *>(cp) = pack_nibbles(b0);
          *reinterpret_cast<uint32_t *>(cp + 16) = pack_nibbles(b1);
        }
        if (ch == 0) p.scales[(int64_t)g * p.ldm + m] = scale[uu];
      } else {
        // 8 bytes per half: elements 0..7 are k = 8ch..8ch+7 (16-byte column ch/2, half ch%2); 8..15 are k + 32
        uint32_t b[4];
        if (pow2 && p.layout == NL_ACT_S8_TILES) {
          // code << (4 - e) as a byte: MAGIC + code holds the code's two's complement in its low mantissa bits
          const int sh = POW2_MAX_EXP - ex[uu];
          uint32_t c[16];
#pragma unroll
          for (int j = 0; j < 16; ++j) c[j] = __float_as_uint(f[uu][j]) << sh;
#pragma unroll
          for (int j = 0; j < 4; ++j)
            b[j] = __byte_perm(__byte_perm(c[4 * j], c[4 * j + 1], 0x0040),
                               __byte_perm(c[4 * j + 2], c[4 * j + 3], 0x0040), 0x5410);
        } else {
          uint32_t e[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) e[j] = e4m3x2(f[uu][2 * j] - MAGIC, f[uu][2 * j + 1] - MAGIC);
#pragma unroll
          for (int j = 0; j < 4; ++j) b[j] = __byte_perm(e[2 * j], e[2 * j + 1], 0x5410);
        }
        uint8_t *cp = p.codes + (int64_t)g * p.ldm * 64 + (int64_t)(m >> 3) * 512 + (ch >> 1) * 128 +
                      (m & 7) * 16 + (ch & 1) * 8;
        *reinterpret_cast<uint2 *>(cp) = make_uint2(b[0], b[1]);
        *reinterpret_cast<uint2 *>(cp + 256) = make_uint2(b[2], b[3]);
        const int i = m & 15;  // 16-token permutation of the scales: 8b + 2q + e -> 4q + 2b + e
        const int pos = (m & ~15) + ((i >> 1) & 3) * 4 + (i >> 3) * 2 + (i & 1);
        if (pow2 && p.layout == NL_ACT_S8_TILES) {
          if (ch == 0 && g == 0) p.scales[pos] = tsc[uu] * (1.f / (1 << POW2_MAX_EXP));  // s / 16
        } else if (ch == 0) {
          p.scales[(int64_t)g * p.ldm + pos] = scale[uu];
        }
      }
    }

    // ---- low-rank down: acc[16 x rank] += a_tile[mt] @ lora_tile^T over this warp's k-steps
    if (rank > 0) {
#pragma unroll
      for (int j = 0; j < C::KSTEPS / C::KSPLIT; ++j) {
        const int kk = ks + j * C::KSPLIT;
        if (kk >= ngs * 4) break;
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

    // ---- tile segment end: reduce the k-split partial sums in a fixed order and write lora_act (the whole
    // tile: a store; part of a tile shared with another CTA: an atomic add onto the zeroed lora_act)
    if (rank > 0 && (st == nst - 1 || it == nu - 1)) {
      if constexpr (!C::SPLIT) {  // red aliases the stage ring: one segment per CTA, this is its last stage
        cp_async_wait<0>();
        __syncthreads();
      }
      const int RS = rank + 4;  // padded row (floats): spreads the fragment writes over banks
#pragma unroll
      for (int nt = 0; nt < C::MAXR / 8; ++nt) {
        if (nt * 8 < rank)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int r = (lane >> 2) + (i >= 2 ? 8 : 0), col = nt * 8 + (lane & 3) * 2 + (i & 1);
            red[(warp * 16 + r) * RS + col] = acc[nt][i];
          }
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
      }
      __syncthreads();
      const bool whole = seg_st0 == 0 && st == nst - 1;
      for (int idx = tid; idx < C::BM * rank; idx += NTHREADS) {
        const int row = idx / rank, col = idx % rank, m = m0 + row;
        const int t = row / 16, r = row % 16;
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < C::KSPLIT; ++k) sum += red[((k * C::MTILES + t) * 16 + r) * RS + col];
        if (m < p.M) {
          if (whole)
            p.lora_act[(int64_t)m * rank + col] = sum;
          else
            atomicAdd(p.lora_act + (int64_t)m * rank + col, sum);
        }
      }
    }
    if (++st == nst) {
      st = 0;
      seg_st0 = 0;
      ++tile;
    }
  }
  cp_async_wait<0>();
}

// Per-token statistics before the quantize kernel (one read of x; one warp per token, or wpr warps per token
// for the token scale alone):
//   LN:   the row's (mean, rstd) into stats (warp_row_stats: the mean, then the centred sum of squares, in fp32
//         as torch does; rstd = rsqrt(var + eps)), which the LayerNorm quantize kernel then applies;
//   tok:  the power-of-two format's token scale s[m] = max_k |xs[m, k]| / qmax, the largest plain group scale
//         of the token (IEEE division is monotone), xs formed exactly as quantize_kernel forms it (LN: from y
//         with these statistics).
template <typename T, bool LN>
__global__ void __launch_bounds__(NTHREADS) stats_kernel(const Args p, int wpr, float *__restrict__ tok,
                                                         float2 *__restrict__ stats) {
  pdl_trigger();  // launched by nl_launch: see common.cuh
  pdl_wait();
  // wpr warps per row (1, 2, 4 or 8; always 1 with LN, whose sums keep one order): small M still fills the GPU
  __shared__ float part[NWARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, sub = warp % wpr;
  const int m = blockIdx.x * (NWARPS / wpr) + warp / wpr;
  const bool live = m < p.M;
  const int K = p.K;
  const T *xr = static_cast<const T *>(p.x) + (int64_t)(live ? m : 0) * p.ldx;
  float2 st = make_float2(0.f, 0.f);
  const T *msc = nullptr, *msh = nullptr;
  if constexpr (LN) {
    if (!live) return;  // (wpr == 1: no block-wide step follows)
    st = warp_row_stats<T>(xr, K, p.eps, lane);
    if (lane == 0) stats[m] = st;
    const int64_t b = m / p.tokens_per_batch;
    msc = static_cast<const T *>(p.mscale) + b * K;
    msh = static_cast<const T *>(p.mshift) + b * K;
  }
  if (!tok) return;
  float amax = 0.f;
#pragma unroll 4
  for (int k = (sub * 32 + lane) * 8; live && k < K; k += 256 * wpr) {
    uint4 raw = __ldg(reinterpret_cast<const uint4 *>(xr + k));
    if constexpr (LN)
      raw = ln_modulate8<T>(raw, __ldg(reinterpret_cast<const uint4 *>(msc + k)),
                            __ldg(reinterpret_cast<const uint4 *>(msh + k)), st.x, st.y);
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
    float v[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = unpack2<T>(w[j]);
      v[2 * j] = __fadd_rn(f.x, p.shift);
      v[2 * j + 1] = __fadd_rn(f.y, p.shift);
    }
    if (p.inv_smooth) {
      const float4 a0 = __ldg(reinterpret_cast<const float4 *>(p.inv_smooth + k));
      const float4 a1 = __ldg(reinterpret_cast<const float4 *>(p.inv_smooth + k + 4));
      const float sv[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = __fmul_rn(v[j], sv[j]);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(v[j]));
  }
#pragma unroll
  for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (wpr > 1) {  // (a maximum: the same for any order)
    if (lane == 0) part[warp] = amax;
    __syncthreads();
    if (sub == 0)
      for (int i = 1; i < wpr; ++i) amax = fmaxf(amax, part[warp + i]);
  }
  if (live && sub == 0 && lane == 0) tok[m] = __fdiv_rn(amax, p.act_unsigned ? 15.f : 7.f);
}

// CTAs of the persistent split: NUNCHAKU_LITE_QUANT_SPLIT=0 gives one CTA per token tile (benchmarks; returns
// 0), =N caps the CTAs at N (tests: shared tiles at small M); otherwise as many as are resident at once.
int split_ctas(int resident) {
  const char *env = getenv("NUNCHAKU_LITE_QUANT_SPLIT");
  if (!env || !env[0]) return resident;
  const int n = atoi(env);
  return n <= 0 ? 0 : min(n, resident);
}

template <typename T, int BM, int MAXR, bool LN, bool POW2>
int launch(const Args &p0, cudaStream_t stream, const char *kname) {
  using C = Cfg<BM, MAXR>;
  auto kern = quantize_kernel<T, C, LN, POW2>;
  const int stage = C::X_BYTES + p0.rank * C::ROW_BYTES;
  const int red = NWARPS * 16 * (p0.rank + 4) * 4;
  const int smem = C::SPLIT ? C::STAGES * stage + red : max(C::STAGES * stage, red);
  // The attribute is set once per (kernel, device) for the largest size: keeps launches legal inside
  // CUDA-graph capture. The resident CTAs per device (for the persistent split) are counted at that size.
  static bool attr_set[64] = {};
  static int slots[64] = {};
  int dev = 0;
  NL_CHECK_CUDA(cudaGetDevice(&dev), kname);
  if (dev >= 64 || !attr_set[dev]) {
    const int stage_most = C::X_BYTES + C::MAXR * C::ROW_BYTES;
    const int most = C::SPLIT ? C::STAGES * stage_most + C::RED_BYTES : max(C::STAGES * stage_most, C::RED_BYTES);
    NL_CHECK_CUDA(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, most), kname);
    int sms = 0, per_sm = 0;
    NL_CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), kname);
    NL_CHECK_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, NTHREADS, most), kname);
    if (dev < 64) {
      slots[dev] = max(1, sms * per_sm);
      attr_set[dev] = true;
    }
  }
  Args p = p0;
  const int ntiles = (p.M + BM - 1) / BM;
  // Persistent split: as many CTAs as fit at once (never more than tiles), each a contiguous equal share of
  // the (tile, stage) units, so the last wave does not idle most SMs. Small M (twice the tiles fit at once):
  // two CTAs per tile, each half of its stages, so that a few hundred tokens still use most SMs. Either way
  // a tile is shared by at most two CTAs.
  p.nctas = ntiles;
  const int cap = (C::SPLIT && dev < 64) ? split_ctas(slots[dev]) : 0;
  const int nst = (p.K / 64 + C::GS - 1) / C::GS;
  if (cap > 0) p.nctas = 2 * ntiles <= cap && nst >= 2 ? 2 * ntiles : min(ntiles, cap);
  if (p.nctas != ntiles && p.rank > 0)  // shared tiles add two partial sums onto zeros
    NL_CHECK_CUDA(cudaMemsetAsync(p.lora_act, 0, (size_t)p.M * p.rank * sizeof(float), stream), kname);
  const int blocks = p.nctas + (int)((p.ldm + BM - 1) / BM) - ntiles;  // + the padding tiles
  (void)nl_launch(kern, dim3(blocks), dim3(NTHREADS), smem, stream, p);
  NL_CHECK_LAUNCH(kname);
  return NL_OK;
}

// Tokens per CTA for rank <= 32: NUNCHAKU_LITE_QUANT_BM=16|32 overrides the default (benchmarks, tests).
constexpr int DEFAULT_BM = 16;
int tile_rows(int rank) {
  if (rank > 32) return 32;
  const char *env = getenv("NUNCHAKU_LITE_QUANT_BM");
  if (env && (env[0] == '1' && env[1] == '6')) return 16;
  if (env && (env[0] == '3' && env[1] == '2')) return 32;
  return DEFAULT_BM;
}

template <typename T, bool LN, bool POW2>
int dispatch_rank(const Args &p, cudaStream_t s, const char *kname) {
  if (p.rank <= 32) {
    if (tile_rows(p.rank) == 16) return launch<T, 16, 32, LN, POW2>(p, s, kname);
    return launch<T, 32, 32, LN, POW2>(p, s, kname);
  }
  if (p.rank <= 64) return launch<T, 32, 64, LN, POW2>(p, s, kname);
  return launch<T, 32, 128, LN, POW2>(p, s, kname);
}

template <typename T, bool LN>
int dispatch(const Args &p, cudaStream_t s, const char *kname) {
  return p.tok_scale ? dispatch_rank<T, LN, true>(p, s, kname) : dispatch_rank<T, LN, false>(p, s, kname);
}

int check_x(const char *k, const void *x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const float *inv_smooth,
            float shift) {
  NL_CHECK_ARG(x_dtype == NL_BF16 || x_dtype == NL_F16, "%s: x dtype code %d is not bf16/fp16", k, x_dtype);
  NL_CHECK_ARG(M >= 1 && M < (1LL << 31) - 256, "%s: M=%lld out of range", k, (long long)M);
  NL_CHECK_ARG(K >= 64 && K % 64 == 0 && K < (1LL << 24), "%s: K=%lld must be a positive multiple of 64", k,
               (long long)K);
  NL_CHECK_ARG(ldx >= K && ldx % 8 == 0, "%s: x row stride %lld must be >= K and a multiple of 8", k,
               (long long)ldx);
  NL_CHECK_ARG(x && nl_aligned(x, 16), "%s: x must be a non-null 16-byte aligned pointer", k);
  NL_CHECK_ARG(!inv_smooth || nl_aligned(inv_smooth, 16), "%s: inv_smooth must be 16-byte aligned", k);
  NL_CHECK_ARG(isfinite(shift), "%s: shift=%g must be finite", k, (double)shift);
  return NL_OK;
}

int check_modulation(const char *k, const void *mod_shift, const void *mod_scale, int64_t tokens_per_batch,
                     float eps) {
  NL_CHECK_ARG(tokens_per_batch >= 1, "%s: tokens_per_batch=%lld must be >= 1", k, (long long)tokens_per_batch);
  NL_CHECK_ARG(mod_shift && nl_aligned(mod_shift, 16), "%s: mod_shift must be a non-null 16-byte aligned pointer",
               k);
  NL_CHECK_ARG(mod_scale && nl_aligned(mod_scale, 16), "%s: mod_scale must be a non-null 16-byte aligned pointer",
               k);
  NL_CHECK_ARG(eps >= 0.f, "%s: eps=%g must be >= 0", k, (double)eps);
  return NL_OK;
}

int check_common(const char *k, const void *x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const float *inv_smooth,
                 float shift, const void *lora_down, int rank, int layout, const uint8_t *codes, const float *scales,
                 int64_t ldm, const float *lora_act, const float *token_scale) {
  if (int rc = check_x(k, x, x_dtype, M, K, ldx, inv_smooth, shift)) return rc;
  NL_CHECK_ARG(layout == NL_ACT_PACKED || layout == NL_ACT_FP8_TILES || layout == NL_ACT_S8_TILES,
               "%s: layout=%d is not NL_ACT_PACKED (0), NL_ACT_FP8_TILES (1) or NL_ACT_S8_TILES (2)", k, layout);
  NL_CHECK_ARG(layout != NL_ACT_S8_TILES || token_scale, "%s: NL_ACT_S8_TILES holds power-of-two scales only: "
               "token_scale must be non-null", k);
  NL_CHECK_ARG(!token_scale || nl_aligned(token_scale, 4), "%s: token_scale must be 4-byte aligned", k);
  if (layout == NL_ACT_PACKED)
    NL_CHECK_ARG(ldm >= M && ldm % 128 == 0, "%s: scales stride ldm=%lld must be >= M and a multiple of 128", k,
                 (long long)ldm);
  else
    NL_CHECK_ARG(ldm >= M && ldm % 256 == 0, "%s: padded rows ldm=%lld must be >= M and a multiple of 256 for "
                 "the tile layouts", k, (long long)ldm);
  NL_CHECK_ARG(rank >= 0 && rank <= 128 && rank % 16 == 0, "%s: rank=%d must be a multiple of 16 in [0, 128]", k,
               rank);
  NL_CHECK_ARG(codes && nl_aligned(codes, 16), "%s: codes must be a non-null 16-byte aligned pointer", k);
  NL_CHECK_ARG(scales && nl_aligned(scales, 16), "%s: scales must be a non-null 16-byte aligned pointer", k);
  NL_CHECK_ARG(rank == 0 || (lora_down && nl_aligned(lora_down, 16)),
               "%s: lora_down must be a non-null 16-byte aligned pointer when rank > 0", k);
  NL_CHECK_ARG(rank == 0 || lora_act, "%s: lora_act must be non-null when rank > 0", k);
  return NL_OK;
}

}  // namespace

extern "C" int nl_quantize_act(const void *x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const float *inv_smooth,
                               float shift, int act_unsigned, const void *lora_down, int rank, int layout,
                               uint8_t *codes, float *scales, int64_t ldm, float *lora_act, const float *token_scale,
                               void *stream) {
  const char *k = "nl_quantize_act";
  if (int rc = check_common(k, x, x_dtype, M, K, ldx, inv_smooth, shift, lora_down, rank, layout, codes, scales, ldm,
                            lora_act, token_scale))
    return rc;
  Args p{x, (int)M, (int)K, ldx, inv_smooth, shift, act_unsigned, lora_down, rank, layout, codes, scales, ldm,
         lora_act, nullptr, nullptr, 1, 0.f, nullptr, token_scale, nullptr};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return x_dtype == NL_BF16 ? dispatch<__nv_bfloat16, false>(p, s, k) : dispatch<__half, false>(p, s, k);
}

extern "C" int nl_layernorm_quantize_act(const void *x, int x_dtype, int64_t M, int64_t K, int64_t ldx,
                                         const void *mod_shift, const void *mod_scale, int64_t tokens_per_batch,
                                         float eps, const float *inv_smooth, float shift, int act_unsigned,
                                         const void *lora_down, int rank, int layout, uint8_t *codes,
                                         float *scales, int64_t ldm, float *lora_act, void *y_out,
                                         const float *token_scale, const float *row_stats, void *stream) {
  const char *k = "nl_layernorm_quantize_act";
  if (int rc = check_common(k, x, x_dtype, M, K, ldx, inv_smooth, shift, lora_down, rank, layout, codes, scales, ldm,
                            lora_act, token_scale))
    return rc;
  if (int rc = check_modulation(k, mod_shift, mod_scale, tokens_per_batch, eps)) return rc;
  NL_CHECK_ARG(!y_out || nl_aligned(y_out, 16), "%s: y_out must be 16-byte aligned", k);
  NL_CHECK_ARG(row_stats && nl_aligned(row_stats, 8), "%s: row_stats must be a non-null 8-byte aligned pointer "
               "(nl_act_stats)", k);
  Args p{x, (int)M, (int)K, ldx, inv_smooth, shift, act_unsigned, lora_down, rank, layout, codes, scales, ldm,
         lora_act, mod_shift, mod_scale, tokens_per_batch, eps, y_out, token_scale,
         reinterpret_cast<const float2 *>(row_stats)};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return x_dtype == NL_BF16 ? dispatch<__nv_bfloat16, true>(p, s, k) : dispatch<__half, true>(p, s, k);
}

extern "C" int nl_act_stats(const void *x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const void *mod_shift,
                            const void *mod_scale, int64_t tokens_per_batch, float eps, const float *inv_smooth,
                            float shift, int act_unsigned, float *token_scale, float *row_stats, void *stream) {
  const char *k = "nl_act_stats";
  if (int rc = check_x(k, x, x_dtype, M, K, ldx, inv_smooth, shift)) return rc;
  const bool ln = mod_shift || mod_scale;
  if (ln) {
    if (int rc = check_modulation(k, mod_shift, mod_scale, tokens_per_batch, eps)) return rc;
    NL_CHECK_ARG(row_stats && nl_aligned(row_stats, 8), "%s: row_stats must be a non-null 8-byte aligned pointer "
                 "with LayerNorm", k);
  } else {
    NL_CHECK_ARG(!row_stats, "%s: row_stats without LayerNorm (mod_shift, mod_scale NULL)", k);
    NL_CHECK_ARG(token_scale, "%s: token_scale must be non-null without LayerNorm", k);
  }
  Args p{x, (int)M, (int)K, ldx, inv_smooth, shift, act_unsigned, nullptr, 0, 0, nullptr, nullptr, 0,
         nullptr, mod_shift, mod_scale, ln ? tokens_per_batch : 1, eps, nullptr, nullptr, nullptr};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  // warps per row without LayerNorm: the most (up to NWARPS) that keep every row's warps resident at once
  static int resident_warps[64] = {};
  int dev = 0, wpr = 1;
  NL_CHECK_CUDA(cudaGetDevice(&dev), k);
  if (dev < 64 && !resident_warps[dev]) {
    int sms = 0, per_sm = 0;
    NL_CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), k);
    NL_CHECK_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, stats_kernel<__nv_bfloat16, false>, NTHREADS,
                                                               0), k);
    resident_warps[dev] = max(1, sms * per_sm * NWARPS);
  }
  if (!ln && dev < 64)
    while (wpr < NWARPS && M * wpr * 2 <= resident_warps[dev]) wpr *= 2;
  const unsigned blocks = (unsigned)((M + NWARPS / wpr - 1) / (NWARPS / wpr));
  float2 *st = reinterpret_cast<float2 *>(row_stats);
  auto kern = x_dtype == NL_BF16 ? (ln ? stats_kernel<__nv_bfloat16, true> : stats_kernel<__nv_bfloat16, false>)
                                 : (ln ? stats_kernel<__half, true> : stats_kernel<__half, false>);
  (void)nl_launch(kern, dim3(blocks), dim3(NTHREADS), 0, s, p, wpr, token_scale, st);
  NL_CHECK_LAUNCH(k);
  return NL_OK;
}
