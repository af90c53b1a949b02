// Device is where a KV cache's memory lives and how bytes reach it: the host
// (CPU backend) or one CUDA GPU. It allocates owned Buffers, moves bytes
// between staging (pinned host) memory and device memory on a caller's stream,
// and orders work with events.
//
// Thread-safe: every method may be called from any thread. Streams and events
// are opaque handles (cudaStream_t / cudaEvent_t on CUDA, ignored on the CPU,
// where every operation is synchronous). Every allocation goes through Allocate
// or AllocateStaging, so a test can make any of them fail.

#ifndef KVCACHE_STORAGE_DEVICE_H_
#define KVCACHE_STORAGE_DEVICE_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "storage/buffer.h"

namespace kvcache {

enum class DeviceKind { kCpu, kCuda };

// An owned event handle (cudaEvent_t on CUDA; a null handle on the CPU).
class Event {
 public:
  using Deleter = void (*)(void* handle);
  Event() = default;
  Event(void* handle, Deleter deleter) : handle_(handle), deleter_(deleter) {}
  Event(Event&& other) noexcept { *this = std::move(other); }
  Event& operator=(Event&& other) noexcept {
    if (this != &other) {
      if (handle_ != nullptr && deleter_ != nullptr) deleter_(handle_);
      handle_ = other.handle_;
      deleter_ = other.deleter_;
      other.handle_ = nullptr;
      other.deleter_ = nullptr;
    }
    return *this;
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event() {
    if (handle_ != nullptr && deleter_ != nullptr) deleter_(handle_);
  }
  void* handle() const { return handle_; }

 private:
  void* handle_ = nullptr;
  Deleter deleter_ = nullptr;
};

class Device {
 public:
  virtual ~Device() = default;

  virtual DeviceKind kind() const = 0;
  // CUDA device ordinal; 0 on the CPU.
  virtual int ordinal() const = 0;

  // Memory the kernels read and write (device memory on CUDA).
  // ResourceExhausted on failure.
  virtual absl::StatusOr<Buffer> Allocate(size_t bytes) = 0;
  // Host memory that CopyToDeviceAsync may read without a stall (pinned on
  // CUDA, and mapped: device code may dereference it; from 256 MiB up a
  // registered anonymous mapping, zero-filled, instead of cudaMallocHost).
  virtual absl::StatusOr<Buffer> AllocateStaging(size_t bytes) = 0;

  // Sets `bytes` bytes at `dst` (device memory) to zero; completes before
  // returning.
  virtual absl::Status Zero(void* dst, size_t bytes) = 0;
  // Copies host staging memory to device memory, ordered on `stream`.
  virtual absl::Status CopyToDeviceAsync(void* dst, const void* src,
                                         size_t bytes, void* stream) = 0;
  // Copies device memory to host memory; completes before returning.
  virtual absl::Status CopyToHost(void* dst, const void* src, size_t bytes) = 0;

  virtual absl::StatusOr<Event> CreateEvent() = 0;
  // Marks the point after all work enqueued so far on `stream`.
  virtual absl::Status RecordEvent(const Event& event, void* stream) = 0;
  // Makes later work on `stream` wait for the event.
  virtual absl::Status StreamWaitEvent(void* stream, const Event& event) = 0;
  // Blocks the calling thread until the event has completed.
  virtual absl::Status SynchronizeEvent(const Event& event) = 0;
  // Blocks the calling thread until all work on `stream` has completed.
  virtual absl::Status SynchronizeStream(void* stream) = 0;

  // An event that can time work: a timing-enabled cudaEvent_t on CUDA; on the
  // CPU, a host clock reading taken by RecordEvent (work there is synchronous).
  virtual absl::StatusOr<Event> CreateTimingEvent() = 0;
  // Milliseconds between two recorded timing events. Waits for `end` to
  // complete. REQUIRES: both come from CreateTimingEvent and were recorded.
  virtual absl::StatusOr<float> ElapsedMs(const Event& start,
                                          const Event& end) = 0;

  // Bytes of memory free and in total (host RAM on the CPU).
  virtual absl::Status MemoryInfo(size_t* free_bytes, size_t* total_bytes) = 0;
};

// The host. Never fails to be created.
std::unique_ptr<Device> CreateCpuDevice();

// CUDA device `ordinal`. FailedPrecondition when built without CUDA support or
// when the host has no CUDA device; InvalidArgument naming the ordinal when it
// is out of range.
absl::StatusOr<std::unique_ptr<Device>> CreateCudaDevice(int ordinal);

}  // namespace kvcache

#endif  // KVCACHE_STORAGE_DEVICE_H_
