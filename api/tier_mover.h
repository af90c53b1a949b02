// TierMover: the host tier's data path (DESIGN.md section 11). It owns the
// tier's memory and copy queue (storage/tier_copier.h) and turns the
// allocator's TierCopy list (allocator/prefix_cache.h: block d <-> slot s)
// into batches of (block, slot) pairs, which the copier expands into byte
// copies of whole blocks. Create tells the copier once where a block's bytes
// lie: every layer's runs (storage/block_runs.h; 4 a layer for an int8 cache
// with side scales, 1 for a layer in records), slot s being slot_bytes()
// bytes (a block of all layers: the runs back to back, layer by layer) at
// s * slot_bytes() in the pool.
//
// A call's copies go to the copier's lanes (storage/tier_copier.h): offloads
// of held blocks to kOffload, offloads of blocks reused at once to
// kOffloadReused, onboards to kOnboard. The mover orders the lanes where they
// meet: a batch waits for each other lane's last batch that touched one of
// its host slots or device blocks (an onboard of a slot whose offload is
// still running; an offload into a slot an onboard may still be reading, or
// of a block an onboard wrote; an onboard into a block whose offload still
// reads it). Otherwise the lanes run side by side.
//
// Thread safety: the manager's lock serializes every call. Ownership: owns
// the copier, which holds the backend's layer pointers: the backend must
// outlive the mover.
// Internal to api/.

#ifndef KVCACHE_API_TIER_MOVER_H_
#define KVCACHE_API_TIER_MOVER_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "allocator/prefix_cache.h"
#include "api/cache_backend.h"
#include "storage/tier_copier.h"

namespace kvcache::internal {

class TierMover {
 public:
  // A tier of host_tier_bytes on the backend's device: as many slots as fit
  // (at most INT32_MAX). InvalidArgument when not one fits; ResourceExhausted
  // when the memory cannot be had.
  static absl::StatusOr<std::unique_ptr<TierMover>> Create(
      const CacheBackend& backend, int64_t host_tier_bytes);

  int32_t num_slots() const { return num_slots_; }
  int64_t slot_bytes() const { return slot_bytes_; }
  TierCopier& copier() const { return *copier_; }

  // What one Run queued: a batch number per lane (0: none).
  struct Batches {
    int64_t offload = 0;         // kOffload: held blocks' offloads.
    int64_t offload_reused = 0;  // kOffloadReused.
    int64_t onboard = 0;         // kOnboard.
  };
  // Runs `copies`: held blocks' offloads, then reused blocks' offloads, then
  // onboards, each kind one batch of its lane, after the work enqueued so
  // far on `after_stream`. On an error, *queued says which batches ran: the
  // first that failed and every later one did not (no byte of them moved).
  absl::Status Run(absl::Span<const TierCopy> copies, void* after_stream,
                   Batches* queued);

  // The last onboard batch that filled device block `block` (0: none).
  int64_t onboard_batch(int32_t block) const {
    return block_batch_[static_cast<int>(TierLane::kOnboard)][block];
  }

  int64_t offload_bytes() const { return offload_bytes_; }
  int64_t onboard_bytes() const { return onboard_bytes_; }
  int64_t failed_batches() const { return failed_batches_; }

 private:
  TierMover(std::unique_ptr<TierCopier> copier, int64_t num_blocks);

  // Queues the copies of `copies` that go to `lane` as one batch; returns
  // its number in *batch (0 when there were none).
  absl::Status RunLane(TierLane lane, absl::Span<const TierCopy> copies,
                       void* after_stream, int64_t* batch);

  std::unique_ptr<TierCopier> copier_;
  int64_t slot_bytes_;
  int32_t num_slots_;
  std::vector<TierPair> batch_;  // Reused by every RunLane.
  // Per lane, the last batch that touched each host slot and each device
  // block (0: none).
  std::vector<int64_t> slot_batch_[kNumTierLanes];
  std::vector<int64_t> block_batch_[kNumTierLanes];
  int64_t offload_bytes_ = 0;
  int64_t onboard_bytes_ = 0;
  int64_t failed_batches_ = 0;
};

}  // namespace kvcache::internal

#endif  // KVCACHE_API_TIER_MOVER_H_
