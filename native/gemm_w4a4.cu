// W4A4 GEMM with the low-rank-up + bias (+ GELU) epilogue (reference: quant/ops.py w4a4_linear).
//
// Math: out[m, n] = act( sum_g sa[g, m] * sw[g, n] * dot_g(m, n) + lora_act[m, :] . lora_up[n, :] + bias[n] )
//   dot_g = sum over the 64 k of group g of act_code[m, k] * w_code[n, k]   (exact int32)
//   group promotion, exact=1: acc = acc + (sa * sw) * float(dot)    (three fp32 roundings, as the reference)
//                    exact=0: acc = fma(fma(dot', sw', -C sw'), sa, acc), where the first fma yields
//                             dot * sw exactly (see "magic" below) -> one rounding per group.
//   low-rank: lora_act (fp32) is split into hi + lo 16-bit parts; both go through mma.m16n8k16 against
//   lora_up (16-bit, exact) with fp32 accumulation (error ~2^-17 of the low-rank term).
// Layouts: act codes uint8 [M, K/2] (canonical), act scales float [K/64, ldm], weights in tile order
//   [N/128][K/64][128 rows][32 bytes] with the two 16-byte halves of row r swapped when (r >> 2) & 1
//   (that XOR swizzle makes ldmatrix conflict-free; repack.cu writes it), weight scales float [K/64, N].
// Tiles: block 128 (M) x 128 (N), 8 warps as 2 x 4, warp tile 64 x 32 (WMT = 4 m-tiles of 16, WNT = 4
//   n-tiles of 8; a 64 x 128 block with WMT = 2 is the alternative, see dispatch_width); one 64-wide K
//   group per pipeline stage, STAGES-deep cp.async ring (A, B, and both scale vectors per stage);
//   operands by ldmatrix.x4. Software pipeline: group g-1's int32 results are promoted tile by tile just
//   before group g's mma reuses their registers, hiding the tensor-core latency behind a whole group.
// Shapes: N % 128 == 0 and K % 64 == 0; M arbitrary (rows >= M are zero-filled on load and never stored);
//   rank any multiple of 16 (chunks of 32 through shared memory).
// Paths (template PATH):
//   S4 (sm_80/86/89): one mma.m16n8k64.s4.s4 (u4.s4 for unsigned activations) per 16x8 tile and group.
//   S8 (sm_90; also valid on sm_80+): the nibbles are widened in registers to 8-bit values times 16
//      (hi nibble: w & 0xF0F0F0F0; lo nibble: (w << 4) & 0xF0F0F0F0: 2 ALU ops per 8 codes, the k order
//      permuted identically for both operands), then two mma.m16n8k32.s8.s8 (u8.s8) per tile and group;
//      the integer result is 256 * dot.
// Magic: each group's mma starts from the accumulator 0x4B400000 (the float 1.5 * 2^23), so the int32
//   result, read as a float, is exactly 1.5 * 2^23 + s * dot (|s * dot| < 2^22, s = 1 or 256): no I2F.
//   With sw' = sw / s and -C sw' exact (sw has <= 11 significant bits: bf16/fp16 values), the fma
//   fb * sw' - C sw' is exactly dot * sw. Promotion thus costs two FFMA per output per group (fast mode).
#include "common.cuh"
#include <stdlib.h>

