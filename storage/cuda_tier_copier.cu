// The CUDA backend's TierCopier (storage/tier_copier.h): a pool of pinned
// host memory, which the device reaches through unified addressing, and one
// copy kernel per batch on its lane's own stream
// (storage/tier_copy_kernel.cuh). A kernel, not one cudaMemcpyAsync per run:
// a block of a 32-layer int8 model with side scales is 128 runs of a few
// KiB, which a copy call each would spend in launch overhead.
//
// With set_copy_blocks(0) the bytes cross the PCIe link by the copy engines
// instead, through a staging buffer in device memory (one per lane, made at
// the first such batch): an offload gathers up to staging-size blocks' runs
// into whole slot images there (a short device-to-device kernel), then one
// cudaMemcpyBatchAsync moves each image's covered bytes to its slot (a
// descriptor per segment the runs cover, neighbours merged:
// AppendStagedCopies, with the batch in slot order: SortBySlot); an onboard
// does the reverse. The copy engines read and write host memory with far
// less cost to the caller's kernels than a kernel doing it
// (benchmarks/tier_interference_benchmark.cc), but a descriptor per run (16
// KiB) keeps them at a fraction of the link's speed: whole slots (a block's
// every run, about 1 MiB) keep them near it, and each descriptor costs the
// host about 0.45 us in the call (benchmarks/results/NOTES.md).
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
// Each lane's staging buffer for the copy engines, and the thread blocks of
// its gather and scatter kernels (device memory only: brief).
constexpr int64_t kStagingBytes = int64_t{32} << 20;
constexpr int kStagingCopyBlocks = 16;

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
  // Staging (device memory at both ends): a thread block per pair, a warp
  // per run; the pool: a thread block per (pair, run).
  if (p.slot_is_index) {
    const int grid =
        static_cast<int>(std::min<int64_t>(p.num_copies, max_blocks));
    internal::TierCopyKernel<true><<<grid, kTierCopyThreads, 0, stream>>>(p);
  } else {
    const int64_t items = p.num_copies * p.num_runs;
    const int grid = static_cast<int>(std::min<int64_t>(items, max_blocks));
    internal::TierCopyKernel<false><<<grid, kTierCopyThreads, 0, stream>>>(p);
  }
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
        pool_(std::move(pool)),
        staging_blocks_(
            std::clamp<int64_t>(kStagingBytes / slot_bytes, 1, num_slots)),
        slot_segments_(SlotSegments(runs)) {}
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
    // The kernels (the copy kernel, or the staging path's gather and
    // scatter) read the pairs from the ring.
    const bool by_kernel = max_blocks_ > 0;
    const size_t bytes = copies.size() * sizeof(TierPair);
    if (ring.capacity < bytes) KVCACHE_RETURN_IF_ERROR(Grow(ring, bytes));
    if (!by_kernel) KVCACHE_RETURN_IF_ERROR(EnsureStaging(l));
    std::memcpy(ring.copies, copies.data(), bytes);
    // The copy engines: neighbouring slots one descriptor (SortBySlot).
    if (!by_kernel) SortBySlot(absl::MakeSpan(ring.copies, copies.size()));
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
      KVCACHE_RETURN_IF_ERROR(CopyThroughStaging(
          l, absl::MakeConstSpan(ring.copies, copies.size()), p));
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
  void set_staging_blocks(int64_t blocks) override {
    staging_blocks_ = std::max<int64_t>(blocks, 1);
    for (Lane& l : lanes_) l.staging = Buffer();  // Remade at the next use.
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
    Buffer staging;  // Device memory: staging_blocks_ slots (copy engines).
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

  // Makes `l`'s staging buffer if it has none. Its previous batches (stream
  // order on the lane) are the only users of an existing one.
  absl::Status EnsureStaging(Lane& l) {
    if (l.staging.data() != nullptr) return absl::OkStatus();
    absl::StatusOr<Buffer> staging =
        device_.Allocate(static_cast<size_t>(staging_blocks_ * slot_bytes()));
    if (!staging.ok()) {
      return absl::ResourceExhaustedError(
          absl::StrCat("tier copy: no device memory for a staging buffer of ",
                       staging_blocks_, " slots of ", slot_bytes(),
                       " bytes: ", staging.status().message()));
    }
    l.staging = *std::move(staging);
    return absl::OkStatus();
  }

  // One batch by the copy engines, in chunks of staging_blocks_ pairs on the
  // lane's stream: offload = gather kernel (cache -> staging images), then
  // the images to their slots; onboard = slots to images, then scatter
  // kernel (staging -> cache). `p` is the whole batch's kernel parameters.
  absl::Status CopyThroughStaging(Lane& l, absl::Span<const TierPair> copies,
                                  const TierCopyParams& p) {
    const int64_t n = static_cast<int64_t>(copies.size());
    const int64_t slot = slot_bytes();
    char* staging = l.staging.as<char>();
    cudaMemcpyAttributes attr = {};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    for (int64_t first = 0; first < n; first += staging_blocks_) {
      const int64_t count = std::min(staging_blocks_, n - first);
      TierCopyParams chunk = p;
      chunk.copies = p.copies + first;
      chunk.num_copies = count;
      chunk.pool = staging;
      chunk.slot_is_index = true;
      // A descriptor per stretch contiguous both in staging and in the pool
      // (AppendStagedCopies: a slot's covered segments, neighbours merged).
      staged_.clear();
      dma_dst_.clear();
      dma_src_.clear();
      dma_bytes_.clear();
      try {
        const size_t most = count * slot_segments_.size();
        staged_.reserve(most);
        dma_dst_.reserve(most);
        dma_src_.reserve(most);
        dma_bytes_.reserve(most);
      } catch (const std::bad_alloc&) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "tier copy: no host memory for ", count, " copy descriptors"));
      }
      AppendStagedCopies(slot_segments_, copies.subspan(first, count), staging,
                         pool(), slot, staged_);
      for (const StagedCopy& c : staged_) {
        dma_dst_.push_back(p.onboard ? c.staging : c.pool);
        dma_src_.push_back(p.onboard ? c.pool : c.staging);
        dma_bytes_.push_back(static_cast<size_t>(c.bytes));
      }
      if (!p.onboard) {
        KVCACHE_RETURN_IF_ERROR(
            LaunchTierCopy(chunk, kStagingCopyBlocks, l.stream));
      }
      size_t first_attr = 0;
      KVCACHE_CUDA_RETURN_IF_ERROR(cudaMemcpyBatchAsync(
          dma_dst_.data(), dma_src_.data(), dma_bytes_.data(),
          dma_bytes_.size(), &attr, &first_attr, 1, l.stream));
      if (p.onboard) {
        KVCACHE_RETURN_IF_ERROR(
            LaunchTierCopy(chunk, kStagingCopyBlocks, l.stream));
      }
    }
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
  int64_t staging_blocks_;                   // Slots of a staging buffer.
  const std::vector<SlotSegment> slot_segments_;  // SlotSegments(runs()).
  // CopyThroughStaging's copies and descriptors (reused; host memory only).
  std::vector<StagedCopy> staged_;
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
