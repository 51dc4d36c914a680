// W4A4 GEMM for Hopper (sm_90a): fp8 wgmma on the 4-bit codes, low-rank-up + bias (+ GELU tanh) epilogue.
//
// Math (as nl_w4a4_gemm, reference quant/ops.py w4a4_linear):
//   out[m, n] = act( sum_g sa[m, g] * sw[n, g] * dot_g(m, n) + lora_act[m, :] . lora_up[n, :] + bias[n] )
//   Every code (-8..15) is exact in e4m3 and every group dot (|dot| <= 64 * 8 * 15) is exact in the fp32
//   accumulator of the tensor core, so `wgmma ... .f32.e4m3.e4m3` over one 64-wide group yields the exact
//   integer dot. Promotion per group: acc = fma(dot, sa * sw, acc) (two fp32 roundings per group).
//   Low-rank: lora_act (fp32) = hi + lo (16-bit each, lo = the rounding rest), both through a 16-bit wgmma
//   against lora_up (16-bit, exact), fp32 accumulation (error ~2^-17 of the low-rank term).
//
// Folded weights (nl_w4a4_gemm_fp8_pow2, FOLD): when every weight group scale is sw[n, g] = c[n] * 2^-e[n, g]
//   (0 <= e <= 9, quant/ops.py pow2_split), code * 2^-e is exact in e4m3 (subnormals included), so the
//   nibble -> e4m3 step uses per-row tables of e4m3(code * 2^-e) and the wgmma yields dot_g * 2^-e exactly;
//   promotion is then one fma per group, acc = fma(dot_e, sa, acc), and c[n] multiplies acc once before the
//   low-rank epilogue. The stage carries the group's exponent bytes (128 B) instead of its float scales.
// Transposed product: wgmma's M = weight rows (64 per consumer warpgroup), N = tokens (BT per CTA), K = 32
// per instruction (two per group). The accumulator is therefore out^T: thread (warp w, lane l) of a
// consumer holds rows n = 16w + l/4 (+8) and tokens 8j + 2(l%4) + {0,1} for j < BT/8.
//
// Operands (all contiguous per pipeline stage, so each stage is four 1-D bulk copies, no tensor maps):
//   activations  codes8 uint8 [K/64, Mp, 64]: e4m3 bytes, 8-token x 16-byte core matrices (ops.py
//                pack_act_fp8_tiles, NL_ACT_FP8_TILES); read by wgmma from shared memory with a no-swizzle
//                K-major descriptor: LBO = 128 B (next core matrix along K), SBO = 512 B (next 8 tokens).
//   act scales   float [K/64, Mp], 16-token permutation 8b+2q+e -> 4q+2b+e: one 16-byte load gives a
//                thread's four token scales of two accumulator column blocks.
//   weights      4-bit, nl_repack_weight_sm90 order [N/128][K/64][2 warpgroups][128 threads][16 bytes]
//                (ops.py pack_weight_wgmma): each thread's 32 codes of one group (its A fragments of the
//                two k32 steps) are one conflict-free 16-byte shared load. Word j (k16 block j) holds the
//                4 codes of row 16w+l/4 in its low half and those of row +8 in its high half.
//   weight scales float [K/64, N].
// Nibble -> e4m3 in registers (11 ALU ops per 8 codes): t = x & 0x77777777; for codes 0-3
//   p = prmt(POS, t) (POS[i] = e4m3(i)), q = prmt(NEG, t) (NEG[i] = e4m3(i - 8)),
//   mask = prmt(x, x << 4, 0x9D8C) (sign-replicating selectors: 0xFF where the code is negative),
//   r = (p & ~mask) | (q & mask); codes 4-7 use t >> 16 and selectors 0xBFAE.
// CTA: 3 warpgroups. Warpgroup 0 = producer (one thread issues the bulk copies into a STAGES-deep ring with
// full/empty mbarriers; setmaxnreg gives its registers to the consumers). Warpgroups 1 and 2 = consumers,
// each 64 of the CTA's 128 weight rows against the same BT tokens. Main loop (SUB = 64 tokens per wgmma):
// per (group, token sub-tile) item two wgmma into a result buffer (scale-d 0 then 1) and one commit; the
// next item is issued before the current one is waited for and promoted (two result buffers), so each
// consumer keeps one wgmma in flight while it promotes, and the two consumers share the tensor core.
// Variants (environment, see nl_w4a4_gemm_fp8): BT 128/192/256, unpipelined SUB = BT, 16 stages, CTA
// order, 2-CTA clusters multicasting the activation slab.
// Status (H100, bench/results/h100-2026-11-25c, M = 4608): correct (rel. err. ~1e-6 vs float64); 0.54-0.70x
// torch bf16 with plain scales, 0.59-0.86x with folded weights (1.2-1.3x the mma.sync s8 path); far from the
// 2x of the 8-bit tensor cores. ncu (folded): 5.1 cycles per issued instruction per warp, 0.6 eligible warps
// per scheduler, top stalls short scoreboard (the promotion's scale loads, now issued before the wait), fixed
// latency, instruction fetch; L2 24 %, DRAM 7 %: latency-bound inside the SM, not bandwidth-bound. Per
// element and group the folded promotion (1 fma) costs half the tensor time in issue slots, the nibble
// conversion a third: the ceiling of this design is near the tensor peak only with perfect overlap, which two
// consumer warpgroups capped at 168 registers do not give. Tile shape, ring depth and CTA order move it <= 5 %.
// GELU -> quantize epilogue (nl_w4a4_gemm_fp8_gelu_quantize, QUANT, default tile only): instead of storing the
// GELU output, each consumer warpgroup quantizes its 64 outputs x 128 tokens (one group of the next layer's K)
// for the next layer and writes that layer's fp8_tiles operand plus low-rank down partial sums; see
// gelu_quantize. Correct (bit-identical to GEMM + quantize kernel) but slower at M = 4608 on the H100 (its
// IEEE divisions added ~40% to the fc1 GEMM's instructions; they are multiplications by reciprocals since the
// 2026-12 semantics, not re-timed), so the fused forward leaves it off by default.
// Epilogue: low-rank chunks (64 ranks) staged in the freed pipeline memory, bias, GELU, conversion, the
// transposed tile staged in shared memory and written row by row (16-byte stores, rows >= M never written).
// Shapes: N % 128 == 0, K % 64 == 0, M >= 1, Mp = M rounded up to 256, rank % 16 == 0 (<= 1024).
#include "common.cuh"
#include <stdlib.h>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NL_SM90A 1
#include "sm90.cuh"
#endif

