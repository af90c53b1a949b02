// Queries of the CUDA runtime that do not depend on any kernel: how many
// devices there are.
//
// Thread-safe. In a build without a CUDA toolkit every function reports "built
// without CUDA support" as FailedPrecondition.

#ifndef KVCACHE_STORAGE_CUDA_RUNTIME_H_
#define KVCACHE_STORAGE_CUDA_RUNTIME_H_

#include "absl/status/statusor.h"

namespace kvcache {

// True when this binary was compiled with the CUDA backend.
bool BuiltWithCuda();

// Number of visible CUDA devices; 0 when there is a driver but no device (or no
// driver at all).
absl::StatusOr<int> CudaDeviceCount();

}  // namespace kvcache

#endif  // KVCACHE_STORAGE_CUDA_RUNTIME_H_
