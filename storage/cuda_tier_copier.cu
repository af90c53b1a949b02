// The CUDA backend's TierCopier (storage/tier_copier.h): a pool of pinned
// host memory, which the device reaches through unified addressing, and one
// copy kernel per batch on its lane's own stream. A kernel, not one
// cudaMemcpyAsync per run: a block of a 32-layer model is 128 runs of a few
// KiB, which a copy call each would spend in launch overhead.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/cuda_check.h"
#include "storage/tier_copier.h"

namespace kvcache {
namespace {

// Thread blocks per batch by default: with four 16-byte accesses in flight
// per thread, 32 blocks of 256 threads keep 512 KiB of copies in flight,
// several times what the PCIe link's bandwidth-latency product needs, while
// holding an eighth of the threads of a quarter of an H200's
// multiprocessors: the caller's kernels keep the rest.
constexpr int kDefaultCopyBlocks = 32;
constexpr int kCopyThreads = 256;
constexpr int kUnroll = 4;

// One thread block per run (grid-strided over runs); 16-byte accesses where
// both ends and the length allow them, kUnroll loads issued before their
// stores so that each thread keeps several reads in flight.
__global__ void __launch_bounds__(kCopyThreads)
    CopyRunsKernel(const CopyRun* __restrict__ runs, int64_t num_runs) {
  for (int64_t r = blockIdx.x; r < num_runs; r += gridDim.x) {
    const CopyRun run = runs[r];
    const uintptr_t bits = reinterpret_cast<uintptr_t>(run.dst) |
                           reinterpret_cast<uintptr_t>(run.src) |
                           static_cast<uintptr_t>(run.bytes);
    if ((bits & 15) == 0) {
      const int64_t n = run.bytes / 16;
      uint4* dst = static_cast<uint4*>(run.dst);
      const uint4* src = static_cast<const uint4*>(run.src);
      constexpr int64_t kStep = int64_t{kCopyThreads} * kUnroll;
      int64_t i = threadIdx.x;
      for (; i + (kUnroll - 1) * kCopyThreads < n; i += kStep) {
        uint4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) v[u] = src[i + u * kCopyThreads];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) dst[i + u * kCopyThreads] = v[u];
      }
      for (; i < n; i += kCopyThreads) dst[i] = src[i];
    } else {
      char* dst = static_cast<char*>(run.dst);
      const char* src = static_cast<const char*>(run.src);
      for (int64_t i = threadIdx.x; i < run.bytes; i += kCopyThreads)
        dst[i] = src[i];
    }
  }
}

void DestroyEventHandle(cudaEvent_t e) {
  if (e != nullptr) cudaEventDestroy(e);
}

