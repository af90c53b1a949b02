#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "storage/cuda_runtime.h"

namespace kvcache {

bool BuiltWithCuda() { return true; }

absl::StatusOr<int> CudaDeviceCount() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    cudaGetLastError();  // Clear the sticky error.
    return 0;
  }
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::InternalError(
        absl::StrCat("cudaGetDeviceCount failed: ", cudaGetErrorString(err)));
  }
  return count;
}

}  // namespace kvcache
