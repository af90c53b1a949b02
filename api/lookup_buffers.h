// LookupBuffers are the fixed staging (pinned host) and device buffers through
// which lookups hand block ids to kernels, allocated once at Create:
//
//   batch table   int32 [max_sequences, cols], then int32 seq_lens
//                 [max_sequences]: BatchBlockTable's view (same pointers on
//                 every call, so an engine may capture them in a CUDA graph)
//   gather range  int32 [cols]: the blocks one Gather reads
//
// Thread-compatible: the manager's mutex guards it. Internal to api/.

#ifndef KVCACHE_API_LOOKUP_BUFFERS_H_
#define KVCACHE_API_LOOKUP_BUFFERS_H_

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
  // The gather range in the backend's memory (a fixed address).
  const int32_t* gather_range() const { return gather_device_.as<int32_t>(); }
  // Uploads `blocks` (at most cols()) into the gather range on `stream`.
  absl::Status UploadGatherRange(absl::Span<const BlockId> blocks,
                                 void* stream);

 private:
  LookupBuffers(Device* device, int64_t max_sequences, int64_t cols)
      : device_(device), max_sequences_(max_sequences), cols_(cols) {}

  Device* const device_;
  const int64_t max_sequences_;
  const int64_t cols_;
  Buffer table_staging_;
  Buffer table_device_;
  Event table_uploaded_;
  Buffer gather_staging_;
  Buffer gather_device_;
};

}  // namespace kvcache::internal

#endif  // KVCACHE_API_LOOKUP_BUFFERS_H_