namespace {

constexpr int STAGES = 4, THREADS = 256;
constexpr int LR = 32;                       // rank chunk of the low-rank epilogue
constexpr int LA_STRIDE = LR + 8;            // floats per row (conflict-free float2 reads)
constexpr int LU_STRIDE = LR + 8;            // 16-bit values per row
constexpr int TILE_BYTES = 128 * 32;         // one repacked [128 rows x 64 k] weight tile

// WNT = 8-column tiles per warp along N, WMT = 16-row tiles per warp along M; 8 warps as 2 (M) x 4 (N).
template <int WNT, int WMT>
struct Tile {
  static constexpr int BM = 32 * WMT;
  static constexpr int BN = 32 * WNT;
  static constexpr int A_BYTES = BM * 32, B_BYTES = BN * 32, SA_BYTES = BM * 4, SW_BYTES = BN * 4;
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES + SA_BYTES + SW_BYTES;
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
  static constexpr int EPI_BYTES = BM * LA_STRIDE * 4 + BN * LU_STRIDE * 2;
  static constexpr int SMEM_BYTES = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;
};
constexpr uint32_t MAGIC_I = 0x4B400000u;    // bits of 12582912.0f = 1.5 * 2^23
constexpr float MAGIC_F = 12582912.0f;

struct GemmParams {
  const uint8_t *act_codes; const float *act_scales; int64_t ldm;
  const uint8_t *w_tiled; const float *w_scales;
  const float *lora_act; const void *lora_up; int lora_dtype; int rank;
  const float *bias; void *out; int out_dtype; int64_t ldo;
  int M, N, K, epilogue;
};

enum { P_S4 = 1, P_S8 = 2 };

template <bool UNS>
__device__ __forceinline__ void mma_s4(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (UNS)
    asm("mma.sync.aligned.m16n8k64.row.col.s32.u4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%10,%10,%10};\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(MAGIC_I));
  else
    asm("mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%10,%10,%10};\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(MAGIC_I));
}

// d = a*b + c (c = the magic constant when FIRST, else d itself), m16n8k32 8-bit.
template <bool UNS, bool FIRST>
__device__ __forceinline__ void mma_s8(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       uint32_t b0, uint32_t b1) {
  if constexpr (FIRST) {
    if constexpr (UNS)
      asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                   "{%10,%10,%10,%10};\n"
                   : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                   : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(MAGIC_I));
    else
      asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                   "{%10,%10,%10,%10};\n"
                   : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                   : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(MAGIC_I));
  } else {
    if constexpr (UNS)
      asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                   "{%0,%1,%2,%3};\n"
                   : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                   : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    else
      asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                   "{%0,%1,%2,%3};\n"
                   : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                   : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t nib_hi16(uint32_t w) { return w & 0xF0F0F0F0u; }          // odd k, x16
__device__ __forceinline__ uint32_t nib_lo16(uint32_t w) { return (w << 4) & 0xF0F0F0F0u; }   // even k, x16

// acc += lora_act[block rows, :] @ lora_up[block cols, :]^T on tensor cores (hi/lo split of the fp32 side).
template <typename T, int WNT, int WMT>
__device__ __forceinline__ void lowrank_epilogue(const GemmParams &p, uint8_t *smem, float (&acc)[WMT][WNT][4],
                                                 int m0, int n0, int wm, int wn, int lane) {
  constexpr int BN = Tile<WNT, WMT>::BN, BM = Tile<WNT, WMT>::BM;
  float *la = reinterpret_cast<float *>(smem);
  T *lu = reinterpret_cast<T *>(smem + BM * LA_STRIDE * 4);
  const T *lora_up = static_cast<const T *>(p.lora_up);
  for (int r0 = 0; r0 < p.rank; r0 += LR) {
    const int len = min(LR, p.rank - r0);  // 16 or 32
    __syncthreads();  // previous chunk (or the main loop's stages) fully consumed
    for (int i = threadIdx.x; i < BM * (len / 4); i += THREADS) {
      const int row = i / (len / 4), c = i % (len / 4), m = m0 + row;
      cp_async16(la + row * LA_STRIDE + c * 4, p.lora_act + (int64_t)(m < p.M ? m : 0) * p.rank + r0 + c * 4,
                 m < p.M ? 16 : 0);
    }
    for (int i = threadIdx.x; i < BN * (len / 8); i += THREADS) {
      const int row = i / (len / 8), c = i % (len / 8);
      cp_async16(lu + row * LU_STRIDE + c * 8, lora_up + (int64_t)(n0 + row) * p.rank + r0 + c * 8);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < LR / 16; ++kk) {
      if (kk * 16 >= len) break;
      uint32_t b[WNT][2];
#pragma unroll
      for (int ni = 0; ni < WNT; ++ni) {
        const T *src = lu + (wn * WNT * 8 + ni * 8 + (lane >> 2)) * LU_STRIDE + kk * 16 + (lane & 3) * 2;
        b[ni][0] = *reinterpret_cast<const uint32_t *>(src);
        b[ni][1] = *reinterpret_cast<const uint32_t *>(src + 8);
      }
#pragma unroll
      for (int mi = 0; mi < WMT; ++mi) {
        const int r = wm * WMT * 16 + mi * 16 + (lane >> 2), c = kk * 16 + (lane & 3) * 2;
        const float2 f[4] = {*reinterpret_cast<const float2 *>(la + r * LA_STRIDE + c),
                             *reinterpret_cast<const float2 *>(la + (r + 8) * LA_STRIDE + c),
                             *reinterpret_cast<const float2 *>(la + r * LA_STRIDE + c + 8),
                             *reinterpret_cast<const float2 *>(la + (r + 8) * LA_STRIDE + c + 8)};
        uint32_t hi[4], lo[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          hi[j] = pack2<T>(f[j].x, f[j].y);
          const float2 h = unpack2<T>(hi[j]);
          lo[j] = pack2<T>(f[j].x - h.x, f[j].y - h.y);
        }
#pragma unroll
        for (int ni = 0; ni < WNT; ++ni) {
          mma_16816<T>(acc[mi][ni], hi, b[ni][0], b[ni][1]);
          mma_16816<T>(acc[mi][ni], lo, b[ni][0], b[ni][1]);
        }
      }
    }
  }
}

template <int PATH, bool UNS, bool EXACT, int WNT, int WMT>
__global__ void __launch_bounds__(THREADS, WMT == 2 ? 2 : 1) w4a4_gemm_kernel(const GemmParams p) {
  pdl_trigger();  // launched by nl_launch: see common.cuh
  pdl_wait();
  using TL = Tile<WNT, WMT>;
  constexpr int BM = TL::BM;
  constexpr int BN = TL::BN, A_BYTES = TL::A_BYTES, B_BYTES = TL::B_BYTES, SA_BYTES = TL::SA_BYTES;
  constexpr int STAGE_BYTES = TL::STAGE_BYTES;
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
  const int G = p.K / 64;
  // this block's weight strip: BN/128 consecutive 128-row tile columns of [K/64] tiles each
  const uint8_t *w_strip = p.w_tiled + (int64_t)blockIdx.x * (BN / 128) * G * TILE_BYTES;

  auto load_stage = [&](int g, int s) {
    uint8_t *st = smem + s * STAGE_BYTES;
    if (tid < BM * 2) {  // A: BM rows x 2 chunks, one chunk per thread
      const int row = tid >> 1, c = tid & 1, m = m0 + row;
      const uint8_t *src = p.act_codes + (int64_t)(m < p.M ? m : 0) * (p.K / 2) + g * 32 + c * 16;
      cp_async16(st + row * 32 + ((c ^ ((row >> 2) & 1)) << 4), src, m < p.M ? 16 : 0);
    }
#pragma unroll
    for (int sub = 0; sub < BN / 128; ++sub)  // B: pre-swizzled 4 KB tiles, linear copies
      cp_async16(st + A_BYTES + sub * TILE_BYTES + tid * 16,
                 w_strip + ((int64_t)sub * G + g) * TILE_BYTES + tid * 16);
    if (tid < BM / 4)
      cp_async16(st + A_BYTES + B_BYTES + tid * 16, p.act_scales + (int64_t)g * p.ldm + m0 + tid * 4);
    else if (tid < BM / 4 + BN / 4)
      cp_async16(st + A_BYTES + B_BYTES + SA_BYTES + (tid - BM / 4) * 16,
                 p.w_scales + (int64_t)g * p.N + n0 + (tid - BM / 4) * 4);
  };

  float acc[WMT][WNT][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < WNT; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[i][j][k] = 0.f;

  // s: integer scale of the mma result (S8 path works on codes x 16 on both sides).
  constexpr float INV_S = PATH == P_S8 ? 1.f / 256.f : 1.f;

  // Software pipeline across groups: the int32 tile results d of group g-1 are promoted (with the scales of
  // g-1, kept in registers) right before the mma of group g overwrites the same registers, so the tensor-core
  // latency is covered by a whole group of work and the FFMAs interleave with the mma stream. d starts at the
  // magic constant (dot = 0) and the scales at 0, which makes the first promotion add exactly 0.
  int d[WMT][WNT][4];
  float psa[WMT][2], psw[WNT][2], pncs[WNT][2];
#pragma unroll
  for (int mi = 0; mi < WMT; ++mi) {
    psa[mi][0] = psa[mi][1] = 0.f;
#pragma unroll
    for (int ni = 0; ni < WNT; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) d[mi][ni][i] = (int)MAGIC_I;
  }
#pragma unroll
  for (int ni = 0; ni < WNT; ++ni) psw[ni][0] = psw[ni][1] = pncs[ni][0] = pncs[ni][1] = 0.f;

  auto promote = [&](int mi, int ni) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float fb = __int_as_float(d[mi][ni][i]);  // = 1.5 * 2^23 + s * dot, exactly
      const float s_a = psa[mi][i >> 1], s_w = psw[ni][i & 1];
      if constexpr (EXACT) {
        const float prod = __fmul_rn(__fmul_rn(s_a, s_w), __fsub_rn(fb, MAGIC_F));
        acc[mi][ni][i] = __fadd_rn(acc[mi][ni][i], prod);
      } else {
        const float t = __fmaf_rn(fb, s_w, pncs[ni][i & 1]);  // = dot * sw, exact
        acc[mi][ni][i] = __fmaf_rn(t, s_a, acc[mi][ni][i]);
      }
    }
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < G) load_stage(s, s);
    cp_async_commit();
  }
  for (int g = 0; g < G; ++g) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (g + STAGES - 1 < G) load_stage(g + STAGES - 1, (g + STAGES - 1) % STAGES);
    cp_async_commit();

    const uint8_t *st = smem + (g % STAGES) * STAGE_BYTES;
    const uint8_t *sA = st, *sB = st + A_BYTES;
    const float *sSA = reinterpret_cast<const float *>(st + A_BYTES + B_BYTES);
    const float *sSW = reinterpret_cast<const float *>(st + A_BYTES + B_BYTES + SA_BYTES);

    uint32_t a[WMT][4], b[WNT / 2][4];
#pragma unroll
    for (int mi = 0; mi < WMT; ++mi) {
      const int row = wm * WMT * 16 + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, c = lane >> 4;
      ldmatrix_x4(a[mi], sA + row * 32 + ((c ^ ((row >> 2) & 1)) << 4));
    }
#pragma unroll
    for (int np = 0; np < WNT / 2; ++np) {
      const int row = wn * WNT * 8 + np * 16 + (lane & 7) + (lane >> 4) * 8, c = (lane >> 3) & 1;
      ldmatrix_x4(b[np], sB + row * 32 + ((c ^ ((row >> 2) & 1)) << 4));
    }
    float sa[WMT][2], sw[WNT][2];
#pragma unroll
    for (int mi = 0; mi < WMT; ++mi) {
      sa[mi][0] = sSA[wm * WMT * 16 + mi * 16 + (lane >> 2)];
      sa[mi][1] = sSA[wm * WMT * 16 + mi * 16 + (lane >> 2) + 8];
    }
#pragma unroll
    for (int ni = 0; ni < WNT; ++ni) {
      const float2 w2 = *reinterpret_cast<const float2 *>(sSW + wn * WNT * 8 + ni * 8 + (lane & 3) * 2);
      sw[ni][0] = w2.x * INV_S;
      sw[ni][1] = w2.y * INV_S;
    }

    uint32_t bx[WNT][4];  // per n-tile: the 8-bit widened b0 (lo, hi), b1 (lo, hi); or the raw s4 pair
#pragma unroll
    for (int ni = 0; ni < WNT; ++ni) {
      const uint32_t b0 = b[ni >> 1][(ni & 1) * 2], b1 = b[ni >> 1][(ni & 1) * 2 + 1];
      if constexpr (PATH == P_S8) {
        bx[ni][0] = nib_lo16(b0); bx[ni][1] = nib_hi16(b0);
        bx[ni][2] = nib_lo16(b1); bx[ni][3] = nib_hi16(b1);
      } else {
        bx[ni][0] = b0; bx[ni][1] = b1;
      }
    }
#pragma unroll
    for (int mi = 0; mi < WMT; ++mi) {
      uint32_t ax[8];
      if constexpr (PATH == P_S8) {
#pragma unroll
        for (int j = 0; j < 4; ++j) { ax[2 * j] = nib_lo16(a[mi][j]); ax[2 * j + 1] = nib_hi16(a[mi][j]); }
      }
#pragma unroll
      for (int ni = 0; ni < WNT; ++ni) {
        promote(mi, ni);  // group g-1 (a no-op at g = 0)
        if constexpr (PATH == P_S8) {
          // k 0..31 of the group: regs a0 (row g), a1 (row g+8); lo bytes then hi bytes.
          mma_s8<UNS, true>(d[mi][ni], ax[0], ax[2], ax[1], ax[3], bx[ni][0], bx[ni][1]);
          mma_s8<UNS, false>(d[mi][ni], ax[4], ax[6], ax[5], ax[7], bx[ni][2], bx[ni][3]);
        } else {
          mma_s4<UNS>(d[mi][ni], a[mi], bx[ni][0], bx[ni][1]);
        }
      }
    }
#pragma unroll
    for (int mi = 0; mi < WMT; ++mi) psa[mi][0] = sa[mi][0], psa[mi][1] = sa[mi][1];
#pragma unroll
    for (int ni = 0; ni < WNT; ++ni)
#pragma unroll
      for (int j = 0; j < 2; ++j) psw[ni][j] = sw[ni][j], pncs[ni][j] = -MAGIC_F * sw[ni][j];
  }
#pragma unroll
  for (int mi = 0; mi < WMT; ++mi)
#pragma unroll
    for (int ni = 0; ni < WNT; ++ni) promote(mi, ni);  // the last group
  cp_async_wait<0>();

