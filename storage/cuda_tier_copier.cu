// The CUDA backend's TierCopier (storage/tier_copier.h): a pool of pinned
// host memory, which the device reaches through unified addressing, and one
// copy kernel per batch on its lane's own stream
// (storage/tier_copy_kernel.cuh). A kernel, not one cudaMemcpyAsync per run:
// a block of a 32-layer int8 model with side scales is 128 runs of a few
// KiB, which a copy call each would spend in launch overhead.
//
// With set_copy_blocks(0) a batch goes to the copy engines instead: one
// cudaMemcpyBatchAsync of its pairs x runs (a descriptor per run, built on
// the host), which leaves the multiprocessors alone.
//
// A batch is described by its (device block, host slot) pairs alone, 8 bytes
// a block: the runs of a block (where each layer's K, V and scale bytes lie
// on the device and in a slot) are in device memory, uploaded once at
// creation, and the kernel walks pairs x runs. The pairs go to a pinned
// buffer of the lane's ring (kRingEntries per lane, 64 KiB each, allocated
// at creation), which the kernel reads; a batch too large for its entry
// grows it geometrically, keeping the old buffer until the copier is
// destroyed: freeing pinned memory (cudaFreeHost) synchronizes the whole
// device, which on Enqueue's path would wait for every copy in flight.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cuda_check.h"
#include "core/status_macros.h"
#include "storage/tier_copier.h"
#include "storage/tier_copy_kernel.cuh"

namespace kvcache {
namespace {

using internal::kTierCopyThreads;
using internal::TierCopyParams;

// A ring entry's first pair buffer: 8,192 blocks.
constexpr size_t kMinRingBytes = size_t{64} << 10;

// Validates, sizes the grid (at most max_blocks) and launches one batch.
absl::Status LaunchTierCopy(const TierCopyParams& p, int max_blocks,
                            cudaStream_t stream) {
  if (p.runs == nullptr || p.num_runs < 1 || p.copies == nullptr ||
      p.num_copies < 1 || p.pool == nullptr || p.slot_bytes < 1 ||
      max_blocks < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tier copy: num_runs ", p.num_runs, ", num_copies ", p.num_copies,
        ", slot_bytes ", p.slot_bytes, ", max_blocks ", max_blocks,
        ": expected each >= 1 and non-null runs, copies and pool"));
  }
  const int64_t items = p.num_copies * p.num_runs;
  const int grid = static_cast<int>(std::min<int64_t>(items, max_blocks));
  internal::TierCopyKernel<<<grid, kTierCopyThreads, 0, stream>>>(p);
  KVCACHE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

void DestroyEventHandle(cudaEvent_t e) {
  if (e != nullptr) cudaEventDestroy(e);
}

class CudaTierCopier final : public TierCopier {
 public:
  CudaTierCopier(Device& device, Buffer pool, absl::Span<const TierRun> runs,
                 int64_t slot_bytes, int32_t num_slots)
      : TierCopier(runs, slot_bytes, num_slots),
        device_(device),
        pool_(std::move(pool)) {}
  ~CudaTierCopier() override {
    cudaSetDevice(device_.ordinal());
    for (Lane& l : lanes_) {
      if (l.stream != nullptr) {
        cudaStreamSynchronize(l.stream);
        cudaStreamDestroy(l.stream);
      }
      for (Ring& r : l.ring) DestroyEventHandle(r.used);
    }
    DestroyEventHandle(caller_);
  }

