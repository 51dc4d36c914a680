// Shared helpers for the nunchaku_lite kernels: error reporting, cp.async, ldmatrix and mma wrappers.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <stdarg.h>
#include <stdio.h>

#include "nunchaku_lite.h"

// ---- errors (host) ---------------------------------------------------------------------------------------
// Set the thread-local message and return the code, so call sites read `return nl_fail(...)`.
int nl_fail(int code, const char *fmt, ...);

#define NL_CHECK_ARG(cond, ...) do { if (!(cond)) return nl_fail(NL_ERR_ARGUMENT, __VA_ARGS__); } while (0)
#define NL_CHECK_CUDA(call, kernel) do { cudaError_t e_ = (call); if (e_ != cudaSuccess) \
    return nl_fail(NL_ERR_CUDA, "%s: %s", kernel, cudaGetErrorString(e_)); } while (0)
// After a launch: configuration errors surface here (asynchronous faults surface at the next sync).
#define NL_CHECK_LAUNCH(kernel) NL_CHECK_CUDA(cudaGetLastError(), kernel)

static inline bool nl_aligned(const void *p, int bytes) { return ((uintptr_t)p % bytes) == 0; }

// ---- programmatic dependent launch (PDL, sm_90) ----------------------------------------------------------
// nl_launch starts a kernel with the ProgrammaticStreamSerialization attribute on sm_90 devices: its CTAs may
// be scheduled while the previous kernel of the stream is still running, once every CTA of that kernel has
// started (pdl_trigger at each kernel's top). Every kernel launched through nl_launch calls pdl_wait() first,
// before it reads or writes global memory: that returns when the previous kernel has completed and its writes
// are visible, so memory effects keep the stream's order and what overlaps the previous kernel's tail is the
// launch latency and the CTAs' dispatch. Both are no-ops for a plain launch and below sm_90. The attribute is
// set only for kernels whose code was compiled for sm_90+ (nl_kernel_waits: PTX of an older target, JIT-compiled
// on a newer GPU, would have no wait). Inside CUDA-graph capture it becomes a programmatic graph edge.
// NUNCHAKU_LITE_PDL=0 launches plainly (comparisons).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

bool nl_pdl_enabled();                  // api.cu: the current device is sm_90+ and NUNCHAKU_LITE_PDL is not 0
bool nl_kernel_waits(const void *kern);  // api.cu: kern's code is of an sm_90+ target (cached per kernel)

template <typename... P, typename... A>
cudaError_t nl_launch(void (*kern)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A &&...args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1] = {};
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  if (nl_pdl_enabled() && nl_kernel_waits(reinterpret_cast<const void *>(kern))) {
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&cfg, kern, static_cast<A &&>(args)...);
}

// NL_ERR_UNSUPPORTED unless the current device is sm_90 (the sm_90a kernels' host entries).
static inline int nl_check_sm90(const char *k) {
  int dev = 0, major = 0, minor = 0;
  NL_CHECK_CUDA(cudaGetDevice(&dev), k);
  NL_CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), k);
  NL_CHECK_CUDA(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), k);
  if (major != 9 || minor != 0)
    return nl_fail(NL_ERR_UNSUPPORTED, "%s: needs an sm_90 (Hopper) device, device %d is sm_%d%d", k, dev, major,
                   minor);
  return NL_OK;
}