namespace {

constexpr int BN = 128;                 // weight rows per CTA (two consumer warpgroups x 64)
constexpr int THREADS = 384;            // producer warpgroup + 2 consumer warpgroups
constexpr int W_BYTES = BN * 32;        // 4-bit weights of one group for the CTA
constexpr int SW_BYTES = BN * 4;
constexpr int LRC = 64;                 // rank chunk of the low-rank epilogue (lowrank_into's default)
constexpr int OUT_PAD = 8;              // staging row padding (elements)
// Defaults chosen by the H100 sweep (bench/results/h100-2026-11-25b/gemm_README.md): the variants differ by
// <= 5 %, except the cluster-multicast one, which is 2.5x slower (kept opt-in for further work).
constexpr int DEFAULT_BT = 128, DEFAULT_STAGES = 10, DEFAULT_RASTER = 1, DEFAULT_CLUSTER = 1;
// Folded weights: group scale = channel scale * 2^-e with 0 <= e <= FOLD_MAX_EXP, so that every code * 2^-e
// (|code| <= 8) is exact in e4m3, subnormals included (quant/ops.py FP8_FOLD_MAX_EXP).
constexpr int FOLD_MAX_EXP = 9;
[[maybe_unused]] constexpr int EXP_BYTES = BN;  // one exponent byte per weight row and group (sm_90a code only)

template <int BT, int NSTAGES>
struct Cfg {
  static constexpr int ACT_BYTES = BT * 64, SA_BYTES = BT * 4;
  static constexpr int STAGE = ACT_BYTES + W_BYTES + SA_BYTES + SW_BYTES;  // multiple of 128
  static constexpr int STAGES = NSTAGES;
  static constexpr int PIPE = STAGES * STAGE;
  static constexpr int EPI_OUT = BT * (BN + OUT_PAD) * 4;  // fp32 staging (largest)
  static constexpr int EPI_LR = 2 * BT * LRC * 2;          // hi + lo 16-bit
  static constexpr int BAR_OFF = PIPE;                     // PIPE >= both epilogue uses (static_assert)
  static constexpr int TAB_OFF = BAR_OFF + 2 * STAGES * 8;  // FOLD: e4m3 tables, 16 bytes per exponent
  static constexpr int SMEM = TAB_OFF + 16 * (FOLD_MAX_EXP + 1) + 128; // + slack
  static_assert(PIPE >= EPI_OUT && PIPE >= EPI_LR, "epilogue staging must fit in the pipeline memory");
  static_assert(SMEM <= 227 * 1024, "shared memory per block");
  static_assert(STAGE % 128 == 0, "stage alignment");
};

struct Params {
  const uint8_t *act; const float *sa; int64_t mp;
  const uint8_t *w; const float *sw;
  const float *lora_act; const void *lora_up; int rank;
  const float *bias; void *out; int out_dtype; int64_t ldo; int epilogue;
  int M, N, K;
  int raster;         // CTA order, see the kernel
  const float *wch;   // folded weights (FOLD): per-channel scale [N] and group exponents uint8 [K/64, N]
  const uint8_t *wexp;
  // GELU -> quantize epilogue (QUANT): the next layer's activation operand instead of `out`
  uint8_t *q_codes; float *q_scales; int64_t q_mp;   // NL_ACT_FP8_TILES of the GELU output (K' = N)
  const float *q_inv_smooth; float q_shift; int q_unsigned;
  const void *q_down; int q_rank; float *q_part;     // low-rank down partial sums [N/128, M, q_rank]
};

#ifdef NL_SM90A
using namespace sm90;
// Multicast variant: the same shared-memory offset (and mbarrier) in every CTA of cta_mask.
__device__ __forceinline__ void bulk_g2s_mc(uint32_t dst, const void *src, uint32_t bytes, uint32_t bar,
                                            uint16_t cta_mask) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1], %2, "
               "[%3], %4;\n" ::"r"(dst), "l"(src), "r"(bytes), "r"(bar), "h"(cta_mask) : "memory");
}
__device__ __forceinline__ void mbar_wait_cluster(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
                 "selp.u32 %0, 1, 0, p;\n}\n" : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  } while (!done);
}
// Arrive on the mbarrier at the same offset in CTA `rank` of the cluster.
__device__ __forceinline__ void mbar_arrive_remote(uint32_t bar, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(bar), "r"(rank));
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(remote) : "memory");
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
// The low-rank epilogue into its own accumulator, added to acc afterwards: when the main loop's acc is also a
// wgmma accumulator, ptxas serializes every main-loop wgmma (warning C7515, the promotion FMAs write acc while
// wgmma is in flight).
template <int BT, typename T>
__device__ __forceinline__ void lowrank(const Params &p, uint8_t *smem, float (&acc)[BT / 2], int m0, int n0,
                                        int c, int ctid) {
  float lr[BT / 2];
#pragma unroll
  for (int i = 0; i < BT / 2; ++i) lr[i] = 0.f;
  lowrank_into<BT, T>(smem, lr, p.lora_act + (int64_t)m0 * p.rank, p.M - m0,
                      static_cast<const T *>(p.lora_up) + (int64_t)(n0 + c * 64) * p.rank, p.rank, ctid);
#pragma unroll
  for (int i = 0; i < BT / 2; ++i) acc[i] += lr[i];
}

