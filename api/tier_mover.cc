#include "api/tier_mover.h"

#include <algorithm>
#include <new>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "storage/block_runs.h"

namespace kvcache::internal {

absl::StatusOr<std::unique_ptr<TierMover>> TierMover::Create(
    const CacheBackend& backend, int64_t host_tier_bytes) {
  // Block 0's runs: block b's lie b * bytes further, a run's bytes being its
  // part of one block. In the slot, layer by layer, back to back.
  std::vector<TierRun> runs;
  int64_t slot_bytes = 0;
  for (int layer = 0; layer < backend.num_layers(); ++layer) {
    ByteRun block0[kMaxBlockRuns];
    const int n = BlockRuns(backend.layer(layer), 0, block0);
    for (int i = 0; i < n; ++i) {
      if (block0[i].bytes == 0) continue;
      runs.push_back(TierRun{block0[i].data, block0[i].bytes, slot_bytes});
      slot_bytes += block0[i].bytes;
    }
  }
  const int64_t slots =
      std::min<int64_t>(host_tier_bytes / slot_bytes, INT32_MAX);
  if (slots < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("host_tier_bytes ", host_tier_bytes,
                     " holds no block: one block of all layers takes ",
                     slot_bytes, " bytes in the tier"));
  }
  absl::StatusOr<std::unique_ptr<TierCopier>> copier = CreateTierCopier(
      backend.device(), runs, slot_bytes, static_cast<int32_t>(slots));
  if (!copier.ok()) return copier.status();
  return std::unique_ptr<TierMover>(
      new TierMover(*std::move(copier), backend.layout().num_blocks));
}

TierMover::TierMover(std::unique_ptr<TierCopier> copier, int64_t num_blocks)
    : copier_(std::move(copier)),
      slot_bytes_(copier_->slot_bytes()),
      num_slots_(copier_->num_slots()) {
  for (int lane = 0; lane < kNumTierLanes; ++lane) {
    slot_batch_[lane].assign(num_slots_, 0);
    block_batch_[lane].assign(num_blocks, 0);
  }
}

namespace {

// The lane a copy goes to.
TierLane LaneOf(const TierCopy& c) {
  if (c.onboard) return TierLane::kOnboard;
  return c.wait ? TierLane::kOffloadReused : TierLane::kOffload;
}

}  // namespace

absl::Status TierMover::Run(absl::Span<const TierCopy> copies,
                            void* after_stream, Batches* queued) {
  *queued = Batches{};
  KVCACHE_RETURN_IF_ERROR(
      RunLane(TierLane::kOffload, copies, after_stream, &queued->offload));
  KVCACHE_RETURN_IF_ERROR(RunLane(TierLane::kOffloadReused, copies,
                                  after_stream, &queued->offload_reused));
  return RunLane(TierLane::kOnboard, copies, after_stream, &queued->onboard);
}

absl::Status TierMover::RunLane(TierLane lane,
                                absl::Span<const TierCopy> copies,
                                void* after_stream, int64_t* batch) {
  *batch = 0;
  const bool onboard = lane == TierLane::kOnboard;
  const int me = static_cast<int>(lane);
  TierDeps after;
  try {
    batch_.clear();
    for (const TierCopy& c : copies) {
      if (LaneOf(c) != lane) continue;
      for (int other = 0; other < kNumTierLanes; ++other) {
        if (other == me) continue;
        after.batch[other] =
            std::max({after.batch[other], slot_batch_[other][c.host_slot],
                      block_batch_[other][c.device_block]});
      }
      batch_.push_back(TierPair{c.device_block, c.host_slot});
    }
    if (batch_.empty()) return absl::OkStatus();
    for (TierLane other : kTierLanes) {  // Known done: no wait to ask for.
      int64_t& b = after.batch[static_cast<int>(other)];
      if (other == lane || b <= copier_->completed(other)) b = 0;
    }
    // Inside the try: the CPU queue allocates too.
    if (absl::Status s = copier_->Enqueue(lane, batch_, after_stream, after);
        !s.ok()) {
      ++failed_batches_;
      return s;
    }
  } catch (const std::bad_alloc&) {
    ++failed_batches_;
    return absl::ResourceExhaustedError(
        absl::StrCat("out of host memory queueing ", copies.size(),
                     " tier copies (", onboard ? "onboards" : "offloads", ")"));
  }
  *batch = copier_->enqueued(lane);
  for (const TierCopy& c : copies) {
    if (LaneOf(c) != lane) continue;
    slot_batch_[me][c.host_slot] = *batch;
    block_batch_[me][c.device_block] = *batch;
  }
  (onboard ? onboard_bytes_ : offload_bytes_) +=
      static_cast<int64_t>(batch_.size()) * slot_bytes_;
  return absl::OkStatus();
}

}  // namespace kvcache::internal