// The argument checks the sm_90 GEMM entries share: token count M, output features N, the activation
// operand's padded rows mp, output dtype, epilogue, bias and the low-rank operands (K and the operand pointers
// are each entry's own).
static inline int nl_check_sm90_gemm(const char *k, int64_t M, int64_t N, int64_t mp, int out_dtype, int epilogue,
                                     const float *bias, int rank, const float *lora_act, const void *lora_up,
                                     int lora_dtype) {
  NL_CHECK_ARG(M >= 1 && M < (1LL << 31), "%s: M=%lld out of range", k, (long long)M);
  NL_CHECK_ARG(N >= 128 && N % 128 == 0 && N < (1LL << 24), "%s: N=%lld must be a positive multiple of 128", k,
               (long long)N);
  NL_CHECK_ARG(mp >= M && mp % 256 == 0 && mp < (1LL << 31),
               "%s: activation rows mp=%lld must be M rounded up to a multiple of 256", k, (long long)mp);
  NL_CHECK_ARG(out_dtype == NL_BF16 || out_dtype == NL_F16 || out_dtype == NL_F32, "%s: out dtype code %d", k,
               out_dtype);
  NL_CHECK_ARG(epilogue == NL_EPI_NONE || epilogue == NL_EPI_GELU_TANH, "%s: epilogue code %d", k, epilogue);
  NL_CHECK_ARG(!bias || nl_aligned(bias, 4), "%s: bias must be 4-byte aligned", k);
  NL_CHECK_ARG(rank >= 0 && rank % 16 == 0 && rank <= 1024, "%s: rank=%d must be a multiple of 16", k, rank);
  if (rank > 0) {
    NL_CHECK_ARG(lora_act && nl_aligned(lora_act, 16), "%s: lora_act must be non-null, 16-byte aligned", k);
    NL_CHECK_ARG(lora_up && nl_aligned(lora_up, 16), "%s: lora_up must be non-null, 16-byte aligned", k);
    NL_CHECK_ARG(lora_dtype == NL_BF16 || lora_dtype == NL_F16, "%s: lora_up dtype code %d is not bf16/fp16", k,
                 lora_dtype);
  }
  return NL_OK;
}

// The current device's SM count (cached per device and translation unit).
static inline int nl_sm_count(const char *k, int *sms) {
  static int cache[64] = {};
  int dev = 0;
  NL_CHECK_CUDA(cudaGetDevice(&dev), k);
  if (dev < 64 && cache[dev]) return *sms = cache[dev], NL_OK;
  NL_CHECK_CUDA(cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, dev), k);
  if (dev < 64) cache[dev] = *sms;
  return NL_OK;
}

// Raise kern's dynamic shared memory limit to `bytes`, once per device (done: the caller's static flags):
// cudaFuncSetAttribute is not allowed inside CUDA-graph capture, so captured launches must not repeat it.
template <typename F>
static inline int nl_smem_once(F *kern, int bytes, bool (&done)[64], const char *k) {
  int dev = 0;
  NL_CHECK_CUDA(cudaGetDevice(&dev), k);
  if (dev >= 64 || !done[dev]) {
    NL_CHECK_CUDA(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), k);
    if (dev < 64) done[dev] = true;
  }
  return NL_OK;
}

// ---- device helpers --------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous global->shared copy; src_bytes = 0 zero-fills the destination (out-of-range rows).
__device__ __forceinline__ void cp_async16(void *dst, const void *src, int src_bytes = 16) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}

// D = A*B + C, m16n8k16, fp32 accumulate; T selects bf16 or fp16 operands.
template <typename T> __device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                                                uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                                    uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                             uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

// Two floats -> one register of two 16-bit values (low half = first), round to nearest.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}
// Inverse of pack2 (exact).
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t v);
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  __half2 h = *reinterpret_cast<__half2 *>(&v);
  return __half22float2(h);
}

// The next layer's power-of-two token scales of a GEMM's output, formed in its epilogue (nl_w4a4_gemm_s8's
// next_token_scale; sm90.cuh token_scale_of_rows): tok[m] = max(tok[m], max over the tile's BN columns n of
// |(out + shift) * inv[n]| / qmax), out the rounded 16-bit value written, each op rounded as nl_act_stats does.
// The division is monotone, so the maximum of the tiles' quotients is the quotient of the row's maximum: the
// same bits as nl_act_stats.
struct NextScale {
  const float *inv;  // [N] (the next layer's 1 / smooth) or NULL
  float *tok;        // [M], NULL: nothing to do
  float shift, qmax;
};

// ---- epilogue activation ---------------------------------------------------------------------------------
// GELU(tanh) of a GEMM output as the unfused path computes it: the linear's output is first rounded to the
// output dtype (the 16-bit tensor it would have written), then GELU in fp32, then the caller rounds again.
// Rounding first keeps the next layer's activation codes identical to the unfused path's.
__device__ __forceinline__ float gelu_tanh(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.f + tanhf(u));
}
__device__ __forceinline__ float round_as(float v, int dtype) {
  if (dtype == NL_BF16) return __bfloat162float(__float2bfloat16_rn(v));
  if (dtype == NL_F16) return __half2float(__float2half_rn(v));
  return v;
}
__device__ __forceinline__ float gelu_epilogue(float v, int out_dtype) { return gelu_tanh(round_as(v, out_dtype)); }
