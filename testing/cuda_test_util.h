// Test helper: skips the current test with a clear message when no CUDA device
// can run it.

#ifndef KVCACHE_TESTING_CUDA_TEST_UTIL_H_
#define KVCACHE_TESTING_CUDA_TEST_UTIL_H_

#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "storage/cuda_runtime.h"

// Use at the top of a TEST body.
#define KVCACHE_SKIP_WITHOUT_GPU()                                       \
  do {                                                                   \
    absl::StatusOr<int> kvcache_devices = ::kvcache::CudaDeviceCount();  \
    if (!kvcache_devices.ok()) {                                         \
      GTEST_SKIP() << "skipped: " << kvcache_devices.status().message(); \
    }                                                                    \
    if (*kvcache_devices == 0) {                                         \
      GTEST_SKIP() << "skipped: no CUDA device on this host (the CUDA "  \
                      "backend is tested on a GPU host)";                \
    }                                                                    \
  } while (0)

#endif  // KVCACHE_TESTING_CUDA_TEST_UTIL_H_
