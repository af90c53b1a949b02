// A trivial kernel that proves the CUDA toolchain end to end: it adds one to
// every element.

#ifndef KVCACHE_TESTS_CUDA_SMOKE_KERNEL_H_
#define KVCACHE_TESTS_CUDA_SMOKE_KERNEL_H_

#include <vector>

#include "absl/status/status.h"

namespace kvcache::testing {

// Copies `values` to device 0, adds one to each on the device and copies them
// back.
absl::Status AddOneOnDevice(std::vector<int>& values);

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_CUDA_SMOKE_KERNEL_H_
