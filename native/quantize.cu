// Activation quantization + low-rank down projection (reference: quant/ops.py quantize_act and the
// x @ lora_down^T half of the low-rank branch).
//
// Math, per token m and 64-wide group g (all fp32, IEEE division as in the reference, bit-identical codes):
//   xs = (x + shift) / smooth            (shift 0 for signed layers; smooth omitted when NULL)
//   scale = max|xs| / 7   codes = clamp(rint(xs / scale), -8, 7)         signed
//   scale = max|xs| / 15  codes = clamp(rint(xs / scale),  0, 15)        unsigned
//   scale == 0 -> codes 0
//   lora_act[m, :] = x[m, :] @ lora_down^T   (16-bit operands on tensor cores, fp32 accumulation; the raw x)
// Layout written: codes uint8 [M, K/2] (low nibble = even k), scales float [K/64, ldm] (rows >= M get 0),
// lora_act float [M, rank].
//
// Tiling: a block owns BM = 16*MT tokens and all of K; its QWARPS warps split the K groups round-robin (warp w
// takes g = w, w+QWARPS, ...), each with its own cp.async pipeline of STAGES tiles [BM x 64] of x and
// [rank x 64] of lora_down in shared memory (16-byte chunks XOR-swizzled by row so ldmatrix is
// conflict-free). Quantization: 8 lanes per (token, group), 8 elements each, amax by 3 shuffles; each lane
// writes one 32-bit word of codes. Low-rank: mma.m16n8k16 per warp on its groups, partial sums reduced over
// the warps through shared memory in a fixed order (deterministic). The kernel is latency-bound (IEEE
// divisions, shuffles), so it is shaped for many resident warps: 16 tokens per block, 8 warps (rank <= 32).
#include "common.cuh"

