// W4A4 GEMM for Hopper (sm_90a) with power-of-two scales on both operands: one int8 wgmma accumulation over all
// of K, no per-group promotion; low-rank-up + bias (+ GELU tanh) epilogue.
//
// Math (reference quant/ops.py w4a4_linear on layers with power-of-two weight scales and act_pow2):
//   weight group scales      sw[n, g] = c[n] * 2^-ew[n, g]   0 <= ew <= 4   (ops.quantize_weight(pow2=True))
//   activation group scales  sa[m, g] = s[m] * 2^-ea[m, g]   0 <= ea <= 4   (ops.quantize_act(pow2=True))
//   sum_g sa sw dot_g = (c[n] / 16) * (s[m] / 16) * sum_k W8[n, k] X8[m, k]
//   with W8 = wcode << (4 - ew) (int8, -128..112) and X8 = acode << (4 - ea) (int8, or uint8 0..240 for
//   unsigned layers): every product is an integer, so the int32 accumulator holds the exact sum over all of K
//   (|sum| <= K * 128 * 240 < 2^31 for K <= 65536) and the fp32 output needs one conversion and one scaling:
//   out[m, n] = act( float(acc) * (tscale[m] * wscale[n]) + lora_act[m, :] . lora_up[n, :] + bias[n] ),
//   tscale = s / 16 (ops.pack_act_s8_tiles), wscale = c / 16. Agrees with the reference's in-order fp32 group
//   sum to ~1e-6 relative (it is closer to the exact value than the reference is).
// Why: the per-group promotion of the fp8 kernel (nl_w4a4_gemm_fp8[_pow2]) costs as many issue slots as the
// tensor core's time; with both scales folded the main loop is a plain 8-bit GEMM whose consumer warps only
// convert weight nibbles (11 ALU ops per 8 codes, once per 64 x BT x 64 MACs).
// Transposed product, as the fp8 kernel: wgmma's M = weight rows (64 per consumer warpgroup), N = tokens (the
// whole BT-token tile), K = 32 per instruction (two per group); thread (warp w, lane l) of a consumer holds
// rows n = 16w + l/4 (+8) and tokens 8j + 2(l%4) + {0,1}, j < BT/8.
// Operands (per pipeline stage three 1-D bulk copies, no tensor maps):
//   activations  bytes8 uint8 [K/64, Mp, 64]: the NL_ACT_S8_TILES layout (ops.pack_act_s8_tiles; the core-
//                matrix order of NL_ACT_FP8_TILES), read by wgmma from shared memory (no-swizzle K-major
//                descriptor: LBO = 128 B, SBO = 512 B); tscale float [Mp] in the 16-token permutation of the fp8
//                scales (one 16-byte load gives a thread's four tokens of a 16-token block).
//   weights      4-bit, nl_repack_weight_sm90 order (ops.pack_weight_wgmma): one conflict-free 16-byte shared
//                load per thread and group; exponents uint8 [K/64, N] (128 bytes per stage), channel scale
//                float [N] (c, read in the epilogue).
// Nibble -> int8 in registers: sm90.cuh nib8_lookup with per-row tables of code << (4 - e) (one 16-byte table
// per exponent in shared memory, selected by the row's exponent byte of the group).
// CTA: 3 warpgroups, as the fp8 kernel. Warpgroup 0 = producer (one thread issues the bulk copies into a
// STAGES-deep ring with full/empty mbarriers, setmaxnreg gives its registers away). Warpgroups 1 and 2 =
// consumers, 64 of the CTA's BN = 128 weight rows each against the same BT tokens. Main loop per group: wait for
// the stage, convert the A fragments (two register sets, alternating), two wgmma into the int32 accumulator,
// commit, then wait until only this group is in flight and release the previous group's stage.
// Epilogue: int32 -> fp32 scaled in place, the low-rank wgmma accumulates into the same registers
// (sm90.cuh lowrank_into), bias, GELU, conversion, transposed staging in shared memory, 16-byte row stores
// (rows >= M never written); optionally the stores add into out (NL_EPI_ACCUMULATE: out.add_(result)'s
// roundings), and each consumer thread reduces one staged token row into the next layer's power-of-two token
// scale (sm90.cuh token_scale_of_rows, next_token_scale: an atomic maximum per token and tile).
// Prefetched epilogue operands (PRE: 256-token tiles, 0 < rank <= 32, K <= PRE_MAX_K by default): warps 1-3 of
// the producer warpgroup, idle otherwise, put the tile's tscale, channel scales, bias, lora_up rows and lora_act
// (split into the 16-bit hi + lo halves the low-rank wgmma reads) into shared memory of their own while the
// consumers run the main loop (prefetch_epilogue, signalled by an mbarrier), so the epilogue starts without
// global loads. They work within the producer's 24 registers (one load in flight each), so the consumers keep
// their 240. Still, this kernel's main loop is 8-15% slower than the plain one's (H100, cause open; 56 / 224
// registers cost about as much, bench/results/h100-2026-12-07h and -08), so it runs where the prefetched
// low-rank operands repay that: 4.8-5.7% faster per call at K = 3072 (want_prefetch).
// Work split: one CTA per tile (the kernel above), or, where that leaves many SMs idle on a long K (a first
// or second round of tiles that fills at most SK_FILL of the SMs, K >= 64 * SK_MIN_GROUPS: 48 or 144 tiles
// on 132 SMs), stream-K (w4a4_s8_sk_kernel): a persistent grid of n <= SMs CTAs, one per SM, CTA c taking the
// run [c U / n, (c + 1) U / n) of the U tile-major (tile, group) units. A tile is thereby split between
// consecutive CTAs; the later ones hand their int32 partial sums (exact) to the first, which holds the
// tile's first groups at the end of its run, through a workspace (flags, then one slot per CTA), and the
// first adds them and runs the epilogue. Integer sums: split and whole-tile results are bit-identical. The
// producer runs on into the next segment's stages while the consumers do an epilogue, so the epilogue has
// shared memory of its own (7 stages instead of 8, 16-bit outputs only).
// Shapes: N % 128 == 0, K % 64 == 0 and K <= 65536, M >= 1, Mp = M rounded up to 256, rank % 16 == 0.
#include "common.cuh"
#include <algorithm>
#include <climits>
#include <stdlib.h>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NL_SM90A 1
#include "sm90.cuh"
#endif