// GELU -> quantize epilogue: v = the GELU output rounded to the 16-bit out dtype (exactly what the plain GELU
// epilogue stores), then the next layer's activation quantization of v (quant/ops.py quantize_act: xs =
// (v + shift) * inv_smooth, group amax over the 64 outputs of this consumer warpgroup, scale = amax / qmax, codes
// = clamp(rint(xs * RN(1/scale))), each op rounded alone, so bit-identical to the quantize kernel on the stored v)
// written in the NL_ACT_FP8_TILES layout (group g' = n0/64 + c is one 8 KB slab of the CTA's 128 tokens), and
// the partial low-rank down v @ q_down[:, n0:n0+128]^T of these 128 outputs into q_part[nb] (summed over nb by
// the caller, in a fixed order). Shared memory (the pipeline's): the v tile for the low-rank wgmma (bf16/fp16,
// K-major core matrices, 32 KB), two code slabs (16 KB), the cross-warp amax (4 KB) and the reciprocal scales
// (1 KB).
template <int BT, typename T>
__device__ __forceinline__ void gelu_quantize(const Params &p, uint8_t *smem, float (&acc)[BT / 2], int m0, int n0,
                                              int nb, int c, int ctid) {
  static_assert(BT == 128, "the GELU -> quantize epilogue is written for 128-token tiles");
  constexpr int ND = BT / 2;
  const int w = ctid >> 5, l = ctid & 31, q = l & 3;
  const int kl = 16 * w + (l >> 2);  // this thread's rows within the warpgroup's 64 (and kl + 8)
  const int rloc = c * 64 + kl;
  uint8_t *vt = smem;                                   // [BT tokens x 128] 16-bit, core matrices
  uint8_t *slab = smem + 32768 + c * 8192;              // [BT tokens x 64] e4m3 codes of group g'
  float *red = reinterpret_cast<float *>(smem + 49152); // [2 warpgroups][4 warps][BT]
  float *ssc = reinterpret_cast<float *>(smem + 53248); // [2 warpgroups][BT] reciprocal scales
  const uint32_t bar = 2 + c;                           // named barrier of this warpgroup
  auto wg_sync = [&]() { asm volatile("bar.sync %0, 128;\n" ::"r"(bar) : "memory"); };
  const float b0 = p.bias ? p.bias[n0 + rloc] : 0.f, b1 = p.bias ? p.bias[n0 + rloc + 8] : 0.f;
  const float sm0 = p.q_inv_smooth ? p.q_inv_smooth[n0 + rloc] : 1.f;
  const float sm1 = p.q_inv_smooth ? p.q_inv_smooth[n0 + rloc + 8] : 1.f;
  const bool uns = p.q_unsigned;
  const float qmax = uns ? 15.f : 7.f, lo = uns ? 0.f : -8.f, hi = uns ? 15.f : 7.f;
  // v in place of acc; tokens >= M give v = 0 (their codes, scales and low-rank rows are 0)
#pragma unroll
  for (int i = 0; i < ND; ++i) {
    const int t = 8 * (i >> 2) + 2 * q + (i & 1);
    const float v = round_as(gelu_epilogue(acc[i] + ((i >> 1) & 1 ? b1 : b0), p.out_dtype), p.out_dtype);
    acc[i] = m0 + t < p.M ? v : 0.f;
  }
  auto xs_of = [&](int i) {  // 0 for tokens >= M, whose shifted value would not be 0
    if (m0 + 8 * (i >> 2) + 2 * q + (i & 1) >= p.M) return 0.f;
    const float a = p.q_shift != 0.f ? acc[i] + p.q_shift : acc[i];
    return p.q_inv_smooth ? __fmul_rn(a, (i >> 1) & 1 ? sm1 : sm0) : a;
  };
  // group amax per token: the thread's two rows, the 8 lanes of its column set, then the 4 warps
  float am[ND / 2];
#pragma unroll
  for (int j = 0; j < ND / 4; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) am[2 * j + e] = fmaxf(fabsf(xs_of(4 * j + e)), fabsf(xs_of(4 * j + 2 + e)));
#pragma unroll
  for (int o = 4; o < 32; o <<= 1)
#pragma unroll
    for (int i = 0; i < ND / 2; ++i) am[i] = fmaxf(am[i], __shfl_xor_sync(0xffffffffu, am[i], o));
  if (l < 4) {
#pragma unroll
    for (int j = 0; j < ND / 4; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) red[(c * 4 + w) * BT + 8 * j + 2 * q + e] = am[2 * j + e];
  }
  wg_sync();
  {  // token ctid: scale, into shared memory and the 16-token-permuted global scales
    const float *r = red + c * 4 * BT + ctid;
    const float amax = fmaxf(fmaxf(r[0], r[BT]), fmaxf(r[2 * BT], r[3 * BT]));
    const float scale = __fdiv_rn(amax, qmax);
    ssc[c * BT + ctid] = scale >= 0x1p-126f ? __frcp_rn(scale) : 0.f;  // below: codes 0 (ops.MIN_NORMAL)
    const int tt = ctid & 15, pos = (ctid & ~15) + 4 * ((tt & 7) >> 1) + 2 * (tt >> 3) + (tt & 1);
    p.q_scales[(int64_t)(n0 / 64 + c) * p.q_mp + m0 + pos] = scale;  // 0 for tokens >= M (v = 0)
  }
  wg_sync();
  // codes -> e4m3 bytes into the slab (byte (t, k) at ((t/8)*4 + k/16)*128 + (t%8)*16 + k%16)
#pragma unroll
  for (int i = 0; i < ND; ++i) {
    const int t = 8 * (i >> 2) + 2 * q + (i & 1), k = kl + ((i >> 1) & 1) * 8;
    const float rscale = ssc[c * BT + t];  // RN(1 / scale), or 0
    // + 0: -0 -> +0 (the e4m3 byte of code 0 is 0x00, as in the reference layout)
    // (rscale 0: codes 0, as in the quantize kernel; an infinite xs * 0 would give NaN)
    const float code = rscale > 0.f ? fminf(fmaxf(rintf(__fmul_rn(xs_of(i), rscale)), lo), hi) + 0.f : 0.f;
    slab[((t >> 3) * 4 + (k >> 4)) * 128 + (t & 7) * 16 + (k & 15)] = (uint8_t)e4m3_byte(code);
  }
  wg_sync();
  uint4 *dst = reinterpret_cast<uint4 *>(p.q_codes + ((int64_t)(n0 / 64 + c) * p.q_mp + m0) * 64);
  for (int i = ctid; i < BT * 64 / 16; i += 128) dst[i] = reinterpret_cast<const uint4 *>(slab)[i];
  if (p.q_rank == 0) return;
  // low-rank down partial: v tile [BT x 128] (16-bit, exact: v is a 16-bit value) through wgmma against
  // q_down rows (ranks, padded to 64 with zeros), by the first consumer warpgroup
#pragma unroll
  for (int i = 0; i < ND; ++i) {
    const int t = 8 * (i >> 2) + 2 * q + (i & 1), k = c * 64 + kl + ((i >> 1) & 1) * 8;
    const uint32_t h = pack2<T>(acc[i], 0.f);
    *reinterpret_cast<uint16_t *>(vt + ((t >> 3) * 16 + (k >> 3)) * 128 + (t & 7) * 16 + (k & 7) * 2) =
        (uint16_t)(h & 0xFFFFu);
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // generic writes -> wgmma reads
  consumers_sync();
  if (c != 0) return;
  const T *down = static_cast<const T *>(p.q_down);
  const int64_t ldd = (int64_t)p.N;  // q_down [q_rank, N]
  const int r0 = kl, r1 = kl + 8;    // rank rows of this thread's A fragments
  float lr[ND];
#pragma unroll
  for (int i = 0; i < ND; ++i) lr[i] = 0.f;
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const int k = n0 + kk * 16 + 2 * q;
    uint32_t a[4];
    a[0] = r0 < p.q_rank ? *reinterpret_cast<const uint32_t *>(down + r0 * ldd + k) : 0u;
    a[1] = r1 < p.q_rank ? *reinterpret_cast<const uint32_t *>(down + r1 * ldd + k) : 0u;
    a[2] = r0 < p.q_rank ? *reinterpret_cast<const uint32_t *>(down + r0 * ldd + k + 8) : 0u;
    a[3] = r1 < p.q_rank ? *reinterpret_cast<const uint32_t *>(down + r1 * ldd + k + 8) : 0u;
    LrOp<T>::template mma<BT>(lr, a, make_desc(smem_u32(vt) + kk * 256, 128, 128 * 16));
  }
  wg_commit();
  wg_wait<0>();
  reg_fence(lr);
  float *part = p.q_part + (int64_t)nb * p.M * p.q_rank;
#pragma unroll
  for (int i = 0; i < ND; ++i) {
    const int t = 8 * (i >> 2) + 2 * q + (i & 1), r = (i >> 1) & 1 ? r1 : r0;
    if (r < p.q_rank && m0 + t < p.M) part[(int64_t)(m0 + t) * p.q_rank + r] = lr[i];
  }
}
#endif  // NL_SM90A

