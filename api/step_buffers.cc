#include "api/step_buffers.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvcache::internal {

absl::StatusOr<std::unique_ptr<StepBuffers>> StepBuffers::Create(
    Device* device, int num_slots, int64_t max_tokens, int64_t max_copies) {
  std::unique_ptr<StepBuffers> buffers(
      new StepBuffers(device, max_tokens, max_copies));
  const size_t bytes =
      static_cast<size_t>(max_tokens + 2 * max_copies) * sizeof(int64_t);
  buffers->slots_.resize(num_slots);
  for (Slot& slot : buffers->slots_) {
    absl::StatusOr<Buffer> staging = device->AllocateStaging(bytes);
    if (!staging.ok()) return staging.status();
    absl::StatusOr<Buffer> on_device = device->Allocate(bytes);
    if (!on_device.ok()) return on_device.status();
    absl::StatusOr<Event> uploaded = device->CreateEvent();
    if (!uploaded.ok()) return uploaded.status();
    absl::StatusOr<Event> last_use = device->CreateEvent();
    if (!last_use.ok()) return last_use.status();
    absl::StatusOr<Event> readers_done = device->CreateEvent();
    if (!readers_done.ok()) return readers_done.status();
    slot.readers_done = *std::move(readers_done);
    slot.staging = *std::move(staging);
    slot.device = *std::move(on_device);
    slot.uploaded = *std::move(uploaded);
    slot.last_use = *std::move(last_use);
  }
  return buffers;
}

int StepBuffers::FindFree() const {
  const int n = static_cast<int>(slots_.size());
  for (int k = 0; k < n; ++k) {
    const int i = (next_ + k) % n;
    if (!slots_[i].busy) return i;
  }
  return -1;
}

int StepBuffers::num_busy() const {
  int busy = 0;
  for (const Slot& slot : slots_) busy += slot.busy;
  return busy;
}

absl::Status StepBuffers::Upload(int index, absl::Span<const int64_t> slots,
                                 absl::Span<const BlockCopy> copies,
                                 void* stream) {
  Slot& slot = slots_[index];
  if (static_cast<int64_t>(slots.size()) > max_tokens_ ||
      static_cast<int64_t>(copies.size()) > max_copies_) {
    return absl::InvalidArgumentError(
        absl::StrCat("step of ", slots.size(), " tokens and ", copies.size(),
                     " block copies exceeds the step buffers (", max_tokens_,
                     " tokens, ", max_copies_, " copies)"));
  }
  // The previous upload from this staging memory must have finished before it
  // is rewritten.
  if (absl::Status s = device_->SynchronizeEvent(slot.uploaded); !s.ok()) {
    return s;
  }
  int64_t* staged = slot.staging.as<int64_t>();
  if (!slots.empty()) {
    std::memcpy(staged, slots.data(), slots.size() * sizeof(int64_t));
  }
  int64_t* pairs = staged + max_tokens_;
  for (size_t i = 0; i < copies.size(); ++i) {
    pairs[2 * i] = copies[i].src;
    pairs[2 * i + 1] = copies[i].dst;
  }
  // Kernels of this slot's previous plan may still read its device memory.
  if (absl::Status s = WaitForReaders(slot, stream); !s.ok()) return s;
  if (!slots.empty()) {
    if (absl::Status s = device_->CopyToDeviceAsync(
            slot.device.data(), staged, slots.size() * sizeof(int64_t), stream);
        !s.ok()) {
      return s;
    }
  }
  if (!copies.empty()) {
    if (absl::Status s = device_->CopyToDeviceAsync(
            slot.device.as<int64_t>() + max_tokens_, pairs,
            2 * copies.size() * sizeof(int64_t), stream);
        !s.ok()) {
      return s;
    }
  }
  if (absl::Status s = device_->RecordEvent(slot.uploaded, stream); !s.ok()) {
    return s;
  }
  slot.upload_stream = stream;
  return absl::OkStatus();
}

absl::Status StepBuffers::WaitForReaders(Slot& slot, void* stream) {
  if (absl::Status s = device_->StreamWaitEvent(stream, slot.last_use);
      !s.ok()) {
    return s;
  }
  if (slot.unrecorded_readers && slot.readers_stream != stream) {
    if (absl::Status s =
            device_->RecordEvent(slot.readers_done, slot.readers_stream);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = device_->StreamWaitEvent(stream, slot.readers_done);
        !s.ok()) {
      return s;
    }
  }
  // Every reader so far is ordered before `stream`'s next work.
  slot.unrecorded_readers = false;
  return absl::OkStatus();
}

absl::Status StepBuffers::Pad(int index, int64_t offset, int64_t count,
                              void* stream) {
  Slot& slot = slots_[index];
  if (count <= 0) return absl::OkStatus();
  // The staging memory may still be read by the last upload.
  if (absl::Status s = device_->SynchronizeEvent(slot.uploaded); !s.ok()) {
    return s;
  }
  int64_t* staged = slot.staging.as<int64_t>() + offset;
  std::fill(staged, staged + count, int64_t{-1});
  // After the kernels reading the slot and after its last write.
  if (absl::Status s = WaitForReaders(slot, stream); !s.ok()) return s;
  if (absl::Status s = device_->StreamWaitEvent(stream, slot.uploaded);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = device_->CopyToDeviceAsync(
          slot.device.as<int64_t>() + offset, staged,
          static_cast<size_t>(count) * sizeof(int64_t), stream);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = device_->RecordEvent(slot.uploaded, stream); !s.ok()) {
    return s;
  }
  slot.upload_stream = stream;
  return absl::OkStatus();
}

}  // namespace kvcache::internal