namespace {

constexpr int BN = 128;           // weight rows per CTA (two consumer warpgroups x 64)
constexpr int THREADS = 384;      // producer warpgroup + 2 consumer warpgroups
constexpr int W_BYTES = BN * 32;  // 4-bit weights of one group for the CTA
constexpr int EXP_BYTES = BN;     // one exponent byte per weight row and group
constexpr int MAX_EXP = 4;        // code << (4 - e) fits 8 bits (quant/ops.py POW2_MAX_EXP)
constexpr int MAX_K = 65536;      // int32 accumulator bound (see the math)
constexpr int LRC = 64;           // rank chunk of the low-rank epilogue
constexpr int OUT_PAD = 8;        // staging row padding (elements)
constexpr int DEFAULT_BT = 256, DEFAULT_STAGES = 8;
// stream-K (w4a4_s8_sk_kernel; measured on an H200, bench/results/h200-2026-12-07e: 1.45x at 144 tiles with
// K = 12288 / 15360, slower at 144 tiles with K = 3072 and at 432 tiles)
constexpr int SK_BT = 256, SK_STAGES = 7;
constexpr int SK_LRC = 32;           // low-rank chunk (the epilogue memory is the staging tile's)
constexpr float SK_FILL = 0.75f;     // split when whole tiles fill at most this much of the rounds' SM time,
constexpr int SK_MAX_ROUNDS = 2;     // take at most this many rounds,
constexpr int SK_MIN_GROUPS = 96;    // and K has at least this many groups
constexpr int MIN_SK_UNITS = 8;      // (tile, group) units per CTA at least
constexpr int SK_FLAGS = 1024;       // workspace: SK_FLAGS hand-over flags (zero), then the partial sums
constexpr int PRE_MAX_K = 4096;      // prefetched epilogue operands by default up to this K (see the header)

// Where the helper warps put a tile's epilogue operands (prefetch_epilogue; 256-token tiles): lora_act as
// 16-bit hi + lo halves in lowrank_tile_offset<PRE_LRC> order (rank <= PRE_LRC), lora_up rows [BN x rank]
// (16-bit), tscale [BT], channel scales [BN], bias [BN] (0 without).
constexpr int PRE_LRC = 32;
template <int BT>
struct Pre {
  enum : int { HI = 0, LO = BT * PRE_LRC * 2, UP = 2 * BT * PRE_LRC * 2, TS = UP + BN * PRE_LRC * 2, WCH = TS + BT * 4,
               BIAS = WCH + BN * 4, END = BIAS + BN * 4 };
};

template <int BT, int NSTAGES, bool PRE = false>
struct Cfg {
  static constexpr int ACT_BYTES = BT * 64;
  static constexpr int STAGE = ACT_BYTES + W_BYTES + EXP_BYTES;  // multiple of 128
  static constexpr int STAGES = NSTAGES;
  static constexpr int PIPE = STAGES * STAGE;
  static constexpr int EPI_OUT = BT * (BN + OUT_PAD) * 4;  // fp32 staging (largest)
  static constexpr int EPI_LR = 2 * BT * LRC * 2;          // hi + lo 16-bit
  static constexpr int PRE_OFF = PIPE;                                // Pre<BT> (PRE only)
  static constexpr int BAR_OFF = PRE_OFF + (PRE ? Pre<BT>::END : 0);  // ring barriers (PRE: then lr_full)
  static constexpr int TAB_OFF = BAR_OFF + (2 * STAGES + (PRE ? 2 : 0)) * 8;  // int8 tables, 16 B per exponent
  static constexpr int SMEM = TAB_OFF + 16 * (MAX_EXP + 1) + 128;  // + slack
  static_assert(PIPE >= EPI_OUT && PIPE >= EPI_LR, "epilogue staging must fit in the pipeline memory");
  static_assert(TAB_OFF % 16 == 0, "the nibble tables are read as uint4");
  static_assert(SMEM <= 227 * 1024, "shared memory per block");
  static_assert(STAGE % 128 == 0, "stage alignment");
};

struct Params {
  const uint8_t *act; const float *tscale; int64_t mp;
  const uint8_t *w; const uint8_t *wexp; const float *wch;
  const float *lora_act; const void *lora_up; int rank;
  const float *bias; void *out; int out_dtype; int64_t ldo; int epilogue;
  int M, N, K;
  int raster;  // CTA order: 0 = token tile fastest, 1 = weight tile fastest
};
// (Params stays at 128 bytes: one more field (136) made nvcc compile the epilogue's per-dtype store loop
// without unswitching it (PTX: 1471 branches instead of 455) and the one-tile kernel 15-35% slower (H100 and
// H200, 2026-12-07). The stream-K workspace is therefore a kernel argument of its own.)
static_assert(sizeof(Params) <= 128, "see above");

struct SkCfg {  // the stream-K kernel's shared memory: ring, epilogue staging, barriers, tables
  static constexpr int ACT_BYTES = SK_BT * 64;
  static constexpr int STAGE = ACT_BYTES + W_BYTES + EXP_BYTES;
  static constexpr int STAGES = SK_STAGES;
  static constexpr int PIPE = STAGES * STAGE;
  static constexpr int EPI_OUT = SK_BT * (BN + OUT_PAD) * 2;  // 16-bit staging
  static constexpr int EPI_LR = 2 * SK_BT * SK_LRC * 2;       // hi + lo 16-bit
  static constexpr int EPI_OFF = PIPE;
  static constexpr int BAR_OFF = EPI_OFF + (EPI_OUT > EPI_LR ? EPI_OUT : EPI_LR);
  static constexpr int TAB_OFF = BAR_OFF + 2 * STAGES * 8;
  static constexpr int SMEM = TAB_OFF + 16 * (MAX_EXP + 1) + 128;
  static_assert(SMEM <= 227 * 1024, "shared memory per block");
  static_assert(STAGE % 128 == 0 && EPI_OFF % 128 == 0, "stage alignment");
};

#ifdef NL_SM90A
// The ring's mbarriers (one release per consumer warp) and the nibble tables: byte 16e + b =
// int8((b < 8 ? b : b - 16) << (4 - e)), the word order of nib8_lookup; then a CTA barrier.
template <typename C>
__device__ __forceinline__ void setup_ring_and_tables(uint8_t *smem, uint32_t full_bar, uint32_t empty_bar) {
  sm90::init_ring(full_bar, empty_bar, C::STAGES, 8);
  uint8_t *tab = smem + C::TAB_OFF;
  for (int i = threadIdx.x; i < 16 * (MAX_EXP + 1); i += THREADS) {
    const int b = i & 15, code = b < 8 ? b : b - 16;
    tab[i] = (uint8_t)(code * (1 << (MAX_EXP - (i >> 4))));
  }
  __syncthreads();
}

// Consumer main loop over groups 0 .. ng - 1 of a tile (or of a stream-K segment), which are ring uses u0 ..
// u0 + ng - 1: per group wait for the stage, one 16-byte shared load of weight nibbles -> int8 A fragments by
// the rows' tables (two register sets, alternating), two wgmma into acc, commit. Group g is issued while g - 1
// still runs (g - 2, which read the same register set, has retired); each stage is released once its wgmma
// are done.
template <typename C, int BT, bool UNS, typename RingUse>
__device__ __forceinline__ void consume_groups(int (&acc)[BT / 2], int ng, RingUse u0, const uint8_t *smem,
                                               uint32_t smem_base, uint32_t full_bar, uint32_t empty_bar,
                                               const uint4 *tab, int c, int ctid, int rloc) {
  using namespace sm90;
  const int l = ctid & 31;
  auto load_a = [&](int g, uint32_t (&a)[8]) {
    const RingUse u = u0 + g;
    const int s = u % C::STAGES;
    mbar_wait(full_bar + s * 8, (u / C::STAGES) & 1);
    const uint8_t *st = smem + s * C::STAGE;
    const uint4 wv = *reinterpret_cast<const uint4 *>(st + C::ACT_BYTES + c * 2048 + ctid * 16);
    const uint8_t *ex = st + C::ACT_BYTES + W_BYTES;
    const uint4 t0 = tab[ex[rloc]], t1 = tab[ex[rloc + 8]];
    nib8_lookup(wv.x, t0, t1, a[0], a[1]);
    nib8_lookup(wv.y, t0, t1, a[2], a[3]);
    nib8_lookup(wv.z, t0, t1, a[4], a[5]);
    nib8_lookup(wv.w, t0, t1, a[6], a[7]);
  };
  auto issue = [&](int g, const uint32_t (&a)[8]) {
    const uint32_t base = smem_base + ((u0 + g) % C::STAGES) * C::STAGE;
    wg_fence();
    wgmma::S8<BT, UNS>::mma(acc, a, make_desc(base, 128, 512));
    wgmma::S8<BT, UNS>::mma(acc, a + 4, make_desc(base + 256, 128, 512));
    wg_commit();
  };
  auto release = [&](int g) {
    __syncwarp();
    if (l == 0) mbar_arrive(empty_bar + ((u0 + g) % C::STAGES) * 8);
  };
  uint32_t a0[8], a1[8];
  load_a(0, a0);
  issue(0, a0);
  int g = 1;
  for (; g + 1 < ng; g += 2) {
    load_a(g, a1);
    issue(g, a1);
    wg_wait<1>();
    release(g - 1);
    load_a(g + 1, a0);
    issue(g + 1, a0);
    wg_wait<1>();
    release(g);
  }
  if (g < ng) {
    load_a(g, a1);
    issue(g, a1);
    wg_wait<1>();
    release(g - 1);
    ++g;
  }
  wg_wait<0>();
  reg_fence(acc);
  release(ng - 1);
}

// int32 sums -> fp32, scaled by tscale[m] * wch[n] / 16 (accumulator layout: tokens 16j + {2q, 2q+1} in
// (x, y) and 16j + 8 + {2q, 2q+1} in (z, w) of the thread's float4 of 16-token block j). wch: the tile's first
// row's channel scale; ts_tile: its first token's tscale (16-token permutation), of which `valid` tokens exist
// (global memory holds Mp, a multiple of 256, and a 192-token tile may reach past it: those tokens are never
// stored); both in global or (PRE) shared memory.
template <int BT>
__device__ __forceinline__ void scale_sums(float (&f)[BT / 2], const int (&acc)[BT / 2], const float *wch,
                                           const float *ts_tile, int64_t valid, int rloc, int q) {
  const float w0 = wch[rloc] * (1.f / 16), w1 = wch[rloc + 8] * (1.f / 16);
  const float4 *ts = reinterpret_cast<const float4 *>(ts_tile) + q;
#pragma unroll
  for (int j = 0; j < BT / 16; ++j) {
    const float4 v = 16 * j < valid ? ts[4 * j] : make_float4(0.f, 0.f, 0.f, 0.f);
    const int *A = acc + 8 * j;
    float *F = f + 8 * j;
    F[0] = (float)A[0] * (v.x * w0);
    F[1] = (float)A[1] * (v.y * w0);
    F[2] = (float)A[2] * (v.x * w1);
    F[3] = (float)A[3] * (v.y * w1);
    F[4] = (float)A[4] * (v.z * w0);
    F[5] = (float)A[5] * (v.w * w0);
    F[6] = (float)A[6] * (v.z * w1);
    F[7] = (float)A[7] * (v.w * w1);
  }
}

// The helper warps' part of a tile's epilogue (warps 1-3 of the producer warpgroup, hid = 0..95), run while the
// consumers are in the main loop: tscale, channel scales, bias and lora_up rows copied into shared memory at
// the Pre<BT> offsets, lora_act [tokens x rank] fp32 split there into its 16-bit hi + lo halves (tokens >= M as
// 0), as lowrank_into splits it. One 16-byte load in flight per thread: the helpers run on the producer
// warpgroup's 24 registers, so that the consumers keep their 240. Needs rank <= PRE_LRC, Mp >= m0 + BT and
// 16-byte aligned tscale, channel scales, bias and lora_up (want_prefetch and the entry's checks).
template <typename LT, int BT>
__device__ __forceinline__ void prefetch_epilogue(uint8_t *pre, const Params &p, int m0, int n0, int hid) {
  using L = Pre<BT>;
  constexpr int NH = 96;
  auto copy = [&](int off, const void *src, int n16) {
#pragma unroll 1
    for (int i = hid; i < n16; i += NH)
      reinterpret_cast<uint4 *>(pre + off)[i] = src ? __ldg(reinterpret_cast<const uint4 *>(src) + i)
                                                    : make_uint4(0, 0, 0, 0);
  };
  copy(L::TS, p.tscale + m0, BT / 4);
  copy(L::WCH, p.wch + n0, BN / 4);
  copy(L::BIAS, p.bias ? p.bias + n0 : nullptr, BN / 4);
  const int rank = p.rank;
  if (rank == 0) return;
  copy(L::UP, static_cast<const LT *>(p.lora_up) + (int64_t)n0 * rank, BN * rank / 8);
  const float4 *act = reinterpret_cast<const float4 *>(p.lora_act + (int64_t)m0 * rank);
  const int qpr = rank / 4, total = min(BT, p.M - m0) * qpr;  // quads of the tile's rows that exist
#pragma unroll 1
  for (int i = hid; i < BT * qpr; i += NH) {
    const int t = i / qpr, k = (i - t * qpr) * 4;
    const float4 v = i < total ? __ldg(act + i) : make_float4(0.f, 0.f, 0.f, 0.f);
    const uint32_t h0 = pack2<LT>(v.x, v.y), h1 = pack2<LT>(v.z, v.w);
    const float2 f0 = unpack2<LT>(h0), f1 = unpack2<LT>(h1);
    const uint32_t l0 = pack2<LT>(v.x - f0.x, v.y - f0.y), l1 = pack2<LT>(v.z - f1.x, v.w - f1.y);
    const int off = sm90::lowrank_tile_offset<PRE_LRC>(t, k);
    *reinterpret_cast<uint2 *>(pre + L::HI + off) = make_uint2(h0, h1);
    *reinterpret_cast<uint2 *>(pre + L::LO + off) = make_uint2(l0, l1);
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // generic writes -> wgmma reads
}
#endif

// PRE (256-token tiles, rank <= PRE_LRC): warps 1-3 of the producer warpgroup prefetch the epilogue's operands
// into shared memory of their own during the main loop (prefetch_epilogue, then one arrival each on lr_full),
// so the epilogue starts without global loads; the staging still uses the pipeline memory.
template <int BT, typename LT, bool UNS, int NSTAGES, bool PRE>
__global__ void __launch_bounds__(THREADS, 1) w4a4_s8_kernel(const Params p, const NextScale ns) {
  pdl_trigger();  // launched by nl_launch: see common.cuh
  pdl_wait();
#ifdef NL_SM90A
  using namespace sm90;
  using C = Cfg<BT, NSTAGES, PRE>;
  static_assert(!PRE || BT == 256, "prefetched epilogue operands: 256-token tiles");
  constexpr int PRODUCER_REGS = 24, CONSUMER_REGS = 240;  // setmaxnreg: 128*24 + 256*240 <= 64K registers
  constexpr int ND = BT / 2;                              // accumulator registers per thread
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint32_t smem_base = smem_u32(smem);
  const uint32_t full_bar = smem_base + C::BAR_OFF, empty_bar = full_bar + C::STAGES * 8;
  const uint32_t lr_full = empty_bar + C::STAGES * 8;  // PRE: the helpers' operands are in place
  const int wg = threadIdx.x >> 7, ctid = threadIdx.x & 127;
  const CtaTile tile = cta_tile<BT, BN>(p.M, p.N, p.raster);
  const int m0 = tile.m0, nb = tile.nb, n0 = tile.n0;
  const int G = p.K / 64;

  if (PRE && threadIdx.x == 0) mbar_init(lr_full, 3);  // one arrival per helper warp
  setup_ring_and_tables<C>(smem, full_bar, empty_bar);  // (its fence and barrier cover lr_full)

  if (wg == 0) {  // ---------------- producer (PRE: and helpers) ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGS));
    if (PRE && ctid >= 32) {
      prefetch_epilogue<LT, BT>(smem + C::PRE_OFF, p, m0, n0, ctid - 32);
      __syncwarp();
      if ((ctid & 31) == 0) mbar_arrive(lr_full);
    }
    if (ctid == 0) {
      const int rows = (int)(p.mp - m0 < BT ? p.mp - m0 : BT);  // the operand holds Mp rows (zero padded)
      const uint32_t act_bytes = rows * 64, bytes = act_bytes + W_BYTES + EXP_BYTES;
      for (int g = 0; g < G; ++g) {
        const int s = g % C::STAGES;
        const uint32_t st = smem_base + s * C::STAGE, fb = full_bar + s * 8;
        if (g >= C::STAGES) mbar_wait(empty_bar + s * 8, ((g / C::STAGES) & 1) ^ 1);
        mbar_expect_tx(fb, bytes);
        bulk_g2s(st, p.act + ((int64_t)g * p.mp + m0) * 64, act_bytes, fb);
        bulk_g2s(st + C::ACT_BYTES, p.w + ((int64_t)nb * G + g) * W_BYTES, W_BYTES, fb);
        bulk_g2s(st + C::ACT_BYTES + W_BYTES, p.wexp + (int64_t)g * p.N + n0, EXP_BYTES, fb);
      }
    }
    return;
  }

  // ---------------- consumers ----------------
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS));
  const int c = wg - 1, w = ctid >> 5, l = ctid & 31, q = l & 3;
  const int rloc = c * 64 + 16 * w + (l >> 2);  // this thread's first row in the CTA tile (second: +8)
  const uint4 *tab = reinterpret_cast<const uint4 *>(smem + C::TAB_OFF);
  int acc[ND];
#pragma unroll
  for (int i = 0; i < ND; ++i) acc[i] = 0;