template <int BT, typename LT, int SUB, int NSTAGES, int CL, bool FOLD, bool PIPE, bool QUANT>
__global__ void __launch_bounds__(THREADS, 1) w4a4_fp8_kernel(const Params p) {
  pdl_trigger();  // launched by nl_launch: see common.cuh
  pdl_wait();
#ifdef NL_SM90A
  using C = Cfg<BT, NSTAGES>;
  constexpr int PRODUCER_REGS = 24, CONSUMER_REGS = 240;  // setmaxnreg: 128*24 + 256*240 <= 64K registers
  extern __shared__ __align__(1024) uint8_t smem[];  // no static shared memory: the window starts aligned
  const uint32_t smem_base = smem_u32(smem);
  const uint32_t full_bar = smem_base + C::BAR_OFF, empty_bar = full_bar + C::STAGES * 8;
  const int wg = threadIdx.x >> 7, ctid = threadIdx.x & 127;
  const CtaTile tile = cta_tile<BT, BN>(p.M, p.N, p.raster);
  const int m0 = tile.m0, nb = tile.nb, n0 = tile.n0;
  const int G = p.K / 64;

  init_ring(full_bar, empty_bar, C::STAGES, 8 * CL);  // one release per consumer warp of every CTA of the cluster
  if constexpr (FOLD) {  // table byte 16e + b: e4m3((b < 8 ? b : b - 16) * 2^-e), the word order of POS/NEG
    uint8_t *tab = smem + C::TAB_OFF;
    for (int i = threadIdx.x; i < 16 * (FOLD_MAX_EXP + 1); i += THREADS) {
      const int b = i & 15;
      tab[i] = (uint8_t)e4m3_byte(ldexpf((float)(b < 8 ? b : b - 16), -(i >> 4)));
    }
  }
  // CL = 2: a cluster of two CTAs on neighbouring weight tiles of the same token tile; each producer loads
  // half of the activation slab and its scales and multicasts it to both CTAs (halving the L2 -> SM
  // activation traffic), so a stage is refilled only when the consumers of both CTAs released it.
  const uint32_t crank = CL > 1 ? cluster_rank() : 0;
  if constexpr (CL > 1) cluster_sync(); else __syncthreads();

  if (wg == 0) {  // ---------------- producer ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGS));
    if (ctid == 0) {
      const int rows = (int)(p.mp - m0 < BT ? p.mp - m0 : BT);  // the operand holds Mp rows (zero padded)
      const uint32_t act_bytes = rows * 64, sa_bytes = rows * 4;
      const uint32_t wsb = FOLD ? EXP_BYTES : SW_BYTES;  // exponent bytes or float scales of the group
      const uint32_t bytes = act_bytes + sa_bytes + W_BYTES + wsb;
      for (int g = 0; g < G; ++g) {
        const int s = g % C::STAGES;
        const uint32_t st = smem_base + s * C::STAGE, fb = full_bar + s * 8;
        if constexpr (CL > 1) {
          if (g >= C::STAGES) mbar_wait_cluster(empty_bar + s * 8, ((g / C::STAGES) & 1) ^ 1);
          mbar_expect_tx(fb, bytes);  // both halves land here: ours and the peer's
          const uint32_t ha = act_bytes / 2, hs = sa_bytes / 2;
          bulk_g2s_mc(st + crank * ha, p.act + ((int64_t)g * p.mp + m0) * 64 + crank * ha, ha, fb, 0x3);
          bulk_g2s_mc(st + C::ACT_BYTES + W_BYTES + crank * hs,
                      reinterpret_cast<const uint8_t *>(p.sa + (int64_t)g * p.mp + m0) + crank * hs, hs, fb, 0x3);
        } else {
          if (g >= C::STAGES) mbar_wait(empty_bar + s * 8, ((g / C::STAGES) & 1) ^ 1);
          mbar_expect_tx(fb, bytes);
          bulk_g2s(st, p.act + ((int64_t)g * p.mp + m0) * 64, act_bytes, fb);
          bulk_g2s(st + C::ACT_BYTES + W_BYTES, p.sa + (int64_t)g * p.mp + m0, sa_bytes, fb);
        }
        bulk_g2s(st + C::ACT_BYTES, p.w + ((int64_t)nb * G + g) * W_BYTES, W_BYTES, fb);
        const void *wsrc = FOLD ? static_cast<const void *>(p.wexp + (int64_t)g * p.N + n0)
                                : static_cast<const void *>(p.sw + (int64_t)g * p.N + n0);
        bulk_g2s(st + C::ACT_BYTES + W_BYTES + C::SA_BYTES, wsrc, wsb, fb);
      }
    }
    if constexpr (CL > 1) cluster_sync();  // the peer may still arrive on our barriers
    return;
  }

  // ---------------- consumers ----------------
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS));
  const int c = wg - 1, w = ctid >> 5, l = ctid & 31, q = l & 3;
  const int rloc = c * 64 + 16 * w + (l >> 2);  // this thread's first row in the CTA tile (second: +8)
  constexpr int ND = BT / 2;    // accumulator registers per thread
  constexpr int HN = SUB / 2;   // registers of one wgmma result (SUB tokens)
  constexpr int NSUB = BT / SUB;
  float acc[ND];
