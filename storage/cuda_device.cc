// One CUDA GPU as a Device: cudaMalloc'd memory, pinned staging memory,
// stream-ordered copies and events. Every call first makes the device current
// on the calling thread.

#include <cuda_runtime_api.h>

#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/cuda_check.h"
#include "storage/cuda_runtime.h"
#include "storage/device.h"

namespace kvcache {
namespace {

void FreeDevice(void* ptr) { cudaFree(ptr); }
void FreePinned(void* ptr) { cudaFreeHost(ptr); }
void DestroyEvent(void* event) {
  cudaEventDestroy(static_cast<cudaEvent_t>(event));
}

cudaStream_t AsStream(void* stream) {
  return static_cast<cudaStream_t>(stream);
}
cudaEvent_t AsEvent(const Event& event) {
  return static_cast<cudaEvent_t>(event.handle());
}

class CudaDevice final : public Device {
 public:
  explicit CudaDevice(int ordinal) : ordinal_(ordinal) {}

  DeviceKind kind() const override { return DeviceKind::kCuda; }
  int ordinal() const override { return ordinal_; }

  absl::StatusOr<Buffer> Allocate(size_t bytes) override {
    if (bytes == 0) return Buffer();
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal_));
    void* ptr = nullptr;
    const cudaError_t err = cudaMalloc(&ptr, bytes);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return absl::ResourceExhaustedError(
          absl::StrCat("cudaMalloc of ", bytes, " bytes on device ", ordinal_,
                       " failed: ", cudaGetErrorString(err)));
    }
    return Buffer(ptr, bytes, &FreeDevice);
  }

  absl::StatusOr<Buffer> AllocateStaging(size_t bytes) override {
    if (bytes == 0) return Buffer();
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal_));
    void* ptr = nullptr;
    const cudaError_t err = cudaMallocHost(&ptr, bytes);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return absl::ResourceExhaustedError(
          absl::StrCat("cudaMallocHost of ", bytes,
                       " bytes failed: ", cudaGetErrorString(err)));
    }
    return Buffer(ptr, bytes, &FreePinned);
  }

  absl::Status Zero(void* dst, size_t bytes) override {
    if (bytes == 0) return absl::OkStatus();
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal_));
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaMemset(dst, 0, bytes));
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
    return absl::OkStatus();
  }

  absl::Status CopyToDeviceAsync(void* dst, const void* src, size_t bytes,
                                 void* stream) override {
    if (bytes == 0) return absl::OkStatus();
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal_));
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
        dst, src, bytes, cudaMemcpyHostToDevice, AsStream(stream)));
    return absl::OkStatus();
  }

  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return absl::OkStatus();
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal_));
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
    return absl::OkStatus();
  }

  absl::StatusOr<Event> CreateEvent() override {
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal_));
    cudaEvent_t event = nullptr;
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    return Event(event, &DestroyEvent);
  }

  absl::Status RecordEvent(const Event& event, void* stream) override {
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal_));
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaEventRecord(AsEvent(event), AsStream(stream)));
    return absl::OkStatus();
  }

  absl::Status StreamWaitEvent(void* stream, const Event& event) override {
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal_));
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaStreamWaitEvent(AsStream(stream), AsEvent(event), 0));
    return absl::OkStatus();
  }

  absl::Status SynchronizeEvent(const Event& event) override {
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(AsEvent(event)));
    return absl::OkStatus();
  }

  absl::Status SynchronizeStream(void* stream) override {
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal_));
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(AsStream(stream)));
    return absl::OkStatus();
  }

  absl::StatusOr<Event> CreateTimingEvent() override {
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal_));
    cudaEvent_t event = nullptr;
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaEventCreateWithFlags(&event, cudaEventDefault));
    return Event(event, &DestroyEvent);
  }

  absl::StatusOr<float> ElapsedMs(const Event& start,
                                  const Event& end) override {
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal_));
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(AsEvent(end)));
    float ms = 0.0f;
    KVCACHE_CUDA_RETURN_IF_ERROR(
        cudaEventElapsedTime(&ms, AsEvent(start), AsEvent(end)));
    return ms;
  }

  absl::Status MemoryInfo(size_t* free_bytes, size_t* total_bytes) override {
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal_));
    KVCACHE_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(free_bytes, total_bytes));
    return absl::OkStatus();
  }

 private:
  const int ordinal_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Device>> CreateCudaDevice(int ordinal) {
  absl::StatusOr<int> count = CudaDeviceCount();
  if (!count.ok()) return count.status();
  if (*count == 0) {
    return absl::FailedPreconditionError(
        "no CUDA device on this host: use the CPU backend");
  }
  if (ordinal < 0 || ordinal >= *count) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", ordinal, " out of range: this host has ",
                     *count, " device(s)"));
  }
  return std::unique_ptr<Device>(new CudaDevice(ordinal));
}

}  // namespace kvcache