  consume_groups<C, BT, UNS>(acc, G, 0, smem, smem_base, full_bar, empty_bar, tab, c, ctid, rloc);

  // ---------------- epilogue ----------------
  float f[ND];
  if constexpr (PRE) {
    using L = Pre<BT>;
    const uint8_t *pre = smem + C::PRE_OFF;
    mbar_wait(lr_full, 0);
    scale_sums<BT>(f, acc, reinterpret_cast<const float *>(pre + L::WCH), reinterpret_cast<const float *>(pre + L::TS),
                   BT, rloc, q);
    if (p.rank > 0) lowrank_from_smem<BT, LT, PRE_LRC>(f, pre + L::HI, pre + L::LO, pre + L::UP, p.rank, rloc, l);
    const float *bias = reinterpret_cast<const float *>(pre + L::BIAS);
    const float b0 = bias[rloc], b1 = bias[rloc + 8];
    consumers_sync();  // all wgmma reads of the pipeline memory are done
    store_tile<BT, BN, OUT_PAD>(smem, f, b0, b1, p.epilogue, p.out, p.out_dtype, p.ldo, p.M, m0, n0, rloc, q, ns);
  } else {
    scale_sums<BT>(f, acc, p.wch + n0, p.tscale + m0, p.mp - m0, rloc, q);
    if (p.rank > 0)
      lowrank_into<BT, LT, LRC>(smem, f, p.lora_act + (int64_t)m0 * p.rank, min(BT, p.M - m0),
                                static_cast<const LT *>(p.lora_up) + (int64_t)(n0 + c * 64) * p.rank, p.rank, ctid);
    consumers_sync();  // all wgmma reads of the pipeline / low-rank memory are done
    store_tile<BT, BN, OUT_PAD>(smem, f, p.bias, p.epilogue, p.out, p.out_dtype, p.ldo, p.M, m0, n0, rloc, q, ns);
  }
#else
  __trap();  // sm_90a only; the host entry refuses other devices
#endif
}

