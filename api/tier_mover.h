// TierMover: the host tier's data path (DESIGN.md section 11). It owns the
// tier's memory and copy queue (storage/tier_copier.h) and turns the
// allocator's TierCopy list (allocator/prefix_cache.h: block d <-> slot s)
// into byte copies of whole blocks, every layer's runs (storage/block_runs.h),
// slot s being slot_bytes() bytes (a block of all layers: the runs back to
// back) at s * slot_bytes() in the pool.
//
// Thread safety: the manager's lock serializes every call. Ownership: owns
// the copier; reads the backend's layer pointers, which outlive it.
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

  // Runs `copies` in order as one batch, after the work enqueued so far on
  // `after_stream`. All or nothing: on an error no byte of them moved.
  absl::Status Run(absl::Span<const TierCopy> copies, void* after_stream);
  // The caller's later work on `stream` comes after every copy run so far
  // (on the CPU: waits for them).
  absl::Status WaitOn(void* stream) { return copier_->WaitOn(stream); }

  int64_t offload_bytes() const { return offload_bytes_; }
  int64_t onboard_bytes() const { return onboard_bytes_; }
  int64_t failed_batches() const { return failed_batches_; }

 private:
  TierMover(const CacheBackend& backend, std::unique_ptr<TierCopier> copier,
            int64_t slot_bytes, int32_t num_slots)
      : backend_(backend),
        copier_(std::move(copier)),
        slot_bytes_(slot_bytes),
        num_slots_(num_slots) {}

  const CacheBackend& backend_;
  std::unique_ptr<TierCopier> copier_;
  int64_t slot_bytes_;
  int32_t num_slots_;
  std::vector<CopyRun> runs_;  // Reused by every Run.
  int64_t offload_bytes_ = 0;
  int64_t onboard_bytes_ = 0;
  int64_t failed_batches_ = 0;
};

}  // namespace kvcache::internal

#endif  // KVCACHE_API_TIER_MOVER_H_