  absl::Status Init() {
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_.ordinal()));
    // The run table, once, in device memory.
    const size_t table_bytes = runs().size() * sizeof(TierRun);
    absl::StatusOr<Buffer> table = device_.Allocate(table_bytes);
    if (!table.ok()) return table.status();
    run_table_ = *std::move(table);
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaMemcpy(
        run_table_.data(), runs().data(), table_bytes, cudaMemcpyHostToDevice));
    // Every ring entry's first pair buffer, carved from one allocation.
    absl::StatusOr<Buffer> slab =
        device_.AllocateStaging(kNumTierLanes * kRingEntries * kMinRingBytes);
    if (!slab.ok()) return slab.status();
    char* next = slab->as<char>();
    staging_.push_back(*std::move(slab));
    // The lowest priority (the greatest number): the caller's kernels are
    // scheduled first whenever both wait for a multiprocessor.
    int least = 0, greatest = 0;
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaDeviceGetStreamPriorityRange(&least, &greatest));
    for (Lane& l : lanes_) {
      KVCACHE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithPriority(
          &l.stream, cudaStreamNonBlocking, least));
      for (Ring& r : l.ring) {
        KVCACHE_CUDA_RETURN_IF_ERROR(
            cudaEventCreateWithFlags(&r.used, cudaEventDisableTiming));
        r.copies = reinterpret_cast<TierPair*>(next);
        r.capacity = kMinRingBytes;
        next += kMinRingBytes;
      }
    }
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaEventCreateWithFlags(&caller_, cudaEventDisableTiming));
    return absl::OkStatus();
  }

  char* pool() const override { return pool_.as<char>(); }

  absl::Status Enqueue(TierLane lane, absl::Span<const TierPair> copies,
                       void* after_stream, const TierDeps& after) override {
    if (TakeInjectedFailure()) {
      return absl::InternalError("tier copy failed (injected by a test)");
    }
    if (copies.empty()) return absl::OkStatus();
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_.ordinal()));
    Lane& l = lanes_[Index(lane)];
    // The batch's pairs go to pinned memory the kernel reads; the ring
    // entry's last kernel must be done with it first (the host waits only
    // when kRingEntries batches of the lane are in flight).
    Ring& ring = l.ring[l.enqueued % kRingEntries];
    if (l.enqueued - Advance(l) >= kRingEntries) {
      KVCACHE_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(ring.used));
      MarkOldestDone(l);
    }
    // The kernel reads the pairs from the ring; the copy engines' descriptors
    // are built on the host from `copies` itself.
    const bool by_kernel = max_blocks_ > 0;
    const size_t bytes = copies.size() * sizeof(TierPair);
    if (by_kernel) {
      if (ring.capacity < bytes) KVCACHE_RETURN_IF_ERROR(Grow(ring, bytes));
      std::memcpy(ring.copies, copies.data(), bytes);
    }
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaEventRecord(caller_, static_cast<cudaStream_t>(after_stream)));
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(l.stream, caller_, 0));
    for (TierLane other : kTierLanes) {
      if (other == lane) continue;
      if (absl::Status s = WaitOn(other, after.batch[Index(other)], l.stream);
          !s.ok()) {
        return s;
      }
    }
    TierCopyParams p;
    p.runs = run_table_.as<TierRun>();
    p.num_runs = static_cast<int32_t>(runs().size());
    p.copies = ring.copies;
    p.num_copies = static_cast<int64_t>(copies.size());
    p.pool = pool_.as<char>();
    p.slot_bytes = slot_bytes();
    p.onboard = lane == TierLane::kOnboard;
    if (by_kernel) {
      KVCACHE_RETURN_IF_ERROR(LaunchTierCopy(p, max_blocks_, l.stream));
    } else {
      KVCACHE_RETURN_IF_ERROR(CopyByEngines(copies, p.onboard, l.stream));
    }
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaEventRecord(ring.used, l.stream));
    ring.bytes = p.num_copies * slot_bytes();
    ring.batch = ++l.enqueued;
    l.in_flight_bytes += ring.bytes;
    return absl::OkStatus();
  }

  absl::Status WaitOn(TierLane lane, int64_t batch, void* stream) override {
    const Lane& l = lanes_[Index(lane)];
    if (batch <= l.known_done) return absl::OkStatus();
    // Batch `batch` still owns its ring entry: Enqueue marks a batch done
    // before it reuses the batch's entry.
    const Ring& ring = l.ring[(batch - 1) % kRingEntries];
    if (ring.batch != batch) return absl::OkStatus();
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_.ordinal()));
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), ring.used, 0));
    return absl::OkStatus();
  }

  absl::Status Synchronize(TierLane lane) override {
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_.ordinal()));
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaStreamSynchronize(lanes_[Index(lane)].stream));
    return absl::OkStatus();
  }
  int64_t in_flight(TierLane lane) override {
    Lane& l = lanes_[Index(lane)];
    return l.enqueued - Advance(l);
  }
  int64_t in_flight_bytes(TierLane lane) override {
    Lane& l = lanes_[Index(lane)];
    Advance(l);
    return l.in_flight_bytes;
  }
  int64_t enqueued(TierLane lane) const override {
    return lanes_[Index(lane)].enqueued;
  }
  int64_t completed(TierLane lane) override {
    return Advance(lanes_[Index(lane)]);
  }

  void set_copy_blocks(int blocks) override {
    max_blocks_ = std::max(blocks, 0);
  }

 private:
  static constexpr int kRingEntries = 32;
  struct Ring {
    TierPair* copies = nullptr;  // Pinned, owned by staging_.
    size_t capacity = 0;         // Bytes at `copies`.
    cudaEvent_t used = nullptr;
    int64_t bytes = 0;  // Of its last batch.
    int64_t batch = 0;  // Its last batch's number (1-based); 0 = none.
  };
  struct Lane {
    cudaStream_t stream = nullptr;
    Ring ring[kRingEntries];
    int64_t enqueued = 0;  // Batches enqueued.
    // Every batch up to it is done; the batches after it still own their
    // ring entries (enqueued - known_done <= kRingEntries).
    int64_t known_done = 0;
    int64_t in_flight_bytes = 0;  // Of batches (known_done, enqueued].
  };
  static int Index(TierLane lane) { return static_cast<int>(lane); }

  // Marks the lane's oldest batch not known done as done.
  // REQUIRES: l.known_done < l.enqueued.
  static void MarkOldestDone(Lane& l) {
    l.in_flight_bytes -= l.ring[l.known_done % kRingEntries].bytes;
    ++l.known_done;
  }
  // Moves l.known_done past the batches found complete and returns it.
  // Batches of a lane complete in order, so the scan stops at the first busy
  // one (one event query while the oldest is still running).
  static int64_t Advance(Lane& l) {
    while (l.known_done < l.enqueued &&
           !Busy(l.ring[l.known_done % kRingEntries])) {
      MarkOldestDone(l);
    }
    return l.known_done;
  }
  static bool Busy(const Ring& r) {
    if (cudaEventQuery(r.used) != cudaErrorNotReady) return false;
    cudaGetLastError();
    return true;
  }

  // One batch by the copy engines: a descriptor per pair and run, the
  // source read in stream order (after the waits Enqueue made).
  absl::Status CopyByEngines(absl::Span<const TierPair> copies, bool onboard,
                             cudaStream_t stream) {
    const absl::Span<const TierRun> r = runs();
    const size_t count = copies.size() * r.size();
    try {
      dma_dst_.resize(count);
      dma_src_.resize(count);
      dma_bytes_.resize(count);
    } catch (const std::bad_alloc&) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "tier copy: no host memory for ", count, " copy descriptors"));
    }
    size_t k = 0;
    for (const TierPair& c : copies) {
      for (const TierRun& run : r) {
        char* device = DeviceRunAddress(run, c.device_block);
        char* slot = SlotRunAddress(pool(), slot_bytes(), run, c.host_slot);
        dma_dst_[k] = onboard ? device : slot;
        dma_src_[k] = onboard ? slot : device;
        dma_bytes_[k] = static_cast<size_t>(run.bytes);
        ++k;
      }
    }
    cudaMemcpyAttributes attr = {};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    size_t first = 0;
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaMemcpyBatchAsync(
        dma_dst_.data(), dma_src_.data(), dma_bytes_.data(), count, &attr,
        &first, 1, stream));
    return absl::OkStatus();
  }

  // Gives `ring` a pair buffer of at least `bytes` (twice its capacity at
  // least); the old one stays in staging_ (its batch is done, but freeing
  // pinned memory would synchronize the device).
  absl::Status Grow(Ring& ring, size_t bytes) {
    absl::StatusOr<Buffer> grown =
        device_.AllocateStaging(std::max(bytes, 2 * ring.capacity));
    if (!grown.ok()) return grown.status();
    staging_.push_back(*std::move(grown));
    ring.copies = staging_.back().as<TierPair>();
    ring.capacity = staging_.back().size();
    return absl::OkStatus();
  }

  Device& device_;
  Buffer pool_;
  Buffer run_table_;             // Device memory: runs().
  std::vector<Buffer> staging_;  // Every pair buffer the rings ever had.
  Lane lanes_[kNumTierLanes];
  cudaEvent_t caller_ = nullptr;             // The caller's stream at Enqueue.
  int max_blocks_ = kDefaultTierCopyBlocks;  // 0: the copy engines.
  // CopyByEngines' descriptors (reused; only the host reads them).
  std::vector<void*> dma_dst_;
  std::vector<const void*> dma_src_;
  std::vector<size_t> dma_bytes_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<TierCopier>> CreateCudaTierCopier(
    Device& device, absl::Span<const TierRun> runs, int64_t slot_bytes,
    int32_t num_slots) {
  if (absl::Status s = ValidateTierRuns(runs, slot_bytes, num_slots); !s.ok()) {
    return s;
  }
  const int64_t pool_bytes = slot_bytes * num_slots;
  absl::StatusOr<Buffer> pool =
      device.AllocateStaging(static_cast<size_t>(pool_bytes));
  if (!pool.ok()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("host tier of ", pool_bytes,
                     " bytes of pinned memory: ", pool.status().message()));
  }
  auto copier = std::make_unique<CudaTierCopier>(device, *std::move(pool), runs,
                                                 slot_bytes, num_slots);
  if (absl::Status s = copier->Init(); !s.ok()) return s;
  return std::unique_ptr<TierCopier>(std::move(copier));
}

}  // namespace kvcache