#ifdef NL_SM90A
// Stream-K hand-over flags (gpu scope).
__device__ __forceinline__ int ld_acquire(const int *p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release(int *p, int v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

// This CTA's run [c U / n, (c + 1) U / n) of the U tile-major (tile, group) units, segment by segment: tile t,
// groups g0 .. g0 + ng - 1 (the host keeps U below 2^31).
struct Run {
  int v, end, G;
  __device__ Run(int G_, int64_t U) : G(G_) {
    v = (int)((int64_t)blockIdx.x * U / gridDim.x);
    end = (int)(((int64_t)blockIdx.x + 1) * U / gridDim.x);
  }
  __device__ bool next(int &t, int &g0, int &ng) {
    if (v >= end) return false;
    t = v / G, g0 = v % G, ng = min(G - g0, end - v);
    v += ng;
    return true;
  }
};
#endif

// The stream-K form of w4a4_s8_kernel (see the header): the same main loop and epilogue per segment, the ring
// carried from segment to segment (group g0 + i of a segment is ring use u0 + i), the epilogue in memory of
// its own. A split tile's CTAs c0 < c1 <= ... hold consecutive segments: c0 its first groups, at the end of
// its run; the others later groups at the start of theirs. Those hand their partial sums over through their
// slot and flag; c0 waits for the flags (raised early: a CTA's first segment), adds the parts and runs the
// epilogue. A CTA waits only on later CTAs, which hand over before they wait on anything: no cycle.
template <typename LT, bool UNS>
__global__ void __launch_bounds__(THREADS, 1) w4a4_s8_sk_kernel(const Params p, int *ws, const NextScale ns) {
  pdl_trigger();  // launched by nl_launch: see common.cuh
  pdl_wait();
#ifdef NL_SM90A
  using namespace sm90;
  using C = SkCfg;
  constexpr int BT = SK_BT;
  constexpr int PRODUCER_REGS = 24, CONSUMER_REGS = 240;
  constexpr int ND = BT / 2;
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint32_t smem_base = smem_u32(smem);
  const uint32_t full_bar = smem_base + C::BAR_OFF, empty_bar = full_bar + C::STAGES * 8;
  const int wg = threadIdx.x >> 7, ctid = threadIdx.x & 127;
  const int G = p.K / 64;
  const int64_t U = (int64_t)((p.M + BT - 1) / BT) * (p.N / BN) * G;

  setup_ring_and_tables<C>(smem, full_bar, empty_bar);

  if (wg == 0) {  // ---------------- producer ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGS));
    if (ctid == 0) {
      uint32_t u = 0;  // ring use: slot u % STAGES, phase (u / STAGES) & 1
      Run run(G, U);
      for (int t, g0, ng; run.next(t, g0, ng);) {
        const CtaTile tile = cta_tile<BT, BN>(p.M, p.N, p.raster, t);
        const int rows = (int)(p.mp - tile.m0 < BT ? p.mp - tile.m0 : BT);
        const uint32_t act_bytes = rows * 64, bytes = act_bytes + W_BYTES + EXP_BYTES;
        for (int g = g0; g < g0 + ng; ++g, ++u) {
          const int s = u % C::STAGES;
          const uint32_t st = smem_base + s * C::STAGE, fb = full_bar + s * 8;
          if (u >= C::STAGES) mbar_wait(empty_bar + s * 8, ((u / C::STAGES) & 1) ^ 1);
          mbar_expect_tx(fb, bytes);
          bulk_g2s(st, p.act + ((int64_t)g * p.mp + tile.m0) * 64, act_bytes, fb);
          bulk_g2s(st + C::ACT_BYTES, p.w + ((int64_t)tile.nb * G + g) * W_BYTES, W_BYTES, fb);
          bulk_g2s(st + C::ACT_BYTES + W_BYTES, p.wexp + (int64_t)g * p.N + tile.n0, EXP_BYTES, fb);
        }
      }
    }
    return;
  }

  // ---------------- consumers ----------------
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS));
  const int c = wg - 1, w = ctid >> 5, l = ctid & 31, q = l & 3;
  const int rloc = c * 64 + 16 * w + (l >> 2);
  const int tid = threadIdx.x - 128;  // both consumer warpgroups
  const uint4 *tab = reinterpret_cast<const uint4 *>(smem + C::TAB_OFF);
  int *flags = ws;  // SK_FLAGS hand-over flags (zero between launches), at a fixed place: launches of other
  int4 *slots = reinterpret_cast<int4 *>(ws + SK_FLAGS);  // grid sizes leave their partial sums behind
  uint32_t u0 = 0;  // ring use of the current segment's first group
  Run run(G, U);
#pragma unroll 1
  for (int t, g0, ng; run.next(t, g0, ng);) {
    const CtaTile tile = cta_tile<BT, BN>(p.M, p.N, p.raster, t);
    const int m0 = tile.m0, n0 = tile.n0;
    int acc[ND];
#pragma unroll
    for (int i = 0; i < ND; ++i) acc[i] = 0;

    consume_groups<C, BT, UNS>(acc, ng, u0, smem, smem_base, full_bar, empty_bar, tab, c, ctid, rloc);
    u0 += ng;

    if (ng < G) {  // a split tile
      if (g0 != 0) {  // a later part: hand the partial sums over
        int4 *slot = slots + (int64_t)blockIdx.x * (BT * BN / 4);
#pragma unroll
        for (int i = 0; i < ND / 4; ++i)
          __stcg(slot + i * 256 + tid, make_int4(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]));
        __threadfence();
        consumers_sync();
        if (tid == 0) st_release(flags + blockIdx.x, 1);
        continue;
      }
      const int last = (int)((((int64_t)t * G + G) * gridDim.x - 1) / U);  // the CTA holding group G - 1
      for (int c2 = blockIdx.x + 1; c2 <= last; ++c2) {
        if (tid == 0)
          while (!ld_acquire(flags + c2)) __nanosleep(64);
        consumers_sync();
        __threadfence();
        const int4 *slot = slots + (int64_t)c2 * (BT * BN / 4);
#pragma unroll
        for (int i = 0; i < ND / 4; ++i) {
          const int4 v = __ldcg(slot + i * 256 + tid);
          acc[4 * i] += v.x;
          acc[4 * i + 1] += v.y;
          acc[4 * i + 2] += v.z;
          acc[4 * i + 3] += v.w;
        }
        consumers_sync();  // every thread has read the slot: the flag goes back to 0 for the next launch
        if (tid == 0) flags[c2] = 0;
      }
    }

    // ---------------- epilogue (as w4a4_s8_kernel's) ----------------
    float f[ND];
    scale_sums<BT>(f, acc, p.wch + n0, p.tscale + m0, p.mp - m0, rloc, q);
    // Opaque per-segment copies: otherwise the compiler hoists the epilogue's segment-invariant shared-memory
    // offsets (over a hundred, runtime output dtype) out of the loop, where they would hold registers. (The
    // offset, not the pointer, goes through the asm: an opaque pointer loses its shared address space and
    // every staging access becomes a generic ld/st.)
    uint32_t epi_off = C::EPI_OFF;
    int rl = rloc, qq = q, ct = ctid;
    asm volatile("" : "+r"(epi_off), "+r"(rl), "+r"(qq), "+r"(ct));
    uint8_t *epi = smem + epi_off;
    if (p.rank > 0)
      lowrank_into<BT, LT, SK_LRC>(epi, f, p.lora_act + (int64_t)m0 * p.rank, min(BT, p.M - m0),
                                   static_cast<const LT *>(p.lora_up) + (int64_t)(n0 + c * 64) * p.rank, p.rank, ct);
    consumers_sync();  // the low-rank wgmma and the previous segment's staging reads are done
    store_tile<BT, BN, OUT_PAD>(epi, f, p.bias, p.epilogue, p.out, p.out_dtype, p.ldo, p.M, m0, n0, rl, qq, ns);
  }
