// Device helpers shared by the sm_90a (Hopper) GEMMs: mbarriers, 1-D bulk copies, wgmma control and
// descriptors, the nibble -> 8-bit byte conversions through prmt tables, and the 16-bit low-rank wgmma.
// Include only inside `#ifdef NL_SM90A` (sm_90a device code).
#pragma once
#include "common.cuh"
#include "wgmma.cuh"

#include <type_traits>

namespace sm90 {
// ---- mbarriers, bulk copies, wgmma control ---------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  } while (!done);
}
__device__ __forceinline__ void bulk_g2s(uint32_t dst, const void *src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of an in-flight wgmma accumulator across the wait.
template <int N> __device__ __forceinline__ void reg_fence(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int N> __device__ __forceinline__ void reg_fence(int (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
}
// The producer ring's barriers, initialized by thread 0: full barrier s (one producer arrival plus the stage's
// bytes) and empty barrier s (`releases` consumer-warp arrivals) at full_bar + 8s and empty_bar + 8s.
__device__ __forceinline__ void init_ring(uint32_t full_bar, uint32_t empty_bar, int stages, int releases) {
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      mbar_init(full_bar + s * 8, 1);
      mbar_init(empty_bar + s * 8, releases);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
}

// This CTA's first token m0 and weight tile nb (rows n0 = nb * BN) in launch order: raster 0 = token tile
// fastest, 1 = weight tile fastest (the concurrently running CTAs then share few activation slabs).
struct CtaTile {
  int m0, nb, n0;
};
template <int BT, int BN>
__device__ __forceinline__ CtaTile cta_tile(int M, int N, int raster) {
  const int mtiles = (M + BT - 1) / BT, ntiles = N / BN;
  const int mt = raster ? blockIdx.x / ntiles : blockIdx.x % mtiles;
  const int nb = raster ? blockIdx.x % ntiles : blockIdx.x / mtiles;
  return {mt * BT, nb, nb * BN};
}
template <int BT, int BN>
__device__ __forceinline__ CtaTile cta_tile(int M, int N, int raster, int t) {  // tile t of the same order
  const int mtiles = (M + BT - 1) / BT, ntiles = N / BN;
  const int mt = raster ? t / ntiles : t % mtiles;
  const int nb = raster ? t % ntiles : t / mtiles;
  return {mt * BT, nb, nb * BN};
}

__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }

// No-swizzle K-major shared-memory descriptor: start address, LBO (K-adjacent core matrices), SBO (next 8 rows).
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((addr >> 4) & 0x3FFF) | ((uint64_t)((lbo >> 4) & 0x3FFF) << 16) |
         ((uint64_t)((sbo >> 4) & 0x3FFF) << 32);
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}
__device__ __forceinline__ uint32_t select_bits(uint32_t p, uint32_t q, uint32_t mask) {  // mask ? q : p
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xCA;\n" : "=r"(r) : "r"(mask), "r"(q), "r"(p));  // (m & q) | (~m & p)
  return r;
}
// 8 two's-complement nibbles -> 8 e4m3 bytes (lo: codes 0-3, hi: codes 4-7).
constexpr uint32_t POS_LO = 0x44403800u, POS_HI = 0x4E4C4A48u;  // e4m3(0..7)
constexpr uint32_t NEG_LO = 0xCACCCED0u, NEG_HI = 0xB8C0C4C8u;  // e4m3(-8..-1)
__device__ __forceinline__ void nib8_to_e4m3(uint32_t x, uint32_t &lo, uint32_t &hi) {
  const uint32_t t = x & 0x77777777u, x4 = x << 4, th = t >> 16;
  lo = select_bits(prmt(POS_LO, POS_HI, t), prmt(NEG_LO, NEG_HI, t), prmt(x, x4, 0x9D8C));
  hi = select_bits(prmt(POS_LO, POS_HI, th), prmt(NEG_LO, NEG_HI, th), prmt(x, x4, 0xBFAE));
}

// The same with per-row tables of any byte values, in POS/NEG word order (table byte b: the byte of code b for
// b < 8, of code b - 16 for b >= 8): t0 for the low-half row, t1 for the high-half row. Folded weights use
// e4m3(code * 2^-e) (nl_w4a4_gemm_fp8_pow2) or the int8 code << (4 - e) (nl_w4a4_gemm_s8).
__device__ __forceinline__ void nib8_lookup(uint32_t x, const uint4 &t0, const uint4 &t1, uint32_t &lo,
                                            uint32_t &hi) {
  const uint32_t t = x & 0x77777777u, x4 = x << 4, th = t >> 16;
  lo = select_bits(prmt(t0.x, t0.y, t), prmt(t0.z, t0.w, t), prmt(x, x4, 0x9D8C));
  hi = select_bits(prmt(t1.x, t1.y, th), prmt(t1.z, t1.w, th), prmt(x, x4, 0xBFAE));
}
__device__ __forceinline__ uint32_t e4m3_byte(float v) {  // exact for the table's values
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(r) : "f"(0.f), "f"(v));
  return r & 0xFFu;
}