#pragma unroll
  for (int i = 0; i < ND; ++i) acc[i] = 0.f;

  // group g's A fragments: wait for the stage, one 16-byte shared load, nibbles -> e4m3
  auto load_a = [&](int g, uint32_t (&a)[8]) {
    const int s = g % C::STAGES;
    mbar_wait(full_bar + s * 8, (g / C::STAGES) & 1);
    const uint8_t *st = smem + s * C::STAGE;
    const uint4 wv = *reinterpret_cast<const uint4 *>(st + C::ACT_BYTES + c * 2048 + ctid * 16);
    if constexpr (FOLD) {  // this group's exponents of the thread's two rows select their tables
      const uint8_t *ex = st + C::ACT_BYTES + W_BYTES + C::SA_BYTES;
      const uint4 *tab = reinterpret_cast<const uint4 *>(smem + C::TAB_OFF);
      const uint4 t0 = tab[ex[rloc]], t1 = tab[ex[rloc + 8]];
      nib8_lookup(wv.x, t0, t1, a[0], a[1]);
      nib8_lookup(wv.y, t0, t1, a[2], a[3]);
      nib8_lookup(wv.z, t0, t1, a[4], a[5]);
      nib8_lookup(wv.w, t0, t1, a[6], a[7]);
    } else {
      nib8_to_e4m3(wv.x, a[0], a[1]);
      nib8_to_e4m3(wv.y, a[2], a[3]);
      nib8_to_e4m3(wv.z, a[4], a[5]);
      nib8_to_e4m3(wv.w, a[6], a[7]);
    }
  };
  // t = the group's integer dots for token sub-tile u (both k32 steps), one commit group
  auto issue = [&](int g, int u, const uint32_t (&a)[8], float (&t)[HN]) {
    const uint32_t base = smem_base + (g % C::STAGES) * C::STAGE + u * (SUB / 8) * 512;
    wg_fence();
    wgmma::E4m3<SUB>::mma(t, a, make_desc(base, 128, 512), 0u);
    wgmma::E4m3<SUB>::mma(t, a + 4, make_desc(base + 256, 128, 512), 1u);
    wg_commit();
  };
  // The scales of item (g, u), loaded from shared memory before the wait that retires its wgmma, so the
  // promotion's fmas do not stall on the loads (ncu: short-scoreboard stalls on the fmas otherwise).
  struct Scales {
    float4 sa[SUB / 16];  // tokens 16j + {2q, 2q+1, 8+2q, 8+2q+1} of the sub-tile
    float sw0, sw1;       // the thread's two weight rows (unfolded only)
  };
  auto load_scales = [&](int g, int u, Scales &sc) {
    const uint8_t *st = smem + (g % C::STAGES) * C::STAGE;
    const float4 *sa4 = reinterpret_cast<const float4 *>(st + C::ACT_BYTES + W_BYTES) + u * (SUB / 4) + q;
#pragma unroll
    for (int j = 0; j < SUB / 16; ++j) sc.sa[j] = sa4[4 * j];
    if constexpr (!FOLD) {
      const float *sws = reinterpret_cast<const float *>(st + C::ACT_BYTES + W_BYTES + C::SA_BYTES);
      sc.sw0 = sws[rloc];
      sc.sw1 = sws[rloc + 8];
    }
  };
  // acc[tokens of sub-tile u] += t * sa * sw (after the wait that retired t's wgmma); FOLD: t already holds
  // dot * 2^-e, the channel scale is applied once in the epilogue, so one fma per element
  auto promote = [&](int u, float (&t)[HN], const Scales &sc) {
    reg_fence(t);
#pragma unroll
    for (int j = 0; j < SUB / 16; ++j) {
      const float4 v = sc.sa[j];
      float *A = acc + u * HN + 8 * j;
      const float *D = t + 8 * j;
      if constexpr (FOLD) {
        A[0] = __fmaf_rn(D[0], v.x, A[0]);
        A[1] = __fmaf_rn(D[1], v.y, A[1]);
        A[2] = __fmaf_rn(D[2], v.x, A[2]);
        A[3] = __fmaf_rn(D[3], v.y, A[3]);
        A[4] = __fmaf_rn(D[4], v.z, A[4]);
        A[5] = __fmaf_rn(D[5], v.w, A[5]);
        A[6] = __fmaf_rn(D[6], v.z, A[6]);
        A[7] = __fmaf_rn(D[7], v.w, A[7]);
      } else {
        const float sw0 = sc.sw0, sw1 = sc.sw1;
        A[0] = __fmaf_rn(D[0], v.x * sw0, A[0]);
        A[1] = __fmaf_rn(D[1], v.y * sw0, A[1]);
        A[2] = __fmaf_rn(D[2], v.x * sw1, A[2]);
        A[3] = __fmaf_rn(D[3], v.y * sw1, A[3]);
        A[4] = __fmaf_rn(D[4], v.z * sw0, A[4]);
        A[5] = __fmaf_rn(D[5], v.w * sw0, A[5]);
        A[6] = __fmaf_rn(D[6], v.z * sw1, A[6]);
        A[7] = __fmaf_rn(D[7], v.w * sw1, A[7]);
      }
    }
  };
  auto release = [&](int g) {
    __syncwarp();
    if (l == 0) {
      if constexpr (CL > 1) {
        mbar_arrive_remote(empty_bar + (g % C::STAGES) * 8, crank ^ 1);
        mbar_arrive_remote(empty_bar + (g % C::STAGES) * 8, crank);
      } else {
        mbar_arrive(empty_bar + (g % C::STAGES) * 8);
      }
    }
  };

  if constexpr (NSUB > 1 || PIPE) {
    // Software pipeline over (group, sub-tile) items, two result buffers: item i+1 is issued before item i
    // is waited for and promoted, so this warpgroup always has one wgmma in flight while it promotes.
    // Group g+1's A fragments are built while g's last item still reads its own (two register sets,
    // alternating by group; the loop is unrolled over two groups so every index is static).
    float buf[2][HN];
    uint32_t a0[8], a1[8];
    // group g: its item 0 is in flight in buf[p0]; retires all its items, issues the next group's first
    auto group = [&](int g, const uint32_t (&ac)[8], uint32_t (&an)[8], bool next, int p0) {
#pragma unroll
      for (int u = 0; u < NSUB; ++u) {
        const int cur = (p0 + u) & 1;
        Scales sc;
        if (u + 1 < NSUB) {
          issue(g, u + 1, ac, buf[cur ^ 1]);
          // the next group's A fragments while this group's wgmma run (group g-1's, which read `an`, retired)
          if (u == 0 && next) load_a(g + 1, an);
          load_scales(g, u, sc);
          wg_wait<1>();
        } else if (next) {
          if (NSUB == 1) load_a(g + 1, an);
          issue(g + 1, 0, an, buf[cur ^ 1]);
          load_scales(g, u, sc);
          wg_wait<1>();
        } else {
          load_scales(g, u, sc);
          wg_wait<0>();
        }
        promote(u, buf[cur], sc);
      }
      release(g);
    };
    load_a(0, a0);
    issue(0, 0, a0, buf[0]);
    int g = 0;
    for (; g + 2 < G; g += 2) {
      group(g, a0, a1, true, 0);
      group(g + 1, a1, a0, true, NSUB & 1);
    }
    if (G - g == 2) {
      group(g, a0, a1, true, 0);
      group(g + 1, a1, a0, false, NSUB & 1);
    } else {
      group(g, a0, a1, false, 0);
    }
  } else {
    // One wgmma pair over the whole token tile per group, waited for at once (the two consumer
    // warpgroups overlap each other only).
    float t[HN];
    uint32_t a[8];
    for (int g = 0; g < G; ++g) {
      load_a(g, a);
      issue(g, 0, a, t);
      Scales sc;
      load_scales(g, 0, sc);
      wg_wait<0>();
      promote(0, t, sc);
      release(g);
    }
  }

  if constexpr (FOLD) {
    const float c0 = p.wch[n0 + rloc], c1 = p.wch[n0 + rloc + 8];
#pragma unroll
    for (int i = 0; i < ND; ++i) acc[i] *= ((i >> 1) & 1) ? c1 : c0;
  }
  if (p.rank > 0) lowrank<BT, LT>(p, smem, acc, m0, n0, c, ctid);

  if constexpr (QUANT) {
    consumers_sync();  // all wgmma reads of the pipeline / low-rank memory are done
    gelu_quantize<BT, LT>(p, smem, acc, m0, n0, nb, c, ctid);
    return;
  }
  // ---------------- epilogue: bias, GELU, convert, stage transposed, write rows < M ----------------
  consumers_sync();  // all wgmma reads of the pipeline / low-rank memory are done
  store_tile<BT, BN, OUT_PAD>(smem, acc, p.bias, p.epilogue, p.out, p.out_dtype, p.ldo, p.M, m0, n0, rloc, q);
  if constexpr (CL > 1) cluster_sync();