#else
  __trap();
#endif
}

template <int BT, typename LT, bool UNS, int NSTAGES, bool PRE>
int launch(const Params &p, const NextScale &ns, cudaStream_t stream) {
  auto kern = w4a4_s8_kernel<BT, LT, UNS, NSTAGES, PRE>;
  constexpr int SMEM = Cfg<BT, NSTAGES, PRE>::SMEM;
  static bool attr_set[64] = {};
  if (int rc = nl_smem_once(kern, SMEM, attr_set, "nl_w4a4_gemm_s8")) return rc;
  (void)nl_launch(kern, dim3(((p.M + BT - 1) / BT) * (p.N / BN)), dim3(THREADS), SMEM, stream, p, ns);
  NL_CHECK_LAUNCH("nl_w4a4_gemm_s8");
  return NL_OK;
}

template <int BT, int NSTAGES, bool PRE = false>
int dispatch(const Params &p, const NextScale &ns, int lora_dtype, bool uns, cudaStream_t s) {
  if (lora_dtype == NL_F16)
    return uns ? launch<BT, __half, true, NSTAGES, PRE>(p, ns, s) : launch<BT, __half, false, NSTAGES, PRE>(p, ns, s);
  return uns ? launch<BT, __nv_bfloat16, true, NSTAGES, PRE>(p, ns, s)
             : launch<BT, __nv_bfloat16, false, NSTAGES, PRE>(p, ns, s);
}

