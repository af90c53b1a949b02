// TierCopier: the host-memory tier's memory (DESIGN.md section 11) and the
// queues that copy whole blocks between it and a cache's device memory, off
// the caller's thread and stream, overlapped with the caller's work.
//
// The copier is told once, at creation, where a block's bytes lie: its runs
// (TierRun; storage/block_runs.h: each layer's K, V and scale bytes), run r
// of block b at run.device + b * run.bytes in the cache and at
// run.slot_offset in a slot of slot_bytes bytes, slot s at s * slot_bytes in
// the pool. A batch is then a list of (device block, host slot) pairs
// (TierPair), every run of each pair copied, in its lane's direction.
//
// Three lanes, each running its batches one after another in the order they
// were enqueued, side by side with the others:
//
//   kOffload        offloads nobody waits for (the allocator holds their
//                   blocks until done): background traffic; cache -> pool
//   kOnboard        onboards, which the sequences that hit them wait for;
//                   pool -> cache
//   kOffloadReused  offloads of blocks handed out again at once, which the
//                   next write of the block waits for; cache -> pool
//
// so an onboard or a reused block's offload never queues behind background
// offloads. Lanes are ordered against each other only where Enqueue says so
// (a batch of another lane that must be done first: the caller's dependency
// between a slot or block both touch).
//
//   CUDA   the pool is pinned host memory (Device::AllocateStaging, mapped
//          into the device's address space); the runs are uploaded to device
//          memory once, a batch's pairs go to a pinned buffer of the lane's
//          ring, and a batch is one copy kernel on its lane's stream (low
//          priority, a few thread blocks: set_copy_blocks), after the
//          caller's stream's earlier work.
//   CPU    the pool is a second host allocation; each lane has a thread,
//          which copies pairs x runs with memcpy.
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
// Ownership: owns the pool, the run table, the streams or threads, and the
// staging of the batches' pairs. Destruction waits for the queues to drain.
// The cache memory the runs point at must outlive the copier.

#ifndef KVCACHE_STORAGE_TIER_COPIER_H_
#define KVCACHE_STORAGE_TIER_COPIER_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "core/host_device.h"
#include "storage/device.h"

namespace kvcache {

// One contiguous part of every block (a layer's K, V or scale bytes): block
// b's lies at device + b * bytes in the cache, and at slot_offset in the
// block's tier slot.
struct TierRun {
  char* device = nullptr;
  int64_t bytes = 0;
  int64_t slot_offset = 0;
};

// One block of a batch: device block <-> host slot (the lane says which way).
struct TierPair {
  int32_t device_block = 0;
  int32_t host_slot = 0;
};

// Where `run` of device block `block` lies, and where it lies in `slot` of
// a pool of slots of `slot_bytes` (the CPU and CUDA copiers share these).
KVCACHE_HOST_DEVICE char* DeviceRunAddress(const TierRun& run, int32_t block) {
  return run.device + static_cast<int64_t>(block) * run.bytes;
}
KVCACHE_HOST_DEVICE char* SlotRunAddress(char* pool, int64_t slot_bytes,
                                         const TierRun& run, int32_t slot) {
  return pool + static_cast<int64_t>(slot) * slot_bytes + run.slot_offset;
}

// The copy kernel's thread blocks per batch by default (CUDA): few, so that
// the copies leave the PCIe link and the multiprocessors mostly to the
// caller's work (README "Host tier": measured on the whole trace replay).
inline constexpr int kDefaultTierCopyBlocks = 4;

enum class TierLane : int { kOffload = 0, kOnboard = 1, kOffloadReused = 2 };
inline constexpr int kNumTierLanes = 3;
inline constexpr TierLane kTierLanes[kNumTierLanes] = {
    TierLane::kOffload, TierLane::kOnboard, TierLane::kOffloadReused};

// The batch of each lane a batch must come after (0: none; its own lane's
// entry is ignored).
struct TierDeps {
  int64_t batch[kNumTierLanes] = {};
};

// A stretch of a slot that the runs cover: runs that touch are one segment.
struct SlotSegment {
  int64_t offset = 0;
  int64_t bytes = 0;
};
// The slot's segments in slot order (one when the runs tile the slot).
// REQUIRES: ValidateTierRuns(runs, ...) is OK.
std::vector<SlotSegment> SlotSegments(absl::Span<const TierRun> runs);

// One copy between a staging buffer of slot images (image i of a batch's
// copies[i] at staging + i * slot_bytes) and the pool: `bytes` at `staging`
// and at `pool`, in either direction (the CUDA copier's copy-engine path).
struct StagedCopy {
  char* staging = nullptr;
  char* pool = nullptr;
  int64_t bytes = 0;
};
// Puts a batch's pairs in slot order. A batch is a set (no slot or block
// twice), so the order is free; in slot order, slots handed out together are
// neighbours in staging too, and AppendStagedCopies merges them into one copy
// whatever order the batch listed them in (a prefix onboards head first; its
// blocks were offloaded tail first, into ascending slots).
void SortBySlot(absl::Span<TierPair> copies);

// Appends to `out` the copies that move every segment of each image i to or
// from slot copies[i].host_slot of `pool`, a copy per segment, merged with
// the previous one where both sides continue it (a slot the runs tile,
// followed by the next slot: one copy for both). Bytes between runs are
// never copied.
void AppendStagedCopies(absl::Span<const SlotSegment> segments,
                        absl::Span<const TierPair> copies, char* staging,
                        char* pool, int64_t slot_bytes,
                        std::vector<StagedCopy>& out);

// InvalidArgument, naming the value, unless there is at least one run, every
// run has a device pointer and bytes > 0 and lies inside the slot
// ([slot_offset, slot_offset + bytes) within [0, slot_bytes)), no two runs
// overlap in the slot, and num_slots >= 1.
absl::Status ValidateTierRuns(absl::Span<const TierRun> runs,
                              int64_t slot_bytes, int32_t num_slots);

class TierCopier {
 public:
  virtual ~TierCopier() = default;