#else
  __trap();  // sm_90a only; the host entry refuses other devices
#endif
}

template <int BT, typename LT, int SUB, int NSTAGES, int CL, bool FOLD, bool PIPE, bool QUANT = false>
int launch(const Params &p, cudaStream_t stream) {
  auto kern = w4a4_fp8_kernel<BT, LT, SUB, NSTAGES, CL, FOLD, PIPE, QUANT>;
  constexpr int SMEM = Cfg<BT, NSTAGES>::SMEM;
  static bool attr_set[64] = {};
  if (int rc = nl_smem_once(kern, SMEM, attr_set, "nl_w4a4_gemm_fp8")) return rc;
  dim3 grid(((p.M + BT - 1) / BT) * (p.N / BN));
  if constexpr (CL > 1) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(THREADS);
    cfg.dynamicSmemBytes = SMEM;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = CL;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    NL_CHECK_CUDA(cudaLaunchKernelEx(&cfg, kern, p), "nl_w4a4_gemm_fp8");
  } else {
    (void)nl_launch(kern, dim3(grid), dim3(THREADS), SMEM, stream, p);
  }
  NL_CHECK_LAUNCH("nl_w4a4_gemm_fp8");
  return NL_OK;
}

template <int BT, int SUB, int NSTAGES, int CL = 1, bool FOLD = false, bool PIPE = false, bool QUANT = false>
int dispatch_lora(const Params &p, int lora_dtype, cudaStream_t s) {
  return lora_dtype == NL_F16 ? launch<BT, __half, SUB, NSTAGES, CL, FOLD, PIPE, QUANT>(p, s)
                              : launch<BT, __nv_bfloat16, SUB, NSTAGES, CL, FOLD, PIPE, QUANT>(p, s);
}

// ---- weight repacking into the wgmma A-fragment order ----------------------------------------------------
// One thread per 16-byte unit (CTA weight tile nb, group g, warpgroup c, thread t = 32w + 4gq + q):
// word j = u16(row, 64g + 16j + 4q) | u16(row + 8, same k) << 16, row = 128nb + 64c + 16w + gq, where u16
// reads the 2 canonical bytes holding codes k..k+3.
__global__ void repack_sm90_kernel(const uint8_t *__restrict__ src, uint4 *__restrict__ dst, int64_t units, int K) {
  const int G = K / 64, half = K / 2;
  for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < units; u += (int64_t)gridDim.x * blockDim.x) {
    const int t = (int)(u & 127), c = (int)((u >> 7) & 1);
    const int64_t rest = u >> 8;
    const int g = (int)(rest % G);
    const int64_t nb = rest / G;
    const int w = t >> 5, gq = (t >> 2) & 7, q = t & 3;
    const int64_t row = nb * 128 + c * 64 + 16 * w + gq;
    const uint8_t *r0 = src + row * half, *r1 = src + (row + 8) * half;
    uint32_t word[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int b = (64 * g + 16 * j + 4 * q) / 2;
      word[j] = (uint32_t)(r0[b] | (r0[b + 1] << 8)) | ((uint32_t)(r1[b] | (r1[b + 1] << 8)) << 16);
    }
    dst[u] = make_uint4(word[0], word[1], word[2], word[3]);
  }
}

}  // namespace

