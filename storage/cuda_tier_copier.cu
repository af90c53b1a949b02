// The CUDA backend's TierCopier (storage/tier_copier.h): a pool of pinned
// host memory, which the device reaches through unified addressing, and one
// copy kernel per batch on the copier's own stream. A kernel, not one
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

// One CUDA block per run (grid-strided over runs); 16-byte accesses where
// both ends and the length allow them.
__global__ void __launch_bounds__(256)
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
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
    } else {
      char* dst = static_cast<char*>(run.dst);
      const char* src = static_cast<const char*>(run.src);
      for (int64_t i = threadIdx.x; i < run.bytes; i += blockDim.x)
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
    if (stream_ != nullptr) {
      cudaStreamSynchronize(stream_);
      cudaStreamDestroy(stream_);
    }
    DestroyEventHandle(done_);
    DestroyEventHandle(caller_);
    for (Ring& r : ring_) DestroyEventHandle(r.used);
  }

  absl::Status Init() {
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_.ordinal()));
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaEventCreateWithFlags(&caller_, cudaEventDisableTiming));
    for (Ring& r : ring_) {
      KVCACHE_CUDA_RETURN_IF_ERROR(
          cudaEventCreateWithFlags(&r.used, cudaEventDisableTiming));
    }
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(
        &num_sms_, cudaDevAttrMultiProcessorCount, device_.ordinal()));
    return absl::OkStatus();
  }

  char* pool() const override { return pool_.as<char>(); }
  int64_t pool_bytes() const override {
    return static_cast<int64_t>(pool_.size());
  }

  absl::Status Enqueue(absl::Span<const CopyRun> runs,
                       void* after_stream) override {
    if (TakeInjectedFailure()) {
      return absl::InternalError("tier copy failed (injected by a test)");
    }
    if (runs.empty()) return absl::OkStatus();
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_.ordinal()));
    // The batch's description goes to pinned memory the kernel reads; the
    // ring entry's last kernel must be done with it first.
    Ring& ring = ring_[next_ring_];
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(ring.used));
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
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream_, caller_, 0));
    const int64_t n = static_cast<int64_t>(runs.size());
    const int grid = static_cast<int>(std::min<int64_t>(n, 8 * num_sms_));
    CopyRunsKernel<<<grid, 256, 0, stream_>>>(ring.runs.as<CopyRun>(), n);
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaEventRecord(ring.used, stream_));
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaEventRecord(done_, stream_));
    int64_t batch_bytes = 0;
    for (const CopyRun& r : runs) batch_bytes += r.bytes;
    ring.bytes = batch_bytes;
    next_ring_ = (next_ring_ + 1) % kRing;
    ++generation_;
    ring.batch = static_cast<int64_t>(generation_);
    return absl::OkStatus();
  }

  absl::Status WaitOn(void* stream) override {
    if (generation_ == 0) return absl::OkStatus();
    if (stream == waited_stream_ && generation_ == waited_generation_)
      return absl::OkStatus();
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_.ordinal()));
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), done_, 0));
    waited_stream_ = stream;
    waited_generation_ = generation_;
    return absl::OkStatus();
  }

  absl::Status Synchronize() override {
    if (generation_ == 0) return absl::OkStatus();
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_.ordinal()));
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(done_));
    return absl::OkStatus();
  }
  // Batches whose kernel has not finished: each of the last kRing batches
  // owns a ring entry whose event follows its kernel.
  int64_t in_flight() override {
    int64_t busy = 0;
    for (const Ring& r : ring_) busy += Busy(r);
    return busy;
  }
  int64_t in_flight_bytes() override {
    int64_t bytes = 0;
    for (const Ring& r : ring_) bytes += Busy(r) ? r.bytes : 0;
    return bytes;
  }
  int64_t enqueued() const override {
    return static_cast<int64_t>(generation_);
  }
  // Batches are complete in order: up to just before the oldest busy one
  // of the ring, and every batch older than the ring was waited for by
  // Enqueue (cudaEventSynchronize on its entry).
  int64_t completed() override {
    int64_t oldest_busy = static_cast<int64_t>(generation_) + 1;
    for (const Ring& r : ring_) {
      if (r.batch > 0 && Busy(r)) oldest_busy = std::min(oldest_busy, r.batch);
    }
    return oldest_busy - 1;
  }

 private:
  static constexpr int kRing = 4;
  struct Ring {
    Buffer runs;  // Pinned CopyRun array.
    cudaEvent_t used = nullptr;
    int64_t bytes = 0;  // Of its last batch.
    int64_t batch = 0;  // Its last batch's number (1-based); 0 = none.
  };
  static bool Busy(const Ring& r) {
    if (cudaEventQuery(r.used) != cudaErrorNotReady) return false;
    cudaGetLastError();
    return true;
  }

  Device& device_;
  Buffer pool_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t done_ = nullptr;    // After the last batch.
  cudaEvent_t caller_ = nullptr;  // The caller's stream at Enqueue.
  Ring ring_[kRing];
  int next_ring_ = 0;
  int num_sms_ = 1;
  uint64_t generation_ = 0;  // Batches enqueued.
  void* waited_stream_ = nullptr;
  uint64_t waited_generation_ = 0;
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
