// KVCacheManager::Impl's host tier (README "Host tier", DESIGN.md section
// 11): running the copies the allocator asks for, and ordering the caller's
// work after them.
//
//   AddSequence  offloads of blocks it evicted (offload lane), then onboards
//                of its hits (onboard lane), after the last stream's work
//                (AddSequence takes none)
//   Reserve      offloads of blocks it evicted, after the caller's stream;
//                nobody waits for them: the allocator holds an offloaded
//                block, unused, until a later call finds its copy done
//                (ReleaseTierOffloads), so no write reaches it before its
//                content is out
//   a plan's Appends, copy-on-write and graph step, Attention, GatherBatch:
//                wait for the onboards of their own sequences' prefixes
//                only (a step never waits for another sequence's prefix:
//                PrefixLoaded tells an engine when a sequence's has landed)
//   other reads: wait for the last onboard (and everything before it)
//
// A sequence freed or truncated while its prefix is in flight makes every
// later call wait for that onboard (its blocks may be reused by anyone).

#include <algorithm>
#include <cstdint>
#include <new>
#include <optional>

#include "absl/strings/str_cat.h"
#include "api/manager_impl.h"
#include "core/shortfall.h"
#include "core/status_macros.h"

namespace kvcache {

absl::Status KVCacheManager::Impl::RunTierCopies(void* stream,
                                                 SequenceId sequence,
                                                 bool onboarding) {
  // A block evicted by the call whose copy ahead may still be running: its
  // next write waits for that copy's batch.
  tier_ahead_wait_ = std::max(tier_ahead_wait_, blocks_->TakeTierAheadWait());
  const absl::Span<const TierCopy> copies = blocks_->tier_copies();
  if (copies.empty()) return absl::OkStatus();
  internal::TierMover::Batches queued;
  absl::Status ran = tier_->Run(copies, stream, &queued);
  bool held = false, reused = false;
  for (const TierCopy& c : copies) {
    if (c.onboard) continue;
    (c.wait ? reused : held) = true;
  }
  if (queued.offload != 0) blocks_->TierOffloadsQueued(queued.offload);
  // A reused block's next write, whoever makes it, waits for its offload.
  if (queued.offload_reused != 0) tier_offload_wait_ = queued.offload_reused;
  if (queued.onboard != 0) {
    tier_onboard_last_ = queued.onboard;
    if (onboarding) NotePendingOnboard(sequence, queued.onboard);
  }
  if (ran.ok()) {
    blocks_->ClearTierCopies();
    return absl::OkStatus();
  }
  // Nothing of the failed batch (or the later ones) moved: drop what it
  // would have filled (the list stays the allocator's until ClearTierCopies;
  // dropping allocates nothing). Onboards run last: they fail with any.
  if (held && queued.offload == 0) {
    blocks_->DropFailedOffloads(copies);
  } else if (reused && queued.offload_reused == 0) {
    blocks_->DropFailedOffloads(copies, /*reused_only=*/true);
  }
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

int64_t KVCacheManager::Impl::BlocksWithinInFlightBudget() {
  const int64_t max_bytes = config_.tier_offload_max_in_flight_bytes;
  if (max_bytes <= 0) return INT64_MAX;
  return std::max<int64_t>(0, max_bytes - tier_->copier().in_flight_bytes()) /
         tier_->slot_bytes();
}

void KVCacheManager::Impl::AllowOffloadIfQueueIsFree() {
  // Offloading is best effort (README "Host tier"): an evicted block is
  // dropped rather than copied while tier_offload_max_in_flight_bytes of
  // copies are still running, and on CUDA while more than kMaxBatchesInFlight
  // offload batches are (the host ran ahead of the device). Onboarding never
  // skips.
  constexpr int64_t kMaxBatchesInFlight = 4;
  if (tier_ == nullptr) return;
  TierCopier& copier = tier_->copier();
  blocks_->ReleaseTierOffloads(copier.completed(TierLane::kOffload));
  int64_t budget = BlocksWithinInFlightBudget();
  if (backend_->memory_kind() == MemoryKind::kCuda &&
      copier.in_flight(TierLane::kOffload) > kMaxBatchesInFlight) {
    budget = 0;
  }
  blocks_->SetTierOffloadBudget(budget);
}

void KVCacheManager::Impl::OffloadAhead(void* stream) {
  // Copies ahead are background traffic on the offload lane: at most
  // kMaxAheadPerCall blocks a call, none while more than two offload batches
  // are in flight (the link is busy; the blocks are not needed yet), and
  // within the in-flight byte budget.
  constexpr int64_t kMaxAheadPerCall = 256;
  if (tier_ == nullptr) return;
  if (tier_->copier().in_flight(TierLane::kOffload) > 2) return;
  const int64_t blocks =
      std::min(kMaxAheadPerCall, BlocksWithinInFlightBudget());
  if (blocks <= 0 || blocks_->TierOffloadAhead(blocks) == 0) return;
  RunTierCopies(stream, 0, /*onboarding=*/false).IgnoreError();
}

bool KVCacheManager::Impl::ReclaimHeldOffloads(
    const absl::Status& no_room) const {
  if (tier_ == nullptr || blocks_->held_tier_offloads() == 0) return false;
  // Waiting for the copies is worth it only when their blocks would make
  // the batch fit (an engine's admission probe that does not fit anyway,
  // the usual last CanReserve of a step, must not stall on the link).
  if (const std::optional<Shortfall> s = GetShortfall(no_room);
      s.has_value() && s->blocks_needed > s->blocks_free + s->blocks_evictable +
                                              blocks_->held_tier_offloads()) {
    return false;
  }
  TierCopier& copier = tier_->copier();
  // On an error the copies may never complete: the blocks stay held (and
  // the caller's call fails as it would have).
  if (!copier.Synchronize(TierLane::kOffload).ok()) return false;
  const int64_t held = blocks_->held_tier_offloads();
  blocks_->ReleaseTierOffloads(copier.completed(TierLane::kOffload));
  return blocks_->held_tier_offloads() < held;
}

bool KVCacheManager::Impl::OnboardDone(int64_t batch) {
  constexpr int kOnboard = static_cast<int>(TierLane::kOnboard);
  if (batch <= tier_known_done_[kOnboard]) return true;
  tier_known_done_[kOnboard] = tier_->copier().completed(TierLane::kOnboard);
  return batch <= tier_known_done_[kOnboard];
}

int64_t KVCacheManager::Impl::OnboardWaitFor(absl::Span<const SequenceId> ids) {
  if (pending_onboards_.empty()) return 0;
  int64_t wait = 0;
  for (SequenceId id : ids) {
    auto it = pending_onboards_.find(id);
    if (it == pending_onboards_.end()) continue;
    if (OnboardDone(it->second)) {
      pending_onboards_.erase(it);
    } else {
      wait = std::max(wait, it->second);
    }
  }
  return wait;
}

int64_t KVCacheManager::Impl::OnboardWaitFor(
    absl::Span<const ReserveRequest> batch) {
  if (pending_onboards_.empty()) return 0;
  int64_t wait = 0;
  for (const ReserveRequest& r : batch) {
    wait = std::max(wait, OnboardWaitFor(absl::MakeConstSpan(&r.sequence, 1)));
  }
  return wait;
}

void KVCacheManager::Impl::NotePendingOnboard(SequenceId id, int64_t batch) {
  if (batch == 0 || OnboardDone(batch)) return;
  try {
    int64_t& pending = pending_onboards_[id];
    pending = std::max(pending, batch);
  } catch (const std::bad_alloc&) {
    // No room to remember it for `id` alone: every later call waits for it.
    tier_onboard_floor_ = std::max(tier_onboard_floor_, batch);
  }
}

void KVCacheManager::Impl::ForgetOnboard(SequenceId id) {
  auto it = pending_onboards_.find(id);
  if (it == pending_onboards_.end()) return;
  if (!OnboardDone(it->second)) {
    tier_onboard_floor_ = std::max(tier_onboard_floor_, it->second);
  }
  pending_onboards_.erase(it);
}

absl::StatusOr<bool> KVCacheManager::Impl::PrefixLoaded(SequenceId id) {
  KVCACHE_RETURN_IF_ERROR(blocks_->ComputedLength(id).status());
  return OnboardWaitFor(absl::MakeConstSpan(&id, 1)) == 0;
}

absl::Status KVCacheManager::Impl::OrderAfterTierCopies(void* stream,
                                                        int64_t onboard) {
  if (tier_ == nullptr) return absl::OkStatus();
  last_stream_ = stream;
  if (onboard == kAllOnboards) onboard = tier_onboard_last_;
  TierDeps wait;
  wait.batch[static_cast<int>(TierLane::kOnboard)] =
      std::max(onboard, tier_onboard_floor_);
  wait.batch[static_cast<int>(TierLane::kOffloadReused)] = tier_offload_wait_;
  wait.batch[static_cast<int>(TierLane::kOffload)] = tier_ahead_wait_;
  TierCopier& copier = tier_->copier();
  for (int lane = 0; lane < kNumTierLanes; ++lane) {
    const int64_t batch = wait.batch[lane];
    if (batch <= tier_known_done_[lane]) continue;
    if (stream == tier_waited_stream_ && batch <= tier_waited_[lane]) continue;
    const TierLane l = kTierLanes[lane];
    tier_known_done_[lane] = copier.completed(l);
    if (batch <= tier_known_done_[lane]) continue;  // Done: for every stream.
    KVCACHE_RETURN_IF_ERROR(copier.WaitOn(l, batch, stream));
    if (stream != tier_waited_stream_) {
      tier_waited_stream_ = stream;
      for (int64_t& w : tier_waited_) w = 0;
    }
    tier_waited_[lane] = batch;
  }
  return absl::OkStatus();
}

}  // namespace kvcache