extern "C" int nl_repack_weight_sm90(const uint8_t *qweight, int64_t N, int64_t K, uint8_t *packed, void *stream) {
  const char *k = "nl_repack_weight_sm90";
  NL_CHECK_ARG(N >= 128 && N % 128 == 0 && N < (1LL << 24), "%s: N=%lld must be a positive multiple of 128", k,
               (long long)N);
  NL_CHECK_ARG(K >= 64 && K % 64 == 0 && K < (1LL << 24), "%s: K=%lld must be a positive multiple of 64", k,
               (long long)K);
  NL_CHECK_ARG(qweight && nl_aligned(qweight, 16), "%s: qweight must be non-null and 16-byte aligned", k);
  NL_CHECK_ARG(packed && nl_aligned(packed, 16), "%s: packed must be non-null and 16-byte aligned", k);
  NL_CHECK_ARG(qweight != packed, "%s: in-place repacking is not supported", k);
  const int64_t units = N * K / 32;
  const int blocks = (int)((units + 255) / 256 < 65535 ? (units + 255) / 256 : 65535);
  repack_sm90_kernel<<<blocks, 256, 0, static_cast<cudaStream_t>(stream)>>>(qweight, reinterpret_cast<uint4 *>(packed),
                                                                           units, (int)K);
  NL_CHECK_LAUNCH(k);
  return NL_OK;
}

// The next layer's operand written by the GELU -> quantize epilogue (see gelu_quantize).
struct QuantOut {
  uint8_t *codes8; float *scales8; int64_t mp;
  const float *inv_smooth; float shift; int act_unsigned;
  const void *lora_down; int rank; float *lora_part;
};

// Argument checks and variant dispatch shared by the entry points (wexp != NULL: folded weights; qo != NULL:
// the GELU -> quantize epilogue instead of `out`).
static int gemm_fp8(const char *k, const uint8_t *act_codes8, const float *act_scales8, int64_t mp,
                    const uint8_t *w_packed, const float *w_scales, const float *w_chscale, const uint8_t *w_exp,
                    const float *lora_act, const void *lora_up, int lora_dtype, int rank, const float *bias,
                    void *out, int out_dtype, int64_t ldo, int64_t M, int64_t N, int64_t K, int epilogue,
                    void *stream, const QuantOut *qo = nullptr) {
  if (int rc = nl_check_sm90_gemm(k, M, N, mp, out_dtype, epilogue, bias, rank, lora_act, lora_up, lora_dtype))
    return rc;
  NL_CHECK_ARG(K >= 64 && K % 64 == 0 && K < (1LL << 24), "%s: K=%lld must be a positive multiple of 64", k,
               (long long)K);
  const int esz = out_dtype == NL_F32 ? 4 : 2;
  if (qo) {
    NL_CHECK_ARG(out_dtype != NL_F32, "%s: the GELU output is rounded to bf16 or fp16, not float32", k);
    NL_CHECK_ARG(qo->codes8 && nl_aligned(qo->codes8, 16) && qo->scales8 && nl_aligned(qo->scales8, 4),
                 "%s: next_codes8 (16-byte aligned) and next_scales8 must be non-null", k);
    NL_CHECK_ARG(qo->mp >= M && qo->mp % 256 == 0, "%s: next operand rows mp=%lld must be M rounded up to 256", k,
                 (long long)qo->mp);
    NL_CHECK_ARG(qo->rank >= 0 && qo->rank % 16 == 0 && qo->rank <= 64, "%s: next_rank=%d must be a multiple of "
                 "16 up to 64", k, qo->rank);
    NL_CHECK_ARG(qo->rank == 0 || (qo->lora_down && nl_aligned(qo->lora_down, 4) && qo->lora_part),
                 "%s: next_lora_down and next_lora_part must be non-null for next_rank > 0", k);
  } else {
    NL_CHECK_ARG(ldo >= N && (ldo * esz) % 16 == 0,
                 "%s: out row stride %lld must be >= N and a multiple of 16 bytes", k, (long long)ldo);
  }
  NL_CHECK_ARG(act_codes8 && nl_aligned(act_codes8, 16), "%s: act_codes8 must be non-null and 16-byte aligned", k);
  NL_CHECK_ARG(act_scales8 && nl_aligned(act_scales8, 16), "%s: act_scales8 must be non-null and 16-byte aligned",
               k);
  NL_CHECK_ARG(w_packed && nl_aligned(w_packed, 16), "%s: w_packed must be non-null and 16-byte aligned", k);
  if (w_exp) {
    NL_CHECK_ARG(nl_aligned(w_exp, 16), "%s: w_exp must be 16-byte aligned", k);
    NL_CHECK_ARG(w_chscale && nl_aligned(w_chscale, 4), "%s: w_chscale must be non-null and 4-byte aligned", k);
  } else {
    NL_CHECK_ARG(w_scales && nl_aligned(w_scales, 16), "%s: w_scales must be non-null and 16-byte aligned", k);
  }
  NL_CHECK_ARG(qo || (out && nl_aligned(out, 16)), "%s: out must be non-null and 16-byte aligned", k);
  const int rc = nl_check_sm90(k);
  if (rc) return rc;
  Params p{act_codes8, act_scales8, mp, w_packed, w_scales, lora_act, lora_up, rank, bias, out, out_dtype, ldo,
           epilogue, (int)M, (int)N, (int)K, 0, w_chscale, w_exp};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (qo) {  // the default tile only (the epilogue is written for 128 tokens x 128 rows)
    p.q_codes = qo->codes8; p.q_scales = qo->scales8; p.q_mp = qo->mp; p.q_inv_smooth = qo->inv_smooth;
    p.q_shift = qo->shift; p.q_unsigned = qo->act_unsigned; p.q_down = qo->lora_down; p.q_rank = qo->rank;
    p.q_part = qo->lora_part; p.epilogue = NL_EPI_GELU_TANH; p.raster = DEFAULT_RASTER;
    return w_exp ? dispatch_lora<128, 64, 10, 1, true, false, true>(p, lora_dtype, s)
                 : dispatch_lora<128, 64, 10, 1, false, false, true>(p, lora_dtype, s);
  }
  // Variants (read at every call, for tests and benchmarks): NUNCHAKU_LITE_WGMMA_BT = tokens per CTA (128,
  // 192, 256), NUNCHAKU_LITE_WGMMA_SUB = tokens per wgmma (64: pipelined sub-tiles; = BT: one wgmma pair per
  // group, unpipelined unless NUNCHAKU_LITE_WGMMA_PIPE=1), NUNCHAKU_LITE_WGMMA_STAGES = 16 (deeper ring,
  // 128-token pipelined tile only), NUNCHAKU_LITE_WGMMA_RASTER = 0 | 1 (CTA order). Folded weights: BT 128
  // with SUB 64 (default) or SUB 128 pipelined.
  const char *env_bt = getenv("NUNCHAKU_LITE_WGMMA_BT"), *env_sub = getenv("NUNCHAKU_LITE_WGMMA_SUB");
  const char *env_st = getenv("NUNCHAKU_LITE_WGMMA_STAGES"), *env_r = getenv("NUNCHAKU_LITE_WGMMA_RASTER");
  const char *env_pipe = getenv("NUNCHAKU_LITE_WGMMA_PIPE");
  const int bt = env_bt ? atoi(env_bt) : DEFAULT_BT, sub = env_sub ? atoi(env_sub) : 64;
  const int stages = env_st ? atoi(env_st) : DEFAULT_STAGES;
  const bool pipe = env_pipe && atoi(env_pipe) != 0;
  p.raster = env_r ? atoi(env_r) != 0 : DEFAULT_RASTER;
  if (w_exp) {
    return sub == 128 ? dispatch_lora<128, 128, 10, 1, true, true>(p, lora_dtype, s)
                      : dispatch_lora<128, 64, 10, 1, true, false>(p, lora_dtype, s);
  }
  const char *env_cl = getenv("NUNCHAKU_LITE_WGMMA_CLUSTER");  // 2: activation multicast over CTA pairs
  const int cl = env_cl ? atoi(env_cl) : DEFAULT_CLUSTER;
  if (cl == 2 && (N / BN) % 2 == 0 && sub == 64 && (bt == 128 || bt == 192)) {
    p.raster = 1;  // cluster = two neighbouring weight tiles of one token tile
    return bt == 192 ? dispatch_lora<192, 64, 10, 2>(p, lora_dtype, s) : dispatch_lora<128, 64, 10, 2>(p, lora_dtype, s);
  }
  if (bt == 256) return dispatch_lora<256, 64, 8>(p, lora_dtype, s);
  if (bt == 192) return sub == 192 ? dispatch_lora<192, 192, 10>(p, lora_dtype, s) : dispatch_lora<192, 64, 10>(p, lora_dtype, s);
  if (sub == 128) return pipe ? dispatch_lora<128, 128, 10, 1, false, true>(p, lora_dtype, s)
                              : dispatch_lora<128, 128, 10>(p, lora_dtype, s);
  return stages == 16 ? dispatch_lora<128, 64, 16>(p, lora_dtype, s) : dispatch_lora<128, 64, 10>(p, lora_dtype, s);
}

