// One CUDA GPU as a Device: cudaMalloc'd memory, pinned staging memory,
// stream-ordered copies and events. Every call first makes the device current
// on the calling thread.

#include <cuda_runtime_api.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "core/cuda_check.h"
#include "storage/cuda_runtime.h"
#include "storage/device.h"

namespace kvcache {
namespace {

void FreeDevice(void* ptr) { cudaFree(ptr); }
void FreePinned(void* ptr) { cudaFreeHost(ptr); }

// Large staging buffers (the host tier's pool: tens of GiB) are pinned by
// registering an anonymous mapping instead of cudaMallocHost, which pins page
// by page on one thread: on an H200 host, 64 GiB took 23.0 s to allocate and
// 6.1 s to free with cudaMallocHost, against 1.9 s of first touch (16
// threads, transparent huge pages asked for), 1.5 s of cudaHostRegister and
// 1.4 s to unregister and unmap (benchmarks/results/NOTES.md "pinning").
constexpr size_t kRegisterMinBytes = size_t{256} << 20;

// The sizes of the registered mappings, for their deleter (Buffer's deleter
// gets the pointer alone).
absl::Mutex registered_mu(absl::kConstInit);
absl::flat_hash_map<void*, size_t>& RegisteredSizes()
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(registered_mu) {
  static auto* sizes = new absl::flat_hash_map<void*, size_t>();
  return *sizes;
}

void FreeRegistered(void* ptr) {
  size_t bytes = 0;
  {
    absl::MutexLock lock(&registered_mu);
    auto it = RegisteredSizes().find(ptr);
    if (it == RegisteredSizes().end()) return;
    bytes = it->second;
    RegisteredSizes().erase(it);
  }
  cudaHostUnregister(ptr);
  munmap(ptr, bytes);
}

// Pinned, device-mapped host memory of `bytes` from an anonymous mapping,
// touched by several threads and registered with the driver; null (nothing
// held) when any step fails or when the device cannot use the host pointer
// itself (the tier's copy kernel dereferences pool addresses directly).
void* AllocateRegistered(size_t bytes, int ordinal) {
  int host_pointer_ok = 0;
  if (cudaDeviceGetAttribute(&host_pointer_ok,
                             cudaDevAttrCanUseHostPointerForRegisteredMem,
                             ordinal) != cudaSuccess ||
      host_pointer_ok == 0) {
    cudaGetLastError();
    return nullptr;
  }
  void* ptr = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (ptr == MAP_FAILED) return nullptr;
  madvise(ptr, bytes, MADV_HUGEPAGE);  // A hint: fewer pages to pin.
  // First touch in parallel: the kernel zeroes each page as it faults in.
  const size_t threads = std::clamp<size_t>(
      std::min<size_t>(std::thread::hardware_concurrency(), 16), 1,
      bytes / (size_t{64} << 20) + 1);
  const size_t per = (bytes / threads + 4095) / 4096 * 4096;
  std::vector<std::thread> touch;
  for (size_t t = 0; t < threads && t * per < bytes; ++t) {
    char* begin = static_cast<char*>(ptr) + t * per;
    const size_t n = std::min(per, bytes - t * per);
    touch.emplace_back([begin, n] { std::memset(begin, 0, n); });
  }
  for (std::thread& t : touch) t.join();
  if (cudaHostRegister(ptr, bytes,
                       cudaHostRegisterMapped | cudaHostRegisterPortable) !=
      cudaSuccess) {
    cudaGetLastError();
    munmap(ptr, bytes);
    return nullptr;
  }
  absl::MutexLock lock(&registered_mu);
  RegisteredSizes()[ptr] = bytes;
  return ptr;
}
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
    if (bytes >= kRegisterMinBytes) {
      if (void* ptr = AllocateRegistered(bytes, ordinal_); ptr != nullptr) {
        return Buffer(ptr, bytes, &FreeRegistered);
      }
    }
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