namespace {

template <typename T, int MT, int MAXR, int STAGES, int QWARPS>
struct QuantCfg {
  static constexpr int BM = 16 * MT;
  static constexpr int X_BYTES = BM * 128;      // BM rows x 64 elements x 2 bytes
  static constexpr int L_BYTES = MAXR * 128;    // rank rows x 64 elements x 2 bytes
  static constexpr int STAGE_BYTES = X_BYTES + L_BYTES;
  static constexpr int PIPE_BYTES = QWARPS * STAGES * STAGE_BYTES;
  static constexpr int RED_STRIDE = MAXR + 4;   // floats per row of the cross-warp reduction buffer
  static constexpr int RED_BYTES = QWARPS * BM * RED_STRIDE * 4;
  static constexpr int SMEM = PIPE_BYTES > RED_BYTES ? PIPE_BYTES : RED_BYTES;
};

template <typename T, int MT, int MAXR, int STAGES, int QWARPS>
__global__ void __launch_bounds__(QWARPS * 32)
quantize_act_kernel(const T *__restrict__ x, int M, int K, int64_t ldx, const float *__restrict__ smooth,
                    float shift, int act_unsigned, const T *__restrict__ lora_down, int rank,
                    uint8_t *__restrict__ codes, float *__restrict__ scales, int64_t ldm,
                    float *__restrict__ lora_act) {
  using C = QuantCfg<T, MT, MAXR, STAGES, QWARPS>;
  extern __shared__ __align__(128) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int m0 = blockIdx.x * C::BM;
  const int G = K / 64;
  const int ng = G > warp ? (G - warp + QWARPS - 1) / QWARPS : 0;
  uint8_t *my_pipe = smem + warp * STAGES * C::STAGE_BYTES;

  auto load_group = [&](int it, int stage) {
    const int g = warp + it * QWARPS;
    uint8_t *xs = my_pipe + stage * C::STAGE_BYTES, *ls = xs + C::X_BYTES;
#pragma unroll
    for (int i = lane; i < C::BM * 8; i += 32) {
      const int row = i >> 3, c = i & 7, m = m0 + row;
      const T *src = x + (int64_t)(m < M ? m : 0) * ldx + g * 64 + c * 8;
      cp_async16(xs + row * 128 + ((c ^ (row & 7)) << 4), src, m < M ? 16 : 0);
    }
    for (int i = lane; i < rank * 8; i += 32) {
      const int row = i >> 3, c = i & 7;
      cp_async16(ls + row * 128 + ((c ^ (row & 7)) << 4), lora_down + (int64_t)row * K + g * 64 + c * 8);
    }
  };

  float acc[MT][MAXR / 8][4];
#pragma unroll
  for (int a = 0; a < MT; ++a)
#pragma unroll
    for (int b = 0; b < MAXR / 8; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;

  const float qmax = act_unsigned ? 15.f : 7.f, qlo = act_unsigned ? 0.f : -8.f, qhi = act_unsigned ? 15.f : 7.f;
  const int chunk = lane & 7;  // this lane's 8-element slice of every group

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ng) load_group(s, s);
    cp_async_commit();
  }
  for (int it = 0; it < ng; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncwarp();
    if (it + STAGES - 1 < ng) load_group(it + STAGES - 1, (it + STAGES - 1) % STAGES);
    cp_async_commit();

    const int g = warp + it * QWARPS;
    const uint8_t *xs = my_pipe + (it % STAGES) * C::STAGE_BYTES, *ls = xs + C::X_BYTES;

    // ---- quantization: 4 tokens per pass, 8 lanes per token
    float sm[8];
    if (smooth) {
      const float4 s0 = __ldg(reinterpret_cast<const float4 *>(smooth + g * 64 + chunk * 8));
      const float4 s1 = __ldg(reinterpret_cast<const float4 *>(smooth + g * 64 + chunk * 8 + 4));
      sm[0] = s0.x; sm[1] = s0.y; sm[2] = s0.z; sm[3] = s0.w; sm[4] = s1.x; sm[5] = s1.y; sm[6] = s1.z; sm[7] = s1.w;
    }
#pragma unroll
    for (int rr = 0; rr < C::BM / 4; ++rr) {
      const int row = rr * 4 + (lane >> 3), m = m0 + row;
      const uint4 raw = *reinterpret_cast<const uint4 *>(xs + row * 128 + ((chunk ^ (row & 7)) << 4));
      const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
      float v[8], amax = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = unpack2<T>(w[j]);
        v[2 * j] = f.x; v[2 * j + 1] = f.y;
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        v[j] = __fadd_rn(v[j], shift);
        if (smooth) v[j] = __fdiv_rn(v[j], sm[j]);
        amax = fmaxf(amax, fabsf(v[j]));
      }
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
      const float scale = __fdiv_rn(amax, qmax);
      uint32_t word = 0;
      if (scale > 0.f) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float q = fminf(fmaxf(rintf(__fdiv_rn(v[j], scale)), qlo), qhi);
          word |= (static_cast<uint32_t>(static_cast<int>(q)) & 0xfu) << (4 * j);
        }
      }
      if (m < M) *reinterpret_cast<uint32_t *>(codes + (int64_t)m * (K / 2) + g * 32 + chunk * 4) = word;
      if (chunk == 0) scales[(int64_t)g * ldm + m] = m < M ? scale : 0.f;
    }

    // ---- low-rank down: acc[BM x rank] += x_tile[BM x 64] @ lora_tile[rank x 64]^T
    if (rank > 0) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int row = mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          const int c = kk * 2 + (lane >> 4);
          ldmatrix_x4(a[mt], xs + row * 128 + ((c ^ (row & 7)) << 4));
        }
#pragma unroll
        for (int np = 0; np < MAXR / 16; ++np) {
          if (np * 16 < rank) {
            uint32_t b[4];
            const int row = np * 16 + (lane & 7) + (lane >> 4) * 8;
            const int c = kk * 2 + ((lane >> 3) & 1);
            ldmatrix_x4(b, ls + row * 128 + ((c ^ (row & 7)) << 4));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              mma_16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
              mma_16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
            }
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  if (rank == 0) return;

  // ---- reduce the 4 warps' partial low-rank sums (fixed order) and write lora_act
  __syncthreads();
  float *red = reinterpret_cast<float *>(smem);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < MAXR / 8; ++nt)
      if (nt * 8 < rank)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = mt * 16 + (lane >> 2) + (i >= 2 ? 8 : 0), col = nt * 8 + (lane & 3) * 2 + (i & 1);
          red[(warp * C::BM + row) * C::RED_STRIDE + col] = acc[mt][nt][i];
        }
  __syncthreads();
  for (int idx = threadIdx.x; idx < C::BM * rank; idx += blockDim.x) {
    const int row = idx / rank, col = idx % rank, m = m0 + row;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < QWARPS; ++w) s += red[(w * C::BM + row) * C::RED_STRIDE + col];
    if (m < M) lora_act[(int64_t)m * rank + col] = s;
  }
}