  if (p.rank > 0) {
    if (p.lora_dtype == NL_BF16)
      lowrank_epilogue<__nv_bfloat16, WNT, WMT>(p, smem, acc, m0, n0, wm, wn, lane);
    else
      lowrank_epilogue<__half, WNT, WMT>(p, smem, acc, m0, n0, wm, wn, lane);
  }

  // bias, activation, store (each thread: 2 adjacent columns x 2 rows per 16x8 tile)
#pragma unroll
  for (int ni = 0; ni < WNT; ++ni) {
    const int col = n0 + wn * WNT * 8 + ni * 8 + (lane & 3) * 2;
    const float2 bias = p.bias ? *reinterpret_cast<const float2 *>(p.bias + col) : make_float2(0.f, 0.f);
#pragma unroll
    for (int mi = 0; mi < WMT; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + wm * WMT * 16 + mi * 16 + (lane >> 2) + h * 8;
        float v0 = __fadd_rn(acc[mi][ni][2 * h], bias.x), v1 = __fadd_rn(acc[mi][ni][2 * h + 1], bias.y);
        if (p.epilogue == NL_EPI_GELU_TANH) { v0 = gelu_epilogue(v0, p.out_dtype); v1 = gelu_epilogue(v1, p.out_dtype); }
        if (m < p.M) {
          if (p.out_dtype == NL_BF16)
            *reinterpret_cast<uint32_t *>(static_cast<__nv_bfloat16 *>(p.out) + (int64_t)m * p.ldo + col) =
                pack2<__nv_bfloat16>(v0, v1);
          else if (p.out_dtype == NL_F16)
            *reinterpret_cast<uint32_t *>(static_cast<__half *>(p.out) + (int64_t)m * p.ldo + col) =
                pack2<__half>(v0, v1);
          else
            *reinterpret_cast<float2 *>(static_cast<float *>(p.out) + (int64_t)m * p.ldo + col) =
                make_float2(v0, v1);
        }
      }
  }
}

