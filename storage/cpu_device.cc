// The host as a Device: plain aligned host memory, synchronous copies, no-op
// events (timing events hold a steady-clock reading in nanoseconds).

#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "storage/device.h"

namespace kvcache {
namespace {

constexpr size_t kAlignment = 256;

void FreeHost(void* ptr) { std::free(ptr); }
void DeleteTimestamp(void* ptr) { delete static_cast<int64_t*>(ptr); }

int64_t NowNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

absl::StatusOr<Buffer> AllocateHost(size_t bytes, absl::string_view what) {
  if (bytes == 0) return Buffer();
  const size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
  void* ptr = std::aligned_alloc(kAlignment, rounded);
  if (ptr == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("could not allocate ", bytes, " bytes of ", what));
  }
  return Buffer(ptr, bytes, &FreeHost);
}

class CpuDevice final : public Device {
 public:
  DeviceKind kind() const override { return DeviceKind::kCpu; }
  int ordinal() const override { return 0; }

  absl::StatusOr<Buffer> Allocate(size_t bytes) override {
    return AllocateHost(bytes, "host memory");
  }
  absl::StatusOr<Buffer> AllocateStaging(size_t bytes) override {
    return AllocateHost(bytes, "host staging memory");
  }
  absl::Status Zero(void* dst, size_t bytes) override {
    if (bytes > 0) std::memset(dst, 0, bytes);
    return absl::OkStatus();
  }
  absl::Status CopyToDeviceAsync(void* dst, const void* src, size_t bytes,
                                 void* /*stream*/) override {
    if (bytes > 0) std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    if (bytes > 0) std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::StatusOr<Event> CreateEvent() override { return Event(); }
  absl::Status RecordEvent(const Event& event, void*) override {
    // Only timing events have a handle: the host clock now.
    if (event.handle() != nullptr) {
      *static_cast<int64_t*>(event.handle()) = NowNanos();
    }
    return absl::OkStatus();
  }
  absl::Status StreamWaitEvent(void*, const Event&) override {
    return absl::OkStatus();
  }
  absl::Status SynchronizeEvent(const Event&) override {
    return absl::OkStatus();
  }
  absl::Status SynchronizeStream(void*) override { return absl::OkStatus(); }
  absl::StatusOr<Event> CreateTimingEvent() override {
    auto timestamp = std::make_unique<int64_t>(0);
    return Event(timestamp.release(), &DeleteTimestamp);
  }
  absl::StatusOr<float> ElapsedMs(const Event& start,
                                  const Event& end) override {
    if (start.handle() == nullptr || end.handle() == nullptr) {
      return absl::InvalidArgumentError(
          "ElapsedMs needs two events from CreateTimingEvent");
    }
    const int64_t nanos = *static_cast<const int64_t*>(end.handle()) -
                          *static_cast<const int64_t*>(start.handle());
    return static_cast<float>(static_cast<double>(nanos) * 1e-6);
  }
  absl::Status MemoryInfo(size_t* free_bytes, size_t* total_bytes) override {
    const long page = sysconf(_SC_PAGESIZE);
    const long avail = sysconf(_SC_AVPHYS_PAGES);
    const long total = sysconf(_SC_PHYS_PAGES);
    if (page <= 0 || avail < 0 || total <= 0) {
      return absl::InternalError("sysconf could not report host memory");
    }
    *free_bytes = static_cast<size_t>(avail) * static_cast<size_t>(page);
    *total_bytes = static_cast<size_t>(total) * static_cast<size_t>(page);
    return absl::OkStatus();
  }
};

}  // namespace

std::unique_ptr<Device> CreateCpuDevice() {
  return std::make_unique<CpuDevice>();
}

}  // namespace kvcache
