// LookupBuffers are the fixed staging (pinned host) and device buffers through
// which lookups hand block ids to kernels, allocated once at Create:
//
//   batch table   int32 [max_sequences, cols], then int32 seq_lens
//                 [max_sequences]: BatchBlockTable's view (same pointers on
//                 every call, so an engine may capture them in a CUDA graph)
//   gather range  int32 [gather_capacity]: the blocks one Gather (or one
//                 batched Gather, all its sequences' ranges in turn) reads
//
// Both are staged in two pinned copies used in turn, so preparing the next
// table (or gather) waits at most for the upload before last, never for the
// last one. The gather range has two device copies as well (each with an
// event after its last reader), so an asynchronous Gather never overwrites a
// range a kernel still reads.
//
// Thread-compatible: the manager's mutex guards it. Internal to api/.

#ifndef KVCACHE_API_LOOKUP_BUFFERS_H_
#define KVCACHE_API_LOOKUP_BUFFERS_H_

#include <algorithm>
#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "allocator/block_manager.h"
#include "api/block_table_view.h"
#include "storage/buffer.h"
#include "storage/device.h"

namespace kvcache::internal {

// Writes `batch` into host memory laid out as int32 [max_sequences, cols]
// block ids (each row zero-padded after its blocks), then int32 seq_lens
// [max_sequences]; only the batch's rows are written. Returns the seq_lens
// part. REQUIRES: batch.num_sequences <= max_sequences, batch.max_blocks <=
// cols. Shared by the batch block table and Attention's tables.
int32_t* StageBatchTable(const HostBatchTable& batch, int64_t max_sequences,
                         int64_t cols, int32_t* staged);

class LookupBuffers {
 public:
  // REQUIRES: `device` outlives the buffers; max_sequences, cols >= 1.
  static absl::StatusOr<std::unique_ptr<LookupBuffers>> Create(
      Device* device, int64_t max_sequences, int64_t cols);

  // Block-table columns: the most blocks one sequence may hand a kernel.
  int64_t cols() const { return cols_; }

  // Writes `batch` (at most max_sequences rows, each at most cols() blocks)
  // into the batch table and uploads it on `stream`. Waits for the previous
  // upload from the staging memory first.
  absl::StatusOr<BlockTableView> UploadBatchTable(const HostBatchTable& batch,
                                                  void* stream);
  // Block ids one gather call may read in total (all its sequences).
  int64_t gather_capacity() const { return gather_capacity_; }
  // Uploads `ranges` (concatenated, at most gather_capacity() ids) into the
  // next gather range on `stream`, after the kernels that read that range
  // last; returns its device address. Call GatherDone(stream) after the
  // kernels that read it are enqueued.
  absl::StatusOr<const int32_t*> UploadGatherRange(
      absl::Span<const BlockId> ranges, void* stream);
  absl::Status GatherDone(void* stream);

 private:
  LookupBuffers(Device* device, int64_t max_sequences, int64_t cols)
      : device_(device),
        max_sequences_(max_sequences),
        cols_(cols),
        gather_capacity_(cols * std::min<int64_t>(max_sequences, 8)) {}

  struct Staged {
    Buffer host;
    Event uploaded;  // After the last upload from `host`.
  };
  struct GatherRange {
    Staged staged;
    Buffer device;
    Event last_use;  // After the last kernel that read `device`.
  };

  Device* const device_;
  const int64_t max_sequences_;
  const int64_t cols_;
  const int64_t gather_capacity_;
  Staged table_staging_[2];
  int next_table_ = 0;
  Buffer table_device_;
  GatherRange gather_[2];
  int next_gather_ = 0;
};

}  // namespace kvcache::internal

#endif  // KVCACHE_API_LOOKUP_BUFFERS_H_