template <typename T, int MT, int MAXR, int STAGES, int QWARPS>
int launch_quantize(const void *x, int M, int K, int64_t ldx, const float *smooth, float shift, int act_unsigned,
                    const void *lora_down, int rank, uint8_t *codes, float *scales, int64_t ldm, float *lora_act,
                    cudaStream_t stream) {
  using C = QuantCfg<T, MT, MAXR, STAGES, QWARPS>;
  auto kern = quantize_act_kernel<T, MT, MAXR, STAGES, QWARPS>;
  static bool attr_set[64] = {};  // once per device: keeps launches legal inside CUDA-graph capture
  int dev = 0;
  NL_CHECK_CUDA(cudaGetDevice(&dev), "nl_quantize_act");
  if (dev >= 64 || !attr_set[dev]) {
    NL_CHECK_CUDA(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM),
                  "nl_quantize_act");
    if (dev < 64) attr_set[dev] = true;
  }
  const int blocks = (int)(ldm / C::BM);
  kern<<<blocks, QWARPS * 32, C::SMEM, stream>>>(static_cast<const T *>(x), M, K, ldx, smooth, shift, act_unsigned,
                                                  static_cast<const T *>(lora_down), rank, codes, scales, ldm,
                                                  lora_act);
  NL_CHECK_LAUNCH("nl_quantize_act");
  return NL_OK;
}

template <typename T>
int dispatch_quantize(const void *x, int M, int K, int64_t ldx, const float *smooth, float shift, int act_unsigned,
                      const void *lora_down, int rank, uint8_t *codes, float *scales, int64_t ldm, float *lora_act,
                      cudaStream_t stream) {
  // 16 tokens per block (M = 4608 gives 288 blocks); 8 warps x 2 stages (96 KB: two blocks per SM) for
  // rank <= 32, 4 warps for larger ranks (their lora_down tiles are bigger).
  if (rank <= 32)
    return launch_quantize<T, 1, 32, 2, 8>(x, M, K, ldx, smooth, shift, act_unsigned, lora_down, rank, codes,
                                           scales, ldm, lora_act, stream);
  return launch_quantize<T, 1, 128, 2, 4>(x, M, K, ldx, smooth, shift, act_unsigned, lora_down, rank, codes, scales,
                                          ldm, lora_act, stream);
}

}  // namespace

extern "C" int nl_quantize_act(const void *x, int x_dtype, int64_t M, int64_t K, int64_t ldx, const float *smooth,
                               float shift, int act_unsigned, const void *lora_down, int rank, uint8_t *codes,
                               float *scales, int64_t ldm, float *lora_act, void *stream) {
  const char *k = "nl_quantize_act";
  NL_CHECK_ARG(x_dtype == NL_BF16 || x_dtype == NL_F16, "%s: x dtype code %d is not bf16/fp16", k, x_dtype);
  NL_CHECK_ARG(M >= 1 && M < (1LL << 31), "%s: M=%lld out of range", k, (long long)M);
  NL_CHECK_ARG(K >= 64 && K % 64 == 0 && K < (1LL << 24), "%s: K=%lld must be a positive multiple of 64", k,
               (long long)K);
  NL_CHECK_ARG(ldx >= K && ldx % 8 == 0, "%s: x row stride %lld must be >= K and a multiple of 8", k,
               (long long)ldx);
  NL_CHECK_ARG(ldm >= M && ldm % 128 == 0, "%s: scales stride ldm=%lld must be >= M and a multiple of 128", k,
               (long long)ldm);
  NL_CHECK_ARG(rank >= 0 && rank <= 128 && rank % 16 == 0, "%s: rank=%d must be a multiple of 16 in [0, 128]", k,
               rank);
  NL_CHECK_ARG(x && nl_aligned(x, 16), "%s: x must be a non-null 16-byte aligned pointer", k);
  NL_CHECK_ARG(codes && nl_aligned(codes, 16), "%s: codes must be a non-null 16-byte aligned pointer", k);
  NL_CHECK_ARG(scales && nl_aligned(scales, 16), "%s: scales must be a non-null 16-byte aligned pointer", k);
  NL_CHECK_ARG(!smooth || nl_aligned(smooth, 16), "%s: smooth must be 16-byte aligned", k);
  NL_CHECK_ARG(rank == 0 || (lora_down && nl_aligned(lora_down, 16)),
               "%s: lora_down must be a non-null 16-byte aligned pointer when rank > 0", k);
  NL_CHECK_ARG(rank == 0 || lora_act, "%s: lora_act must be non-null when rank > 0", k);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (x_dtype == NL_BF16)
    return dispatch_quantize<__nv_bfloat16>(x, (int)M, (int)K, ldx, smooth, shift, act_unsigned, lora_down, rank,
                                            codes, scales, ldm, lora_act, s);
  return dispatch_quantize<__half>(x, (int)M, (int)K, ldx, smooth, shift, act_unsigned, lora_down, rank, codes,
                                   scales, ldm, lora_act, s);
}