// The core-matrix layout of lowrank_into's 16-bit [BT x LRC] K-major tiles: byte offset of (token t, rank k).
template <int LRC>
__device__ __forceinline__ int lowrank_tile_offset(int t, int k) {
  return ((t >> 3) * (LRC / 8) + (k >> 3)) * 128 + (t & 7) * 16 + (k & 7) * 2;
}

template <typename T> struct LrOp;
template <> struct LrOp<__nv_bfloat16> {
  template <int BT, int ND> static __device__ __forceinline__ void mma(float (&d)[ND], const uint32_t *a, uint64_t desc) {
    wgmma::Lr<BT>::bf16(d, a, desc);
  }
};
template <> struct LrOp<__half> {
  template <int BT, int ND> static __device__ __forceinline__ void mma(float (&d)[ND], const uint32_t *a, uint64_t desc) {
    wgmma::Lr<BT>::f16(d, a, desc);
  }
};



// Low-rank up epilogue of the GEMMs whose two consumer warpgroups (threads 128..383) each own 64 weight rows:
// d += lora_up[rows, :] @ lora_act[tokens, :]^T as a wgmma accumulator (d holds fp32 values in the
// accumulator layout: thread (warp w, lane l) rows 16w + l/4 (+8) of the warpgroup's, tokens 8j + 2(l%4) +
// {0,1} of the tile). act: the tile's first token row of lora_act (fp32 [., rank], rows >= act_rows read as
// 0), global or shared memory; up: the warpgroup's first row of lora_up (16-bit [., rank]) in global memory
// (its fragments are read before the first barrier, while the other warpgroup may still use shared memory).
// lora_act goes through shared memory in chunks of LRC ranks as hi + lo 16-bit halves (lo = the rounding rest),
// both against lora_up (exact): error ~2^-17 of the low-rank term. Uses 2 * BT * LRC * 2 bytes of smem (the
// pipeline's, free by then).
template <int BT, typename T, int LRC = 64>
__device__ __forceinline__ void lowrank_into(uint8_t *smem, float (&d)[BT / 2], const float *act, int act_rows,
                                             const void *lora_up, int rank, int ctid) {
  constexpr int QPR = LRC / 4;             // float4 quads per token row of a chunk
  constexpr int PER = BT * QPR / 256;      // quads per consumer thread and chunk
  constexpr int BATCH = PER % 8 == 0 ? 8 : PER % 4 == 0 ? 4 : PER % 2 == 0 ? 2 : 1;  // (registers: d is live)
  static_assert(BT * QPR % 256 == 0 && PER % BATCH == 0 && LRC % 16 == 0, "low-rank chunk shape");
  const int w = ctid >> 5, l = ctid & 31, tid = threadIdx.x - 128;  // tid: both consumer warpgroups
  uint8_t *hi = smem, *lo = smem + BT * LRC * 2;
  const T *up = static_cast<const T *>(lora_up);
  const int row0 = 16 * w + (l >> 2);
  for (int r0 = 0; r0 < rank; r0 += LRC) {
    const int len = min(LRC, rank - r0);
    // lora_up A fragments of the chunk, issued first: their latency overlaps the lora_act loads below
    uint32_t a[LRC / 16][4];
#pragma unroll
    for (int kk = 0; kk < LRC / 16; ++kk) {
      const int k = r0 + kk * 16 + 2 * (l & 3);
      if (kk * 16 < len) {
        a[kk][0] = *reinterpret_cast<const uint32_t *>(up + (int64_t)row0 * rank + k);
        a[kk][1] = *reinterpret_cast<const uint32_t *>(up + (int64_t)(row0 + 8) * rank + k);
        a[kk][2] = *reinterpret_cast<const uint32_t *>(up + (int64_t)row0 * rank + k + 8);
        a[kk][3] = *reinterpret_cast<const uint32_t *>(up + (int64_t)(row0 + 8) * rank + k + 8);
      }
    }
    consumers_sync();  // the previous chunk's wgmma (or the main loop's stages / the last tile's staging) are done
    // token t, ranks 4i..4i+3 of the chunk -> core matrix (t/8, k/8) of a [BT x LRC] K-major 16-bit tile, BATCH
    // loads in flight per thread (the loop over a runtime count had one)
#pragma unroll 1
    for (int b0 = 0; b0 < PER; b0 += BATCH) {
      float4 v[BATCH];
#pragma unroll
      for (int j = 0; j < BATCH; ++j) {
        const int i = tid + (b0 + j) * 256, t = i / QPR, k = (i % QPR) * 4;
        v[j] = t < act_rows && k < len ? *reinterpret_cast<const float4 *>(act + (int64_t)t * rank + r0 + k)
                                       : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int j = 0; j < BATCH; ++j) {
        const int i = tid + (b0 + j) * 256, t = i / QPR, k = (i % QPR) * 4;
        const uint32_t h0 = pack2<T>(v[j].x, v[j].y), h1 = pack2<T>(v[j].z, v[j].w);
        const float2 f0 = unpack2<T>(h0), f1 = unpack2<T>(h1);
        const uint32_t l0 = pack2<T>(v[j].x - f0.x, v[j].y - f0.y), l1 = pack2<T>(v[j].z - f1.x, v[j].w - f1.y);
        const int off = lowrank_tile_offset<LRC>(t, k);
        *reinterpret_cast<uint2 *>(hi + off) = make_uint2(h0, h1);
        *reinterpret_cast<uint2 *>(lo + off) = make_uint2(l0, l1);
      }
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // generic writes -> wgmma reads
    consumers_sync();
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < LRC / 16; ++kk) {
      if (kk * 16 < len) {
        const uint32_t off = kk * 256;  // two core matrices along K per k16 step
        LrOp<T>::template mma<BT>(d, a[kk], make_desc(smem_u32(hi) + off, 128, LRC * 16));
        LrOp<T>::template mma<BT>(d, a[kk], make_desc(smem_u32(lo) + off, 128, LRC * 16));
      }
    }
    wg_commit();
    wg_wait<0>();
    reg_fence(d);
  }
}

