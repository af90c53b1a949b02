// TierCopier: the host-memory tier's memory (DESIGN.md section 11) and the
// queues that copy bytes between it and a cache's device memory, off the
// caller's thread and stream, overlapped with the caller's work.
//
// Three lanes, each running its batches one after another in the order they
// were enqueued, side by side with the others:
//
//   kOffload        offloads nobody waits for (the allocator holds their
//                   blocks until done): background traffic
//   kOnboard        onboards, which the sequences that hit them wait for
//   kOffloadReused  offloads of blocks handed out again at once, which the
//                   next write of the block waits for
//
// so an onboard or a reused block's offload never queues behind background
// offloads. Lanes are ordered against each other only where Enqueue says so
// (a batch of another lane that must be done first: the caller's dependency
// between a slot or block both touch).
//
//   CUDA   the pool is pinned host memory (Device::AllocateStaging, mapped
//          into the device's address space); a batch is one copy kernel on
//          its lane's stream (low priority, a few dozen thread blocks, so it
//          leaves the multiprocessors to the caller's kernels), after the
//          caller's stream's earlier work.
//   CPU    the pool is a second host allocation; each lane has a thread.
//
// Ordering: Enqueue's batch reads and writes after everything earlier on its
// lane, after the named batches of the other lanes, and (CUDA) after all work
// enqueued so far on `after_stream`. WaitOn(lane, n, stream) makes the
// caller's later work (CUDA: on `stream`; CPU: the calling thread itself,
// which blocks) come after batch n of `lane` and every batch before it on
// that lane.
//
// Batches are numbered per lane from 1 in enqueue order; 0 names none.
//
// Thread safety: Enqueue and WaitOn are called by one thread at a time (the
// manager's lock); the copier's own threads synchronize with them.
// Ownership: owns the pool, the streams or threads, and the staging of the
// batches' descriptions. Destruction waits for the queues to drain.

#ifndef KVCACHE_STORAGE_TIER_COPIER_H_
#define KVCACHE_STORAGE_TIER_COPIER_H_

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "storage/device.h"

namespace kvcache {

// One contiguous copy. Both ends are in the cache's memory or the pool.
struct CopyRun {
  void* dst = nullptr;
  const void* src = nullptr;
  int64_t bytes = 0;
};

enum class TierLane : int { kOffload = 0, kOnboard = 1, kOffloadReused = 2 };
inline constexpr int kNumTierLanes = 3;
inline constexpr TierLane kTierLanes[kNumTierLanes] = {
    TierLane::kOffload, TierLane::kOnboard, TierLane::kOffloadReused};

// The batch of each lane a batch must come after (0: none; its own lane's
// entry is ignored).
struct TierDeps {
  int64_t batch[kNumTierLanes] = {};
};

class TierCopier {
 public:
  virtual ~TierCopier() = default;

  // The tier's host memory (pool_bytes() bytes, 256-byte aligned).
  virtual char* pool() const = 0;
  virtual int64_t pool_bytes() const = 0;

  // Queues `runs` as one batch of `lane`, to run after the batches `after`
  // names of the other lanes. All or nothing: on an error (Internal; a
  // launch failure, or the injected failure below) no run of the batch is
  // copied, and earlier batches are unaffected. REQUIRES: runs do not
  // overlap within the batch; after.batch[l] <= enqueued(l).
  virtual absl::Status Enqueue(TierLane lane, absl::Span<const CopyRun> runs,
                               void* after_stream, const TierDeps& after) = 0;
  // Orders the caller's later work after batch `batch` of `lane` (see the
  // top of this file). Cheap when it is known done. REQUIRES: batch <=
  // enqueued(lane).
  virtual absl::Status WaitOn(TierLane lane, int64_t batch, void* stream) = 0;
  // Blocks the calling thread until every batch enqueued so far on `lane`
  // (on the other lanes, what those batches wait for) is done.
  virtual absl::Status Synchronize(TierLane lane) = 0;
  // The same for every lane.
  absl::Status Synchronize() {
    for (TierLane lane : kTierLanes) {
      if (absl::Status s = Synchronize(lane); !s.ok()) return s;
    }
    return absl::OkStatus();
  }
  // Batches of `lane` enqueued and not yet complete (CUDA: of its last
  // kRingEntries; for backpressure and tests), and their bytes (the offload
  // policy's in-flight budget).
  virtual int64_t in_flight(TierLane lane) = 0;
  virtual int64_t in_flight_bytes(TierLane lane) = 0;
  // Batches of `lane` enqueued so far, and the number of its last batch known
  // complete (batches of a lane complete in order; CUDA: as of this call).
  virtual int64_t enqueued(TierLane lane) const = 0;
  virtual int64_t completed(TierLane lane) = 0;

  // Every lane together.
  int64_t in_flight() {
    int64_t n = 0;
    for (TierLane lane : kTierLanes) n += in_flight(lane);
    return n;
  }
  int64_t in_flight_bytes() {
    int64_t n = 0;
    for (TierLane lane : kTierLanes) n += in_flight_bytes(lane);
    return n;
  }

  // Test seams. Each batch enqueued from now on waits `delay` before it runs
  // (CPU only; the batch is in flight meanwhile), and the next `n` Enqueue
  // calls fail.
  void set_delay_for_testing(absl::Duration delay) { delay_ = delay; }
  void fail_next_for_testing(int n) { fail_next_ = n; }
  // CUDA: the most thread blocks one batch's copy kernel uses (benchmarks).
  virtual void set_max_blocks_for_testing(int) {}

 protected:
  // Consumes one injected failure, if any.
  bool TakeInjectedFailure() {
    if (fail_next_ <= 0) return false;
    --fail_next_;
    return true;
  }
  absl::Duration delay_;
  int fail_next_ = 0;
};

// A copier for `device`'s memory with a pool of `pool_bytes`, which `device`
// must outlive. ResourceExhausted when the pool cannot be allocated;
// FailedPrecondition for a CUDA device in a build without CUDA.
absl::StatusOr<std::unique_ptr<TierCopier>> CreateTierCopier(
    Device& device, int64_t pool_bytes);

// The two implementations (CreateTierCopier picks by device kind).
absl::StatusOr<std::unique_ptr<TierCopier>> CreateCpuTierCopier(
    Device& device, int64_t pool_bytes);
absl::StatusOr<std::unique_ptr<TierCopier>> CreateCudaTierCopier(
    Device& device, int64_t pool_bytes);

}  // namespace kvcache

#endif  // KVCACHE_STORAGE_TIER_COPIER_H_