template <int PATH, bool UNS, bool EXACT, int WNT, int WMT>
int launch_gemm(const GemmParams &p, cudaStream_t stream) {
  constexpr int BN = Tile<WNT, WMT>::BN, BM = Tile<WNT, WMT>::BM, SMEM_BYTES = Tile<WNT, WMT>::SMEM_BYTES;
  auto kern = w4a4_gemm_kernel<PATH, UNS, EXACT, WNT, WMT>;
  static bool attr_set[64] = {};  // once per device: keeps launches legal inside CUDA-graph capture
  int dev = 0;
  NL_CHECK_CUDA(cudaGetDevice(&dev), "nl_w4a4_gemm");
  if (dev >= 64 || !attr_set[dev]) {
    NL_CHECK_CUDA(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES),
                  "nl_w4a4_gemm");
    if (dev < 64) attr_set[dev] = true;
  }
  dim3 grid(p.N / BN, (p.M + BM - 1) / BM);
  (void)nl_launch(kern, dim3(grid), dim3(THREADS), SMEM_BYTES, stream, p);
  NL_CHECK_LAUNCH("nl_w4a4_gemm");
  return NL_OK;
}

template <int PATH, int WNT, int WMT>
int dispatch_gemm(const GemmParams &p, int act_unsigned, int exact, cudaStream_t s) {
  if (act_unsigned)
    return exact ? launch_gemm<PATH, true, true, WNT, WMT>(p, s) : launch_gemm<PATH, true, false, WNT, WMT>(p, s);
  return exact ? launch_gemm<PATH, false, true, WNT, WMT>(p, s) : launch_gemm<PATH, false, false, WNT, WMT>(p, s);
}

