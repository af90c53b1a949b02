// KVCACHE_CUDA_RETURN_IF_ERROR: the one way host code checks a CUDA runtime
// call. On failure it returns absl::InternalError naming the call, the CUDA
// error and file:line, and clears CUDA's sticky last error.

#ifndef KVCACHE_CORE_CUDA_CHECK_H_
#define KVCACHE_CORE_CUDA_CHECK_H_

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvcache::internal {

inline absl::Status CudaErrorToStatus(cudaError_t err, const char* call,
                                      const char* file, int line) {
  cudaGetLastError();  // Clear it so later calls do not see this error.
  return absl::InternalError(
      absl::StrCat(call, " failed: ", cudaGetErrorName(err), " (",
                   cudaGetErrorString(err), ") at ", file, ":", line));
}

}  // namespace kvcache::internal

#define KVCACHE_CUDA_RETURN_IF_ERROR(call)                                   \
  do {                                                                       \
    const cudaError_t kvcache_cuda_err = (call);                             \
    if (kvcache_cuda_err != cudaSuccess) {                                   \
      return ::kvcache::internal::CudaErrorToStatus(kvcache_cuda_err, #call, \
                                                    __FILE__, __LINE__);     \
    }                                                                        \
  } while (0)

#endif  // KVCACHE_CORE_CUDA_CHECK_H_
