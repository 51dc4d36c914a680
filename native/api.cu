// Library-wide entry points: the thread-local error message and the version.
#include "common.cuh"

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
// 2: the quantize kernels take 1/smooth (inv_smooth) instead of smooth; nl_w4a4_gemm_s8 takes a workspace.
extern "C" int nl_version(void) { return 2; }