// Whether the one-tile kernel prefetches its epilogue operands (PRE): 256-token tiles, rank <= PRE_LRC, 16-byte
// aligned channel scales and bias (the helpers' loads), and by default a low-rank branch (rank > 0) and
// K <= PRE_MAX_K: the PRE kernel's main loop is 8-15% slower (H100, bench/results/h100-2026-12-08), which the
// prefetched low-rank operands more than repay only on short K. NUNCHAKU_LITE_S8_PREFETCH=0: never, 1: wherever
// possible.
bool want_prefetch(const Params &p, int bt) {
  const char *env = getenv("NUNCHAKU_LITE_S8_PREFETCH");
  const int mode = env && env[0] ? atoi(env) : -1;
  if (mode == 0 || bt != 256 || p.rank > PRE_LRC || !nl_aligned(p.wch, 16) || (p.bias && !nl_aligned(p.bias, 16)))
    return false;
  return mode == 1 || (p.rank > 0 && p.K <= PRE_MAX_K);
}

template <typename LT, bool UNS>
int launch_sk(const Params &p, int *ws, int grid, const NextScale &ns, cudaStream_t stream) {
  auto kern = w4a4_s8_sk_kernel<LT, UNS>;
  static bool attr_set[64] = {};
  if (int rc = nl_smem_once(kern, SkCfg::SMEM, attr_set, "nl_w4a4_gemm_s8")) return rc;
  (void)nl_launch(kern, dim3(grid), dim3(THREADS), SkCfg::SMEM, stream, p, ws, ns);
  NL_CHECK_LAUNCH("nl_w4a4_gemm_s8");
  return NL_OK;
}

