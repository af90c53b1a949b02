#include "absl/status/status.h"
#include "storage/tier_copier.h"

namespace kvcache {

absl::StatusOr<std::unique_ptr<TierCopier>> CreateCudaTierCopier(
    Device&, absl::Span<const TierRun>, int64_t, int32_t) {
  return absl::FailedPreconditionError(
      "kvcache was built without CUDA support: no CUDA host tier");
}

}  // namespace kvcache
