#include "absl/status/status.h"
#include "storage/cuda_runtime.h"

namespace kvcache {

bool BuiltWithCuda() { return false; }

absl::StatusOr<int> CudaDeviceCount() {
  return absl::FailedPreconditionError(
      "kvcache was built without CUDA support");
}

}  // namespace kvcache
