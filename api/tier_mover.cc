#include "api/tier_mover.h"

#include <algorithm>
#include <new>

#include "absl/strings/str_cat.h"
#include "storage/block_runs.h"

namespace kvcache::internal {

absl::StatusOr<std::unique_ptr<TierMover>> TierMover::Create(
    const CacheBackend& backend, int64_t host_tier_bytes) {
  int64_t slot_bytes = 0;
  for (int layer = 0; layer < backend.num_layers(); ++layer) {
    ByteRun runs[kMaxBlockRuns];
    const int n = BlockRuns(backend.layer(layer), 0, runs);
    for (int i = 0; i < n; ++i) slot_bytes += runs[i].bytes;
  }
  const int64_t slots =
      std::min<int64_t>(host_tier_bytes / slot_bytes, INT32_MAX);
  if (slots < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("host_tier_bytes ", host_tier_bytes,
                     " holds no block: one block of all layers takes ",
                     slot_bytes, " bytes in the tier"));
  }
  absl::StatusOr<std::unique_ptr<TierCopier>> copier =
      CreateTierCopier(backend.device(), slots * slot_bytes);
  if (!copier.ok()) return copier.status();
  return std::unique_ptr<TierMover>(new TierMover(
      backend, *std::move(copier), slot_bytes, static_cast<int32_t>(slots)));
}

absl::Status TierMover::Run(absl::Span<const TierCopy> copies,
                            void* after_stream) {
  if (copies.empty()) return absl::OkStatus();
  int64_t offloaded = 0, onboarded = 0;
  try {
    runs_.clear();
    for (const TierCopy& c : copies) {
      char* slot = copier_->pool() + c.host_slot * slot_bytes_;
      for (int layer = 0; layer < backend_.num_layers(); ++layer) {
        ByteRun block[kMaxBlockRuns];
        const int n = BlockRuns(backend_.layer(layer), c.device_block, block);
        for (int i = 0; i < n; ++i) {
          runs_.push_back(c.onboard
                              ? CopyRun{block[i].data, slot, block[i].bytes}
                              : CopyRun{slot, block[i].data, block[i].bytes});
          slot += block[i].bytes;
        }
      }
      (c.onboard ? onboarded : offloaded) += slot_bytes_;
    }
    // Inside the try: the CPU queue allocates too.
    if (absl::Status s = copier_->Enqueue(runs_, after_stream); !s.ok()) {
      ++failed_batches_;
      return s;
    }
  } catch (const std::bad_alloc&) {
    ++failed_batches_;
    return absl::ResourceExhaustedError(absl::StrCat(
        "out of host memory queueing ", copies.size(), " tier copies"));
  }
  offload_bytes_ += offloaded;
  onboard_bytes_ += onboarded;
  return absl::OkStatus();
}

}  // namespace kvcache::internal
