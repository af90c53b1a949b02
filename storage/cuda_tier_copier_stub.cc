#include "absl/status/status.h"
#include "storage/tier_copier.h"

namespace kvcache {

absl::StatusOr<std::unique_ptr<TierCopier>> CreateCudaTierCopier(Device&,
                                                                 int64_t) {
  return absl::FailedPreconditionError(
      "kvcache was built without CUDA support: no CUDA host tier");
}

}  // namespace kvcache