extern "C" int nl_w4a4_gemm_fp8(const uint8_t *act_codes8, const float *act_scales8, int64_t mp,
                                const uint8_t *w_packed, const float *w_scales, const float *lora_act,
                                const void *lora_up, int lora_dtype, int rank, const float *bias, void *out,
                                int out_dtype, int64_t ldo, int64_t M, int64_t N, int64_t K, int epilogue,
                                void *stream) {
  return gemm_fp8("nl_w4a4_gemm_fp8", act_codes8, act_scales8, mp, w_packed, w_scales, nullptr, nullptr, lora_act,
                  lora_up, lora_dtype, rank, bias, out, out_dtype, ldo, M, N, K, epilogue, stream);
}

extern "C" int nl_w4a4_gemm_fp8_pow2(const uint8_t *act_codes8, const float *act_scales8, int64_t mp,
                                     const uint8_t *w_packed, const float *w_chscale, const uint8_t *w_exp,
                                     const float *lora_act, const void *lora_up, int lora_dtype, int rank,
                                     const float *bias, void *out, int out_dtype, int64_t ldo, int64_t M, int64_t N,
                                     int64_t K, int epilogue, void *stream) {
  const char *k = "nl_w4a4_gemm_fp8_pow2";
  NL_CHECK_ARG(w_exp, "%s: w_exp must be non-null", k);
  return gemm_fp8(k, act_codes8, act_scales8, mp, w_packed, nullptr, w_chscale, w_exp, lora_act, lora_up,
                  lora_dtype, rank, bias, out, out_dtype, ldo, M, N, K, epilogue, stream);
}

extern "C" int nl_w4a4_gemm_fp8_gelu_quantize(const uint8_t *act_codes8, const float *act_scales8, int64_t mp,
                                              const uint8_t *w_packed, const float *w_scales, const float *w_chscale,
                                              const uint8_t *w_exp, const float *lora_act, const void *lora_up,
                                              int rank, const float *bias, int dtype, int64_t M, int64_t N,
                                              int64_t K, const float *next_inv_smooth, float next_shift,
                                              int next_unsigned, const void *next_lora_down, int next_rank,
                                              uint8_t *next_codes8, float *next_scales8, int64_t next_mp,
                                              float *next_lora_part, void *stream) {
  const char *k = "nl_w4a4_gemm_fp8_gelu_quantize";
  NL_CHECK_ARG(dtype == NL_BF16 || dtype == NL_F16, "%s: dtype code %d is not bf16/fp16", k, dtype);
  NL_CHECK_ARG(!next_inv_smooth || nl_aligned(next_inv_smooth, 4), "%s: next_inv_smooth must be 4-byte aligned",
               k);
  const QuantOut qo{next_codes8, next_scales8, next_mp, next_inv_smooth, next_shift, next_unsigned, next_lora_down,
                    next_rank, next_lora_part};
  return gemm_fp8(k, act_codes8, act_scales8, mp, w_packed, w_exp ? nullptr : w_scales, w_chscale, w_exp,
                  lora_act, lora_up, dtype, rank, bias, nullptr, dtype, N, M, N, K, NL_EPI_GELU_TANH, stream, &qo);
}
