// StepBuffers: the fixed staging (pinned host) and device buffers that carry
// step plans' slot mappings and copy-on-write pairs to the device, one slot per
// plan in flight, allocated once.
//
// A slot's staging memory is rewritten only after its last upload finished, and
// its device memory only after the kernels that read it (the upload waits on
// the slot's last-use event), so no step allocates and no step stalls the host.
//
// Readers on the upload's own stream (the common case: Reserve and every
// Append on one stream) need no event at all: stream order puts them after
// the upload, and the slot notes that it has unrecorded readers on that
// stream (NoteReader). Only when the slot is next written from another stream
// does WaitForReaders record an event on the readers' stream and make the
// writer wait for it. Readers on other streams wait for `uploaded` and record
// `last_use` themselves.
// Thread-compatible: the manager's mutex guards it.

#ifndef KVCACHE_API_STEP_BUFFERS_H_
#define KVCACHE_API_STEP_BUFFERS_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "allocator/block_manager.h"
#include "storage/buffer.h"
#include "storage/device.h"

namespace kvcache::internal {

class StepBuffers {
 public:
  struct Slot {
    // int64 slots [max_tokens], then int64 pairs [2 * max_copies].
    Buffer staging;
    Buffer device;      // The same layout on the device.
    Event uploaded;     // After the last upload from `staging`.
    Event last_use;     // After the last kernel that read `device`.
    bool busy = false;  // Owned by a plan in flight.
    // The stream of the last write of `device` (Upload or Pad).
    void* upload_stream = nullptr;
    // Kernels on `readers_stream` read `device` after the last write without
    // recording `last_use`.
    bool unrecorded_readers = false;
    void* readers_stream = nullptr;
    Event readers_done;  // Recorded on readers_stream by WaitForReaders.
  };

  // REQUIRES: `device` outlives the buffers.
  static absl::StatusOr<std::unique_ptr<StepBuffers>> Create(
      Device* device, int num_slots, int64_t max_tokens, int64_t max_copies);

  // A free slot's index, or -1 when every slot is busy: the first free one
  // at or after the slot after the last one taken, so that plans committed
  // one after another use the slots in turn, and a plan's Upload waits for
  // the upload of the plan num_slots() before it, not the one just before
  // (an engine may keep num_slots() steps in flight without the host
  // waiting in Reserve).
  int FindFree() const;
  // Marks slot `index` busy (owned by a plan) and moves the turn past it.
  void Take(int index) {
    slots_[index].busy = true;
    next_ = (index + 1) % static_cast<int>(slots_.size());
  }
  // Writes `slots` and `copies` into slot `index` and uploads them on `stream`.
  // On error the slot is left free.
  absl::Status Upload(int index, absl::Span<const int64_t> slots,
                      absl::Span<const BlockCopy> copies, void* stream);

  // Rewrites slots [offset, offset + count) of slot `index` to -1 (padding),
  // staging and device, on `stream`. REQUIRES: within the last upload.
  absl::Status Pad(int index, int64_t offset, int64_t count, void* stream);

  // True when a kernel reading slot `index` on `stream` is ordered after its
  // last write by stream order alone (then call NoteReader after enqueueing
  // it; otherwise wait for `uploaded` and record `last_use` around it).
  bool SameStreamAsWrite(int index, void* stream) const {
    const Slot& slot = slots_[index];
    return stream == slot.upload_stream &&
           (!slot.unrecorded_readers || slot.readers_stream == stream);
  }
  void NoteReader(int index, void* stream) {
    slots_[index].unrecorded_readers = true;
    slots_[index].readers_stream = stream;
  }

  Slot& slot(int index) { return slots_[index]; }
  const int64_t* device_slots(int index) const {
    return slots_[index].device.as<int64_t>();
  }
  const int64_t* device_pairs(int index) const {
    return slots_[index].device.as<int64_t>() + max_tokens_;
  }
  int num_busy() const;
  int num_slots() const { return static_cast<int>(slots_.size()); }

 private:
  // Makes later work on `stream` wait for every kernel that read slot
  // `index`'s device memory.
  absl::Status WaitForReaders(Slot& slot, void* stream);

  StepBuffers(Device* device, int64_t max_tokens, int64_t max_copies)
      : device_(device), max_tokens_(max_tokens), max_copies_(max_copies) {}

  Device* const device_;
  const int64_t max_tokens_;
  const int64_t max_copies_;
  std::vector<Slot> slots_;
  int next_ = 0;  // Where FindFree starts looking.
};

}  // namespace kvcache::internal

#endif  // KVCACHE_API_STEP_BUFFERS_H_