// Block shapes: 128 x 128 (warp tile 64 x 32, ~230 registers, 8 warps per SM; the default) or 64 x 128
// (warp tile 32 x 32, <= 128 registers, 16 warps per SM). On the H100 the second was not faster (0.293 vs
// 0.278 ms at 4608 x 3072 x 3072), so occupancy is not what limits this kernel.
// NUNCHAKU_LITE_GEMM_BM=64 selects it (read at every call, for tests and benchmarks).
template <int PATH>
int dispatch_width(const GemmParams &p, int act_unsigned, int exact, cudaStream_t s) {
  const char *env = getenv("NUNCHAKU_LITE_GEMM_BM");
  if (env && atoi(env) == 64) return dispatch_gemm<PATH, 4, 2>(p, act_unsigned, exact, s);
  return dispatch_gemm<PATH, 4, 4>(p, act_unsigned, exact, s);
}

}  // namespace

extern "C" int nl_default_path(int device, int *path) {
  int major = 0;
  NL_CHECK_ARG(path, "nl_default_path: path must be non-null");
  NL_CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "nl_default_path");
  if (major < 8) return nl_fail(NL_ERR_UNSUPPORTED, "nl_default_path: device %d is sm_%d0+; sm_80 or newer needed",
                                device, major);
  *path = major == 9 ? NL_PATH_S8 : NL_PATH_S4;  // Hopper has no native 4-bit tensor cores
  return NL_OK;
}

