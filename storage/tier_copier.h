// TierCopier: the host-memory tier's memory (DESIGN.md section 11) and the
// queue that copies bytes between it and a cache's device memory, off the
// caller's thread and stream: batches of copies run one after another, in the
// order they were enqueued, overlapped with the caller's work.
//
//   CUDA   the pool is pinned host memory (Device::AllocateStaging, mapped
//          into the device's address space); a batch is one copy kernel on
//          the copier's own stream, after the caller's stream's earlier work.
//   CPU    the pool is a second host allocation; a batch runs on the
//          copier's thread.
//
// Ordering: Enqueue's batch reads and writes after everything earlier on the
// queue, and (CUDA) after all work enqueued so far on `after_stream`; WaitOn
// makes the caller's later work (CUDA: on `stream`; CPU: the calling thread
// itself, which blocks) come after every batch enqueued so far.
//
// Thread safety: Enqueue and WaitOn are called by one thread at a time (the
// manager's lock); the copier's own thread synchronizes with them.
// Ownership: owns the pool, the stream or thread, and the staging of the
// batches' descriptions. Destruction waits for the queue to drain.

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

class TierCopier {
 public:
  virtual ~TierCopier() = default;

  // The tier's host memory (pool_bytes() bytes, 256-byte aligned).
  virtual char* pool() const = 0;
  virtual int64_t pool_bytes() const = 0;

  // Queues `runs` as one batch. All or nothing: on an error (Internal; a
  // launch failure, or the injected failure below) no run of the batch is
  // copied, and earlier batches are unaffected. REQUIRES: runs do not
  // overlap within the batch.
  virtual absl::Status Enqueue(absl::Span<const CopyRun> runs,
                               void* after_stream) = 0;
  // Orders the caller's later work after every batch enqueued so far (see
  // the top of this file). Cheap when nothing was enqueued since the last
  // WaitOn on the same stream.
  virtual absl::Status WaitOn(void* stream) = 0;
  // Blocks the calling thread until every batch enqueued so far is done.
  virtual absl::Status Synchronize() = 0;
  // Batches enqueued and not yet complete (CUDA: of the last four; for
  // backpressure and tests).
  virtual int64_t in_flight() = 0;
  // Bytes of the batches enqueued and not yet complete (CUDA: of the last
  // four; the offload policy's in-flight budget).
  virtual int64_t in_flight_bytes() = 0;
  // Batches enqueued so far, and of them those known complete (CUDA: as of
  // the last in_flight or completed call). A batch's number is
  // enqueued() right after its Enqueue; it is done once completed() >= it.
  virtual int64_t enqueued() const = 0;
  virtual int64_t completed() = 0;

  // Test seams. Each batch waits `delay` before it runs (CPU only; the
  // batch is in flight meanwhile), and the next `n` Enqueue calls fail.
  void set_delay_for_testing(absl::Duration delay) { delay_ = delay; }
  void fail_next_for_testing(int n) { fail_next_ = n; }

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
