// KVCacheManager::Impl's host tier (README "Host tier", DESIGN.md section
// 11): running the copies the allocator asks for, and ordering the caller's
// work after them.
//
//   AddSequence  offloads of blocks it evicted, then onboards of its hits,
//                after the last stream's work (AddSequence takes none)
//   Reserve      offloads of blocks it evicted, after the caller's stream;
//                the stream then waits for them (CUDA), so no write reaches
//                a block before its old content is out
//   Append, Gather, Attention, copy-on-write: wait for every copy so far

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
  // On CUDA offloading is best effort: with more than two earlier batches
  // still being copied (the host ran ahead of the device), an eviction drops
  // its block rather than queue more copies behind them, which the caller's
  // stream would wait for. On the CPU the caller waits for every copy before
  // it writes anyway, and a skipped block cuts the chains through it (the
  // blocks after it in the tier can no longer be reached), so it always
  // offloads. Onboarding never skips.
  constexpr int64_t kMaxBatchesInFlight = 2;
  if (tier_ == nullptr || backend_->memory_kind() != MemoryKind::kCuda) return;
  blocks_->SetTierOffload(tier_->copier().in_flight() <= kMaxBatchesInFlight);
}

absl::Status KVCacheManager::Impl::OrderAfterTierCopies(void* stream) {
  if (tier_ == nullptr) return absl::OkStatus();
  last_stream_ = stream;
  return tier_->WaitOn(stream);
}

}  // namespace kvcache