class CudaTierCopier final : public TierCopier {
 public:
  CudaTierCopier(Device& device, Buffer pool)
      : device_(device), pool_(std::move(pool)) {}
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
      }
    }
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaEventCreateWithFlags(&caller_, cudaEventDisableTiming));
    return absl::OkStatus();
  }

  char* pool() const override { return pool_.as<char>(); }
  int64_t pool_bytes() const override {
    return static_cast<int64_t>(pool_.size());
  }

  absl::Status Enqueue(TierLane lane, absl::Span<const CopyRun> runs,
                       void* after_stream, const TierDeps& after) override {
    if (TakeInjectedFailure()) {
      return absl::InternalError("tier copy failed (injected by a test)");
    }
    if (runs.empty()) return absl::OkStatus();
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_.ordinal()));
    Lane& l = lanes_[Index(lane)];
    // The batch's description goes to pinned memory the kernel reads; the
    // ring entry's last kernel must be done with it first (the host waits
    // only when kRingEntries batches of the lane are in flight).
    Ring& ring = l.ring[l.enqueued % kRingEntries];
    if (l.enqueued - Advance(l) >= kRingEntries) {
      KVCACHE_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(ring.used));
    }
    const size_t bytes = runs.size() * sizeof(CopyRun);
    if (ring.runs.size() < bytes) {
      absl::StatusOr<Buffer> grown =
          device_.AllocateStaging(std::max(bytes, 2 * ring.runs.size()));
      if (!grown.ok()) return grown.status();
      ring.runs = *std::move(grown);
    }
    std::memcpy(ring.runs.data(), runs.data(), bytes);
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
    const int64_t n = static_cast<int64_t>(runs.size());
    const int grid = static_cast<int>(std::min<int64_t>(n, max_blocks_));
    CopyRunsKernel<<<grid, kCopyThreads, 0, l.stream>>>(ring.runs.as<CopyRun>(),
                                                        n);
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaEventRecord(ring.used, l.stream));
    int64_t batch_bytes = 0;
    for (const CopyRun& r : runs) batch_bytes += r.bytes;
    ring.bytes = batch_bytes;
    ring.batch = ++l.enqueued;
    return absl::OkStatus();
  }

  absl::Status WaitOn(TierLane lane, int64_t batch, void* stream) override {
    const Lane& l = lanes_[Index(lane)];
    if (batch <= l.known_done) return absl::OkStatus();
    // Batch `batch` still owns its ring entry, or it is older than the ring
    // and Enqueue waited for it when it reused the entry.
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
    int64_t bytes = 0;
    for (int64_t b = Advance(l) + 1; b <= l.enqueued; ++b) {
      bytes += l.ring[(b - 1) % kRingEntries].bytes;
    }
    return bytes;
  }
  int64_t enqueued(TierLane lane) const override {
    return lanes_[Index(lane)].enqueued;
  }
  int64_t completed(TierLane lane) override {
    return Advance(lanes_[Index(lane)]);
  }

  void set_max_blocks_for_testing(int blocks) override {
    max_blocks_ = std::max(blocks, 1);
  }

 private:
  static constexpr int kRingEntries = 32;
  struct Ring {
    Buffer runs;  // Pinned CopyRun array.
    cudaEvent_t used = nullptr;
    int64_t bytes = 0;  // Of its last batch.
    int64_t batch = 0;  // Its last batch's number (1-based); 0 = none.
  };
  struct Lane {
    cudaStream_t stream = nullptr;
    Ring ring[kRingEntries];
    int64_t enqueued = 0;    // Batches enqueued.
    int64_t known_done = 0;  // Every batch up to it is done.
  };
  static int Index(TierLane lane) { return static_cast<int>(lane); }
  // Moves l.known_done past the batches found complete and returns it.
  // Batches of a lane complete in order, so the scan stops at the first busy
  // one (one event query while the oldest is still running); batches older
  // than the ring were waited for by Enqueue when it reused their entry.
  static int64_t Advance(Lane& l) {
    l.known_done = std::max(l.known_done, l.enqueued - kRingEntries);
    while (l.known_done < l.enqueued &&
           !Busy(l.ring[l.known_done % kRingEntries])) {
      ++l.known_done;
    }
    return l.known_done;
  }
  static bool Busy(const Ring& r) {
    if (cudaEventQuery(r.used) != cudaErrorNotReady) return false;
    cudaGetLastError();
    return true;
  }

  Device& device_;
  Buffer pool_;
  Lane lanes_[kNumTierLanes];
  cudaEvent_t caller_ = nullptr;  // The caller's stream at Enqueue.
  int max_blocks_ = kDefaultCopyBlocks;
};

}  // namespace

absl::StatusOr<std::unique_ptr<TierCopier>> CreateCudaTierCopier(
    Device& device, int64_t pool_bytes) {
  absl::StatusOr<Buffer> pool =
      device.AllocateStaging(static_cast<size_t>(pool_bytes));
  if (!pool.ok()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("host tier of ", pool_bytes,
                     " bytes of pinned memory: ", pool.status().message()));
  }
  auto copier = std::make_unique<CudaTierCopier>(device, *std::move(pool));
  if (absl::Status s = copier->Init(); !s.ok()) return s;
  return std::unique_ptr<TierCopier>(std::move(copier));
}

}  // namespace kvcache
