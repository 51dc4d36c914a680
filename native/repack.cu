// Weight repacking: canonical packed INT4 [N, K/2] (quant/ops.py pack_int4) -> the W4A4 GEMM's tile order.
//
// Tile order: tiled[nb][g][r][32 bytes] for 128-row blocks nb = n / 128 and 64-wide K groups g, r = n % 128;
// within a row the two 16-byte halves (k 0..31 and 32..63 of the group) are swapped when (r >> 2) & 1, the
// XOR swizzle the GEMM's shared-memory tiles use (so each pipeline stage is one linear, coalesced 4 KB copy).
// Byte contents are unchanged (low nibble = even k). Run once per weight at load time.
#include "common.cuh"

namespace {
__global__ void repack_kernel(const uint4 *__restrict__ src, uint4 *__restrict__ dst, int64_t chunks, int K) {
  const int per_row = K / 32;  // 16-byte chunks per canonical row
  const int G = K / 64;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < chunks; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = i / per_row;
    const int q = (int)(i % per_row), g = q >> 1, c = q & 1;
    const int64_t nb = n >> 7;
    const int r = (int)(n & 127);
    dst[((nb * G + g) * 128 + r) * 2 + (c ^ ((r >> 2) & 1))] = src[i];
  }
}
}  // namespace

extern "C" int nl_repack_weight(const uint8_t *qweight, int64_t N, int64_t K, uint8_t *tiled, void *stream) {
  const char *k = "nl_repack_weight";
  NL_CHECK_ARG(N >= 128 && N % 128 == 0, "%s: N=%lld must be a positive multiple of 128", k, (long long)N);
  NL_CHECK_ARG(K >= 64 && K % 64 == 0 && K < (1LL << 24), "%s: K=%lld must be a positive multiple of 64", k,
               (long long)K);
  NL_CHECK_ARG(qweight && nl_aligned(qweight, 16), "%s: qweight must be non-null and 16-byte aligned", k);
  NL_CHECK_ARG(tiled && nl_aligned(tiled, 16), "%s: tiled must be non-null and 16-byte aligned", k);
  NL_CHECK_ARG(qweight != tiled, "%s: in-place repacking is not supported", k);
  const int64_t chunks = N * K / 32;
  const int blocks = (int)((chunks + 255) / 256 < 65535 ? (chunks + 255) / 256 : 65535);
  repack_kernel<<<blocks, 256, 0, static_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const uint4 *>(qweight), reinterpret_cast<uint4 *>(tiled), chunks, (int)K);
  NL_CHECK_LAUNCH(k);
  return NL_OK;
}