// a + b of 16 bytes of out_dtype values, each sum formed in fp32 and rounded to out_dtype (torch's add_).
__device__ __forceinline__ uint4 add_rounded(uint4 a, uint4 b, int out_dtype) {
  uint32_t x[4] = {a.x, a.y, a.z, a.w};
  const uint32_t y[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (out_dtype == NL_F32) {
      x[i] = __float_as_uint(__uint_as_float(x[i]) + __uint_as_float(y[i]));
    } else if (out_dtype == NL_BF16) {
      const float2 u = unpack2<__nv_bfloat16>(x[i]), v = unpack2<__nv_bfloat16>(y[i]);
      x[i] = pack2<__nv_bfloat16>(u.x + v.x, u.y + v.y);
    } else {
      const float2 u = unpack2<__half>(x[i]), v = unpack2<__half>(y[i]);
      x[i] = pack2<__half>(u.x + v.x, u.y + v.y);
    }
  }
  return make_uint4(x[0], x[1], x[2], x[3]);
}


// NextScale's reduction over a staged tile (16-bit token rows of srow bytes): consumer thread t takes token t.
template <int BT, int BN>
__device__ __forceinline__ void token_scale_of_rows(const uint8_t *smem, int srow, int out_dtype, int rows, int m0,
                                                    int n0, const NextScale &ns) {
  const int t = threadIdx.x - 128;
  if (t >= rows) return;
  const uint4 *row = reinterpret_cast<const uint4 *>(smem + t * srow);
  float amax = 0.f;
#pragma unroll 4
  for (int ch = 0; ch < BN / 8; ++ch) {
    const uint4 raw = row[ch];
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
    float v[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = out_dtype == NL_BF16 ? unpack2<__nv_bfloat16>(w[j]) : unpack2<__half>(w[j]);
      v[2 * j] = __fadd_rn(f.x, ns.shift);
      v[2 * j + 1] = __fadd_rn(f.y, ns.shift);
    }
    if (ns.inv) {
      const float4 a0 = __ldg(reinterpret_cast<const float4 *>(ns.inv + n0 + ch * 8));
      const float4 a1 = __ldg(reinterpret_cast<const float4 *>(ns.inv + n0 + ch * 8 + 4));
      const float sv[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = __fmul_rn(v[j], sv[j]);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(v[j]));
  }
  // non-negative floats order as their bit patterns
  atomicMax(reinterpret_cast<int *>(ns.tok + m0 + t), __float_as_int(__fdiv_rn(amax, ns.qmax)));
}

// Output epilogue of those GEMMs: acc (accumulator layout, see lowrank_into) + bias, optional GELU(tanh),
// converted to out_dtype, staged transposed in smem (BT rows of BN + PAD elements) and written as 16-byte row
// segments; token rows >= M are never written. The caller has synchronized the consumers (smem is free).
// b0, b1: the bias of the thread's two rows (rloc, rloc + 8); the overload below reads them from bias [N].
// ns.tok: each consumer thread also reduces one staged token row into the next layer's token scale (NextScale).
template <int BT, int BN, int PAD>
__device__ __forceinline__ void store_tile(uint8_t *smem, const float (&acc)[BT / 2], float b0, float b1,
                                           int epilogue, void *out_ptr, int out_dtype, int64_t ldo, int M, int m0,
                                           int n0, int rloc, int q, const NextScale &ns = NextScale{}) {
  const int esz = out_dtype == NL_F32 ? 4 : 2;
  const int srow = (BN + PAD) * esz;  // staging bytes per token row
  // one straight-line copy of the loop per (dtype, GELU) pair, written out rather than left to the compiler's
  // loop unswitching, which gave up when a kernel's parameter struct grew past 128 bytes
  auto stage = [&](auto dtype, auto gelu) {
    constexpr int DT = decltype(dtype)::value;
    constexpr int ES = DT == NL_F32 ? 4 : 2;
#pragma unroll
    for (int i = 0; i < BT / 2; ++i) {
      const int j = i >> 2, t = 8 * j + 2 * q + (i & 1), r = rloc + ((i >> 1) & 1) * 8;
      float v = acc[i] + ((i >> 1) & 1 ? b1 : b0);
      if (decltype(gelu)::value) v = gelu_epilogue(v, DT);
      uint8_t *dst = smem + t * ((BN + PAD) * ES) + r * ES;
      if (DT == NL_BF16) *reinterpret_cast<__nv_bfloat16 *>(dst) = __float2bfloat16_rn(v);
      else if (DT == NL_F16) *reinterpret_cast<__half *>(dst) = __float2half_rn(v);
      else *reinterpret_cast<float *>(dst) = v;
    }
  };
  using bf16_t = std::integral_constant<int, NL_BF16>;
  using f16_t = std::integral_constant<int, NL_F16>;
  using f32_t = std::integral_constant<int, NL_F32>;
  if (epilogue == NL_EPI_GELU_TANH) {
    if (out_dtype == NL_BF16) stage(bf16_t{}, std::true_type{});
    else if (out_dtype == NL_F16) stage(f16_t{}, std::true_type{});
    else stage(f32_t{}, std::true_type{});
  } else {
    if (out_dtype == NL_BF16) stage(bf16_t{}, std::false_type{});
    else if (out_dtype == NL_F16) stage(f16_t{}, std::false_type{});
    else stage(f32_t{}, std::false_type{});
  }
  consumers_sync();
  const int chunks = BN * esz / 16, rows = min(BT, M - m0);
  uint8_t *out = static_cast<uint8_t *>(out_ptr);
  if (ns.tok) token_scale_of_rows<BT, BN>(smem, srow, out_dtype, rows, m0, n0, ns);
  if (epilogue == NL_EPI_ACCUMULATE) {  // out += the rounded result (out.add_(result))
    for (int i = threadIdx.x - 128; i < rows * chunks; i += 256) {
      const int t = i / chunks, ch = i % chunks;
      uint4 *dst = reinterpret_cast<uint4 *>(out + ((int64_t)(m0 + t) * ldo + n0) * esz + ch * 16);
      *dst = add_rounded(*dst, *reinterpret_cast<const uint4 *>(smem + t * srow + ch * 16), out_dtype);
    }
    return;
  }
  for (int i = threadIdx.x - 128; i < rows * chunks; i += 256) {
    const int t = i / chunks, ch = i % chunks;
    *reinterpret_cast<uint4 *>(out + ((int64_t)(m0 + t) * ldo + n0) * esz + ch * 16) =
        *reinterpret_cast<const uint4 *>(smem + t * srow + ch * 16);
  }
}

template <int BT, int BN, int PAD>
__device__ __forceinline__ void store_tile(uint8_t *smem, const float (&acc)[BT / 2], const float *bias, int epilogue,
                                           void *out_ptr, int out_dtype, int64_t ldo, int M, int m0, int n0,
                                           int rloc, int q, const NextScale &ns = NextScale{}) {
  const float b0 = bias ? bias[n0 + rloc] : 0.f, b1 = bias ? bias[n0 + rloc + 8] : 0.f;
  store_tile<BT, BN, PAD>(smem, acc, b0, b1, epilogue, out_ptr, out_dtype, ldo, M, m0, n0, rloc, q, ns);
}

// lowrank_into for rank <= LRC with both operands already in shared memory (put there during the main loop):
// hi / lo = lora_act's 16-bit halves in lowrank_tile_offset<LRC> order, up = the CTA's lora_up rows [BN x rank]
// row-major (16-bit); row0 = the thread's first row in the CTA tile. The products and their accumulation order
// are lowrank_into's (one chunk), so the result is the same.
template <int BT, typename T, int LRC>
__device__ __forceinline__ void lowrank_from_smem(float (&d)[BT / 2], const uint8_t *hi, const uint8_t *lo,
                                                  const uint8_t *up, int rank, int row0, int l) {
  uint32_t a[LRC / 16][4];
#pragma unroll
  for (int kk = 0; kk < LRC / 16; ++kk) {
    const int k = kk * 16 + 2 * (l & 3);
    if (kk * 16 < rank) {
      a[kk][0] = *reinterpret_cast<const uint32_t *>(up + (row0 * rank + k) * 2);
      a[kk][1] = *reinterpret_cast<const uint32_t *>(up + ((row0 + 8) * rank + k) * 2);
      a[kk][2] = *reinterpret_cast<const uint32_t *>(up + (row0 * rank + k + 8) * 2);
      a[kk][3] = *reinterpret_cast<const uint32_t *>(up + ((row0 + 8) * rank + k + 8) * 2);
    }
  }
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < LRC / 16; ++kk) {
    if (kk * 16 < rank) {
      LrOp<T>::template mma<BT>(d, a[kk], make_desc(smem_u32(hi) + kk * 256, 128, LRC * 16));
      LrOp<T>::template mma<BT>(d, a[kk], make_desc(smem_u32(lo) + kk * 256, 128, LRC * 16));
    }
  }
  wg_commit();
  wg_wait<0>();
  reg_fence(d);
}

}  // namespace sm90
