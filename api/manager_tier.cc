// KVCacheManager::Impl's host tier (README "Host tier", DESIGN.md section
// 11): running the copies the allocator asks for, and ordering the caller's
// work after them.
//
//   AddSequence  offloads of blocks it evicted, then onboards of its hits,
//                after the last stream's work (AddSequence takes none)
//   Reserve      offloads of blocks it evicted, after the caller's stream;
//                nobody waits for them: the allocator holds an offloaded
//                block, unused, until a later call finds its copy done
//                (ReleaseTierOffloads), so no write reaches it before its
//                content is out
//   Append, Gather, Attention, copy-on-write, graph steps: wait for the
//                last onboard (and everything queued before it)

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "api/manager_impl.h"
#include "core/status_macros.h"

namespace kvcache {

absl::Status KVCacheManager::Impl::RunTierCopies(void* stream,
                                                 SequenceId sequence,
                                                 bool onboarding) {
  const absl::Span<const TierCopy> copies = blocks_->tier_copies();
  if (copies.empty()) return absl::OkStatus();
  absl::Status ran = tier_->Run(copies, stream);
  if (ran.ok()) {
    const int64_t batch = tier_->copier().enqueued();
    blocks_->TierOffloadsQueued(batch);
    for (const TierCopy& c : copies) {
      if (c.wait) {
        tier_wait_batch_ = batch;
        break;
      }
    }
    blocks_->ClearTierCopies();
    return absl::OkStatus();
  }
  // Nothing of the batch moved: drop what it would have filled (the list
  // stays the allocator's until ClearTierCopies; dropping allocates nothing).
  blocks_->DropFailedOffloads(copies);
  if (onboarding) blocks_->DropFailedOnboards(sequence, copies).IgnoreError();
  blocks_->ClearTierCopies();
  if (!onboarding) return ran;
  return absl::Status(
      ran.code(),
      absl::StrCat("sequence ", sequence,
                   ": onboarding its prefix from the host tier failed (the "
                   "sequence was not added; the tier's blocks are dropped): ",
                   ran.message()));
}

void KVCacheManager::Impl::AllowOffloadIfQueueIsFree() {
  // Offloading is best effort (README "Host tier"): an evicted block is
  // dropped rather than copied while tier_offload_max_in_flight_bytes of
  // copies are still running, and on CUDA while more than two earlier
  // batches are (the host ran ahead of the device: the copier would wait
  // for a ring entry). Onboarding never skips.
  constexpr int64_t kMaxBatchesInFlight = 2;
  if (tier_ == nullptr) return;
  TierCopier& copier = tier_->copier();
  blocks_->ReleaseTierOffloads(copier.completed());
  int64_t budget = INT64_MAX;
  const int64_t max_bytes = config_.tier_offload_max_in_flight_bytes;
  if (max_bytes > 0) {
    budget = std::max<int64_t>(0, max_bytes - copier.in_flight_bytes()) /
             tier_->slot_bytes();
  }
  if (backend_->memory_kind() == MemoryKind::kCuda &&
      copier.in_flight() > kMaxBatchesInFlight) {
    budget = 0;
  }
  blocks_->SetTierOffloadBudget(budget);
}

bool KVCacheManager::Impl::ReclaimHeldOffloads() const {
  if (tier_ == nullptr || blocks_->held_tier_offloads() == 0) return false;
  TierCopier& copier = tier_->copier();
  // On an error the copies may never complete: the blocks stay held (and
  // the caller's call fails as it would have).
  if (!copier.Synchronize().ok()) return false;
  const int64_t held = blocks_->held_tier_offloads();
  blocks_->ReleaseTierOffloads(copier.completed());
  return blocks_->held_tier_offloads() < held;
}

absl::Status KVCacheManager::Impl::OrderAfterTierCopies(void* stream) {
  if (tier_ == nullptr) return absl::OkStatus();
  last_stream_ = stream;
  if (tier_wait_batch_ == 0) return absl::OkStatus();
  if (stream == tier_waited_stream_ && tier_waited_batch_ >= tier_wait_batch_)
    return absl::OkStatus();
  TierCopier& copier = tier_->copier();
  if (copier.completed() >= tier_wait_batch_) {  // Done: for every stream.
    tier_wait_batch_ = 0;
    return absl::OkStatus();
  }
  KVCACHE_RETURN_IF_ERROR(copier.WaitOn(stream));
  tier_waited_stream_ = stream;
  tier_waited_batch_ = copier.enqueued();
  return absl::OkStatus();
}

}  // namespace kvcache
