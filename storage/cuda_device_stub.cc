#include "absl/status/status.h"
#include "storage/device.h"

namespace kvcache {

absl::StatusOr<std::unique_ptr<Device>> CreateCudaDevice(int /*ordinal*/) {
  return absl::FailedPreconditionError(
      "kvcache was built without CUDA support: use the CPU backend");
}

}  // namespace kvcache
