// Library-wide entry points: the thread-local error message and the version.
#include "common.cuh"

#include <cstdlib>
#include <mutex>
#include <unordered_map>

namespace {
thread_local char g_error[512] = "";
}

int nl_fail(int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_error, sizeof(g_error), fmt, ap);
  va_end(ap);
  return code;
}

extern "C" const char *nl_last_error(void) { return g_error; }

bool nl_pdl_enabled() {
  static int major_of[64] = {};  // compute capability major per device, 0 = not yet asked
  const char *env = getenv("NUNCHAKU_LITE_PDL");
  if (env && env[0] == '0') return false;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (!major_of[dev] && cudaDeviceGetAttribute(&major_of[dev], cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    return false;
  return major_of[dev] >= 9;
}

bool nl_kernel_waits(const void *kern) {
  static std::mutex lock;
  static std::unordered_map<const void *, bool> known;
  std::lock_guard<std::mutex> guard(lock);
  auto it = known.find(kern);
  if (it != known.end()) return it->second;
  cudaFuncAttributes a = {};
  const bool ok = cudaFuncGetAttributes(&a, kern) == cudaSuccess && a.ptxVersion >= 90;
  known.emplace(kern, ok);
  return ok;
}

// 2: the quantize kernels take 1/smooth (inv_smooth) instead of smooth; nl_w4a4_gemm_s8 takes a workspace.
// 3: nl_w4a4_gemm_s8 takes epilogue NL_EPI_ACCUMULATE.
extern "C" int nl_version(void) { return 3; }
