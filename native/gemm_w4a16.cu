// W4A16 GEMV/GEMM for the modulation linears (reference: quant/ops.py w4a16_linear).
//
// Math: out[m, n] = sum_g ( scale[n, g] * sum_{k in g} x[m, k] * c[n, k]  (+ zero[n, g] * sum_{k in g} x[m, k]) )
//                   + bias[n], fp32 throughout, cast to x's dtype. Codes c are signed (-8..7) without zeros,
//                   unsigned (0..15, W = U*s + z) with zeros. The per-group factoring changes only fp32
//                   rounding order versus the reference's dequantize-then-matmul.
// Layout: qweight canonical [N, K/2] (no repacking: read once, memory-bound), scales/zeros float [N, K/64].
// Work split: one warp per output feature n; each lane takes 16-byte weight chunks (32 codes, half a group),
// decodes them once into fp32 (magic-number conversion: (0x4B000000 | u) as float - 2^23, no I2F), and
// applies them to up to 4 token rows at a time; warp-shuffle reduction. Meant for small M (batch of
// modulation vectors); any M works.
#include "common.cuh"

namespace {
constexpr int WARPS = 8, MB = 4;

template <typename T, bool ZEROS>
__global__ void __launch_bounds__(WARPS * 32)
w4a16_kernel(const T *__restrict__ x, int64_t ldx, const uint8_t *__restrict__ qw, const float *__restrict__ scales,
             const float *__restrict__ zeros, const float *__restrict__ bias, T *__restrict__ out, int64_t ldo, int M,
             int N, int K) {
  pdl_trigger();  // launched by nl_launch: see common.cuh
  pdl_wait();
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (n >= N) return;
  const int chunks = K / 32, G = K / 64;
  const uint4 *wrow = reinterpret_cast<const uint4 *>(qw + (int64_t)n * (K / 2));
  for (int m0 = 0; m0 < M; m0 += MB) {
    float acc[MB] = {};
    for (int q = lane; q < chunks; q += 32) {
      const uint4 w4 = __ldg(wrow + q);
      const uint32_t w[4] = {w4.x, w4.y, w4.z, w4.w};
      float c[32];
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        uint32_t u = (w[j >> 3] >> (4 * (j & 7))) & 0xfu;
        if (!ZEROS) u ^= 0x8u;  // two's complement nibble -> c + 8
        c[j] = __uint_as_float(0x4B000000u | u) - (ZEROS ? 8388608.f : 8388616.f);
      }
      const int g = q >> 1;
      const float s = scales[(int64_t)n * G + g];
      const float z = ZEROS ? zeros[(int64_t)n * G + g] : 0.f;
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
        if (m0 + mb < M) {
          const uint4 *xr = reinterpret_cast<const uint4 *>(x + (int64_t)(m0 + mb) * ldx + q * 32);
          float dot = 0.f, xsum = 0.f;
#pragma unroll
          for (int v = 0; v < 4; ++v) {
            const uint4 xv = __ldg(xr + v);
            const uint32_t xw[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const float2 f = unpack2<T>(xw[j]);
              dot = fmaf(f.x, c[v * 8 + 2 * j], dot);
              dot = fmaf(f.y, c[v * 8 + 2 * j + 1], dot);
              if (ZEROS) xsum += f.x + f.y;
            }
          }
          acc[mb] = fmaf(dot, s, acc[mb]);
          if (ZEROS) acc[mb] = fmaf(xsum, z, acc[mb]);
        }
      }
    }
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
      float v = acc[mb];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0 && m0 + mb < M) {
        if (bias) v += bias[n];
        const uint32_t packed = pack2<T>(v, 0.f);
        out[(int64_t)(m0 + mb) * ldo + n] = *reinterpret_cast<const T *>(&packed);
      }
    }
  }
}

template <typename T>
int launch(const void *x, int64_t ldx, const uint8_t *qw, const float *scales, const float *zeros, const float *bias,
           void *out, int64_t ldo, int M, int N, int K, cudaStream_t s) {
  const int blocks = (N + WARPS - 1) / WARPS;
  if (zeros)
    (void)nl_launch(w4a16_kernel<T, true>, dim3(blocks), dim3(WARPS * 32), 0, s, static_cast<const T *>(x), ldx, qw,
                    scales, zeros, bias, static_cast<T *>(out), ldo, M, N, K);
  else
    (void)nl_launch(w4a16_kernel<T, false>, dim3(blocks), dim3(WARPS * 32), 0, s, static_cast<const T *>(x), ldx, qw,
                    scales, zeros, bias, static_cast<T *>(out), ldo, M, N, K);
  NL_CHECK_LAUNCH("nl_w4a16_gemm");
  return NL_OK;
}
}  // namespace

extern "C" int nl_w4a16_gemm(const void *x, int x_dtype, int64_t ldx, const uint8_t *qweight, const float *scales,
                             const float *zeros, const float *bias, void *out, int64_t ldo, int64_t M, int64_t N,
                             int64_t K, void *stream) {
  const char *k = "nl_w4a16_gemm";
  NL_CHECK_ARG(x_dtype == NL_BF16 || x_dtype == NL_F16, "%s: x dtype code %d is not bf16/fp16", k, x_dtype);
  NL_CHECK_ARG(M >= 1 && M < (1LL << 31), "%s: M=%lld out of range", k, (long long)M);
  NL_CHECK_ARG(N >= 1 && N < (1LL << 31), "%s: N=%lld out of range", k, (long long)N);
  NL_CHECK_ARG(K >= 64 && K % 64 == 0 && K < (1LL << 24), "%s: K=%lld must be a positive multiple of 64", k,
               (long long)K);
  NL_CHECK_ARG(ldx >= K && ldx % 8 == 0, "%s: x row stride %lld must be >= K and a multiple of 8", k, (long long)ldx);
  NL_CHECK_ARG(ldo >= N, "%s: out row stride %lld must be >= N", k, (long long)ldo);
  NL_CHECK_ARG(x && nl_aligned(x, 16), "%s: x must be non-null and 16-byte aligned", k);
  NL_CHECK_ARG(qweight && nl_aligned(qweight, 16), "%s: qweight must be non-null and 16-byte aligned", k);
  NL_CHECK_ARG(scales, "%s: scales must be non-null", k);
  NL_CHECK_ARG(out, "%s: out must be non-null", k);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (x_dtype == NL_BF16)
    return launch<__nv_bfloat16>(x, ldx, qweight, scales, zeros, bias, out, ldo, (int)M, (int)N, (int)K, s);
  return launch<__half>(x, ldx, qweight, scales, zeros, bias, out, ldo, (int)M, (int)N, (int)K, s);
}