extern "C" int nl_w4a4_gemm(const uint8_t *act_codes, const float *act_scales, int64_t ldm, int act_unsigned,
                            const uint8_t *w_tiled, const float *w_scales, const float *lora_act,
                            const void *lora_up, int lora_dtype, int rank, const float *bias, void *out,
                            int out_dtype, int64_t ldo, int64_t M, int64_t N, int64_t K, int epilogue, int path,
                            int exact, void *stream) {
  const char *k = "nl_w4a4_gemm";
  NL_CHECK_ARG(M >= 1 && M < (1LL << 31), "%s: M=%lld out of range", k, (long long)M);
  NL_CHECK_ARG(N >= 128 && N % 128 == 0 && N < (1LL << 24), "%s: N=%lld must be a positive multiple of 128", k,
               (long long)N);
  NL_CHECK_ARG(K >= 64 && K % 64 == 0 && K < (1LL << 24), "%s: K=%lld must be a positive multiple of 64", k,
               (long long)K);
  NL_CHECK_ARG(ldm >= ((M + 127) / 128) * 128 && ldm % 128 == 0,
               "%s: act scales stride ldm=%lld must be a multiple of 128 and >= M rounded up to 128", k,
               (long long)ldm);
  NL_CHECK_ARG(out_dtype == NL_BF16 || out_dtype == NL_F16 || out_dtype == NL_F32, "%s: out dtype code %d", k,
               out_dtype);
  NL_CHECK_ARG(ldo >= N && ldo % 2 == 0, "%s: out row stride %lld must be even and >= N", k, (long long)ldo);
  NL_CHECK_ARG(epilogue == NL_EPI_NONE || epilogue == NL_EPI_GELU_TANH, "%s: epilogue code %d", k, epilogue);
  NL_CHECK_ARG(rank >= 0 && rank % 16 == 0 && rank <= 1024, "%s: rank=%d must be a multiple of 16", k, rank);
  NL_CHECK_ARG(act_codes && nl_aligned(act_codes, 16), "%s: act_codes must be non-null and 16-byte aligned", k);
  NL_CHECK_ARG(act_scales && nl_aligned(act_scales, 16), "%s: act_scales must be non-null and 16-byte aligned", k);
  NL_CHECK_ARG(w_tiled && nl_aligned(w_tiled, 16), "%s: w_tiled must be non-null and 16-byte aligned", k);
  NL_CHECK_ARG(w_scales && nl_aligned(w_scales, 16), "%s: w_scales must be non-null and 16-byte aligned", k);
  NL_CHECK_ARG(out && nl_aligned(out, 8), "%s: out must be non-null and 8-byte aligned", k);
  NL_CHECK_ARG(!bias || nl_aligned(bias, 8), "%s: bias must be 8-byte aligned", k);
  if (rank > 0) {
    NL_CHECK_ARG(lora_act && nl_aligned(lora_act, 16), "%s: lora_act must be non-null, 16-byte aligned", k);
    NL_CHECK_ARG(lora_up && nl_aligned(lora_up, 16), "%s: lora_up must be non-null, 16-byte aligned", k);
    NL_CHECK_ARG(lora_dtype == NL_BF16 || lora_dtype == NL_F16, "%s: lora_up dtype code %d is not bf16/fp16", k,
                 lora_dtype);
  }
  int dev = 0;
  NL_CHECK_CUDA(cudaGetDevice(&dev), k);
  if (path == NL_PATH_AUTO) {
    const int rc = nl_default_path(dev, &path);
    if (rc) return rc;
  }
  NL_CHECK_ARG(path == NL_PATH_S4 || path == NL_PATH_S8, "%s: path code %d", k, path);
  GemmParams p{act_codes, act_scales, ldm, w_tiled, w_scales, lora_act, lora_up, lora_dtype, rank, bias, out,
               out_dtype, ldo, (int)M, (int)N, (int)K, epilogue};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return path == NL_PATH_S8 ? dispatch_width<P_S8>(p, act_unsigned, exact, s)
                            : dispatch_width<P_S4>(p, act_unsigned, exact, s);
}
