#include "benchmarks/replay/synthetic_kv_cuda.h"

namespace kvcache::replay {

absl::Status FillSyntheticCuda(const SyntheticFillParams&, void*) {
  return absl::FailedPreconditionError(
      "kvcache was built without CUDA support");
}

}  // namespace kvcache::replay
