// KVCACHE_CUDA_RETURN_IF_ERROR(call): evaluates a CUDA runtime call and, when
// it fails, returns absl::InternalError naming the call, the CUDA error and
// file:line from the enclosing function. Used by every CUDA call of the
// kernels' launchers; nothing prints, exits or traps.

#ifndef KVCACHE_KERNELS_CUDA_CHECK_H_
#define KVCACHE_KERNELS_CUDA_CHECK_H_

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvcache::internal {

inline absl::Status CudaErrorStatus(cudaError_t err, const char* call,
                                    const char* file, int line) {
  return absl::InternalError(
      absl::StrCat(call, " failed: ", cudaGetErrorName(err), " (",
                   cudaGetErrorString(err), ") at ", file, ":", line));
}

}  // namespace kvcache::internal

#define KVCACHE_CUDA_RETURN_IF_ERROR(call)                                  \
  do {                                                                      \
    const cudaError_t kvcache_cuda_err_ = (call);                           \
    if (kvcache_cuda_err_ != cudaSuccess) {                                 \
      return ::kvcache::internal::CudaErrorStatus(kvcache_cuda_err_, #call, \
                                                  __FILE__, __LINE__);      \
    }                                                                       \
  } while (0)

#endif  // KVCACHE_KERNELS_CUDA_CHECK_H_