// The stream-K grid for this call, or 0 for one CTA per tile: where whole tiles fill at most SK_FILL of their
// rounds' SM time, in at most SK_MAX_ROUNDS rounds, over K >= 64 * SK_MIN_GROUPS (NUNCHAKU_LITE_S8_SK = 0 | 1
// forces the choice), given a workspace that holds the grid's slots, 16-bit outputs and 256-token tiles.
int sk_grid(const Params &p, const int *ws, int bt, int64_t ws_bytes, int *grid) {
  *grid = 0;
  const char *env = getenv("NUNCHAKU_LITE_S8_SK");
  if (!ws || p.out_dtype == NL_F32 || bt != SK_BT || (env && atoi(env) == 0)) return NL_OK;
  int sms = 0;
  if (int rc = nl_sm_count("nl_w4a4_gemm_s8", &sms)) return rc;
  const int G = p.K / 64;
  const int64_t ntiles = (int64_t)((p.M + SK_BT - 1) / SK_BT) * (p.N / BN);
  const int64_t rounds = (ntiles + sms - 1) / sms;
  const int64_t units = ntiles * G;
  const int n = (int)std::max<int64_t>(1, std::min<int64_t>(sms, units / MIN_SK_UNITS));
  const bool want = env ? true : rounds <= SK_MAX_ROUNDS && ntiles <= SK_FILL * rounds * sms && G >= SK_MIN_GROUPS;
  if (want && units < INT_MAX && n <= SK_FLAGS && ws_bytes >= (SK_FLAGS + (int64_t)n * SK_BT * BN) * 4) *grid = n;
  return NL_OK;
}

}  // namespace