  // The tier's host memory (num_slots() slots of slot_bytes() bytes,
  // 256-byte aligned).
  virtual char* pool() const = 0;
  int64_t pool_bytes() const { return slot_bytes_ * num_slots_; }
  int64_t slot_bytes() const { return slot_bytes_; }
  int32_t num_slots() const { return num_slots_; }
  // The runs of a block, as given at creation.
  absl::Span<const TierRun> runs() const { return runs_; }

  // Queues `copies` as one batch of `lane`, to run after the batches `after`
  // names of the other lanes: every run of each pair, from the cache to the
  // pool (kOffload, kOffloadReused) or from the pool to the cache (kOnboard).
  // The batch moves copies.size() * slot_bytes() bytes. All or nothing: on
  // an error (Internal: a launch failure, or the injected failure below;
  // ResourceExhausted: the pairs' staging could not grow) no byte of the
  // batch is copied, and earlier batches are unaffected. REQUIRES: every
  // device_block names a block of the cache the runs point at, every
  // host_slot is in [0, num_slots()); the batch writes no block (onboard) or
  // slot (offload) twice; after.batch[l] <= enqueued(l).
  virtual absl::Status Enqueue(TierLane lane, absl::Span<const TierPair> copies,
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
  // CUDA: the most thread blocks one batch's copy kernel uses, from the next
  // batch on (kDefaultTierCopyBlocks until set); 0: no copy kernel, the
  // bytes cross the link by the copy engines, whole slots at a time, through
  // a staging buffer per lane in device memory (32 MiB; made at the lane's
  // first such batch: ResourceExhausted from Enqueue when it cannot be).
  // CPU: ignored.
  virtual void set_copy_blocks(int) {}
  // CUDA test seam: the staging buffer's slots (at least 1; a batch of more
  // pairs goes in chunks), from the next batch on. CPU: ignored.
  virtual void set_staging_blocks(int64_t) {}
  // Batches of `lane` enqueued and not yet known complete (CUDA: as of this
  // call; for backpressure and tests), and their bytes (the offload policy's
  // in-flight budget): a running count, no walk over the batches.
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

 protected:
  // REQUIRES: ValidateTierRuns(runs, slot_bytes, num_slots) is OK.
  TierCopier(absl::Span<const TierRun> runs, int64_t slot_bytes,
             int32_t num_slots)
      : runs_(runs.begin(), runs.end()),
        slot_bytes_(slot_bytes),
        num_slots_(num_slots) {}

  // Consumes one injected failure, if any.
  bool TakeInjectedFailure() {
    if (fail_next_ <= 0) return false;
    --fail_next_;
    return true;
  }
  absl::Duration delay_;
  int fail_next_ = 0;

 private:
  const std::vector<TierRun> runs_;
  const int64_t slot_bytes_;
  const int32_t num_slots_;
};

// A copier between `device`'s memory, where a block's bytes lie as `runs`
// say, and a pool of `num_slots` slots of `slot_bytes`. `device` and the
// memory the runs point at must outlive it. InvalidArgument from
// ValidateTierRuns; ResourceExhausted when the pool cannot be allocated;
// FailedPrecondition for a CUDA device in a build without CUDA.
absl::StatusOr<std::unique_ptr<TierCopier>> CreateTierCopier(
    Device& device, absl::Span<const TierRun> runs, int64_t slot_bytes,
    int32_t num_slots);

// The two implementations (CreateTierCopier picks by device kind).
absl::StatusOr<std::unique_ptr<TierCopier>> CreateCpuTierCopier(
    Device& device, absl::Span<const TierRun> runs, int64_t slot_bytes,
    int32_t num_slots);
absl::StatusOr<std::unique_ptr<TierCopier>> CreateCudaTierCopier(
    Device& device, absl::Span<const TierRun> runs, int64_t slot_bytes,
    int32_t num_slots);

}  // namespace kvcache

#endif  // KVCACHE_STORAGE_TIER_COPIER_H_