extern "C" int nl_w4a4_gemm_s8(const uint8_t *act_bytes8, const float *act_tscale, int64_t mp, int act_unsigned,
                               const uint8_t *w_packed, const float *w_chscale, const uint8_t *w_exp,
                               const float *lora_act, const void *lora_up, int lora_dtype, int rank,
                               const float *bias, void *out, int out_dtype, int64_t ldo, int64_t M, int64_t N,
                               int64_t K, int epilogue, int *workspace, int64_t workspace_bytes,
                               const float *next_inv_smooth, float next_shift, int next_unsigned,
                               float *next_token_scale, void *stream) {
  const char *k = "nl_w4a4_gemm_s8";
  // NL_EPI_ACCUMULATE (this kernel only): the plain epilogue, then out += result in the stores (store_tile)
  const int act_epilogue = epilogue == NL_EPI_ACCUMULATE ? NL_EPI_NONE : epilogue;
  if (int rc = nl_check_sm90_gemm(k, M, N, mp, out_dtype, act_epilogue, bias, rank, lora_act, lora_up, lora_dtype))
    return rc;
  NL_CHECK_ARG(K >= 64 && K % 64 == 0 && K <= MAX_K, "%s: K=%lld must be a positive multiple of 64, at most %d "
               "(int32 accumulator)", k, (long long)K, MAX_K);
  const int esz = out_dtype == NL_F32 ? 4 : 2;
  NL_CHECK_ARG(ldo >= N && (ldo * esz) % 16 == 0, "%s: out row stride %lld must be >= N and a multiple of 16 bytes",
               k, (long long)ldo);
  NL_CHECK_ARG(act_bytes8 && nl_aligned(act_bytes8, 16), "%s: act_bytes8 must be non-null and 16-byte aligned", k);
  NL_CHECK_ARG(act_tscale && nl_aligned(act_tscale, 16), "%s: act_tscale must be non-null and 16-byte aligned", k);
  NL_CHECK_ARG(w_packed && nl_aligned(w_packed, 16), "%s: w_packed must be non-null and 16-byte aligned", k);
  NL_CHECK_ARG(w_exp && nl_aligned(w_exp, 16), "%s: w_exp must be non-null and 16-byte aligned", k);
  NL_CHECK_ARG(w_chscale && nl_aligned(w_chscale, 4), "%s: w_chscale must be non-null and 4-byte aligned", k);
  NL_CHECK_ARG(out && nl_aligned(out, 16), "%s: out must be non-null and 16-byte aligned", k);
  NL_CHECK_ARG(!workspace || (nl_aligned(workspace, 16) && workspace_bytes >= 0),
               "%s: workspace must be 16-byte aligned with a size >= 0", k);
  NL_CHECK_ARG(!next_token_scale || (out_dtype != NL_F32 && epilogue != NL_EPI_ACCUMULATE &&
                                      nl_aligned(next_token_scale, 4)),
               "%s: next_token_scale needs 16-bit outputs, an activation epilogue and 4-byte alignment", k);
  NL_CHECK_ARG(!next_inv_smooth || nl_aligned(next_inv_smooth, 16), "%s: next_inv_smooth must be 16-byte aligned",
               k);
  if (int rc = nl_check_sm90(k)) return rc;
  const NextScale ns{next_token_scale ? next_inv_smooth : nullptr, next_token_scale, next_shift,
                     next_unsigned ? 15.f : 7.f};
  Params p{act_bytes8, act_tscale, mp, w_packed, w_exp, w_chscale, lora_act, lora_up, rank, bias, out, out_dtype,
           ldo, epilogue, (int)M, (int)N, (int)K, 1};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  // Variants (read at every call, for benchmarks): NUNCHAKU_LITE_S8_BT = tokens per CTA (128, 192, 256),
  // NUNCHAKU_LITE_S8_RASTER = 0 | 1 (CTA order), NUNCHAKU_LITE_S8_SK = 0 | 1 (stream-K off / wherever possible).
  const char *env_bt = getenv("NUNCHAKU_LITE_S8_BT"), *env_r = getenv("NUNCHAKU_LITE_S8_RASTER");
  const int bt = env_bt ? atoi(env_bt) : DEFAULT_BT;
  if (env_r) p.raster = atoi(env_r) != 0;
  const bool uns = act_unsigned != 0;
  int grid = 0;
  if (int rc = sk_grid(p, workspace, bt, workspace_bytes, &grid)) return rc;
  if (grid) {
    if (lora_dtype == NL_F16)
      return uns ? launch_sk<__half, true>(p, workspace, grid, ns, s)
                 : launch_sk<__half, false>(p, workspace, grid, ns, s);
    return uns ? launch_sk<__nv_bfloat16, true>(p, workspace, grid, ns, s)
               : launch_sk<__nv_bfloat16, false>(p, workspace, grid, ns, s);
  }
  if (bt == 128) return dispatch<128, 12>(p, ns, lora_dtype, uns, s);
  if (bt == 192) return dispatch<192, 10>(p, ns, lora_dtype, uns, s);
  if (want_prefetch(p, bt)) return dispatch<256, DEFAULT_STAGES, true>(p, ns, lora_dtype, uns, s);
  return dispatch<256, DEFAULT_STAGES>(p, ns, lora_dtype, uns, s);
}
