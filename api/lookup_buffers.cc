#include "api/lookup_buffers.h"

#include <algorithm>
#include <utility>

#include "core/status_macros.h"

namespace kvcache::internal {

int32_t* StageBatchTable(const HostBatchTable& batch, int64_t max_sequences,
                         int64_t cols, int32_t* staged) {
  const int64_t rows = batch.num_sequences;
  std::fill(staged, staged + rows * cols, 0);
  for (int64_t r = 0; r < rows; ++r) {
    std::copy_n(batch.table.data() + r * batch.max_blocks, batch.num_blocks[r],
                staged + r * cols);
  }
  int32_t* lens = staged + max_sequences * cols;
  std::copy_n(batch.seq_lens.data(), rows, lens);
  return lens;
}

absl::StatusOr<std::unique_ptr<LookupBuffers>> LookupBuffers::Create(
    Device* device, int64_t max_sequences, int64_t cols) {
  std::unique_ptr<LookupBuffers> b(
      new LookupBuffers(device, max_sequences, cols));
  const size_t table_bytes =
      static_cast<size_t>(max_sequences) * (cols + 1) * sizeof(int32_t);
  for (Staged& staged : b->table_staging_) {
    KVCACHE_ASSIGN_OR_RETURN(staged.host, device->AllocateStaging(table_bytes));
    KVCACHE_ASSIGN_OR_RETURN(staged.uploaded, device->CreateEvent());
  }
  KVCACHE_ASSIGN_OR_RETURN(b->table_device_, device->Allocate(table_bytes));
  KVCACHE_RETURN_IF_ERROR(device->Zero(b->table_device_.data(), table_bytes));
  const size_t range_bytes =
      static_cast<size_t>(b->gather_capacity_) * sizeof(int32_t);
  for (GatherRange& range : b->gather_) {
    KVCACHE_ASSIGN_OR_RETURN(range.staged.host,
                             device->AllocateStaging(range_bytes));
    KVCACHE_ASSIGN_OR_RETURN(range.staged.uploaded, device->CreateEvent());
    KVCACHE_ASSIGN_OR_RETURN(range.device, device->Allocate(range_bytes));
    KVCACHE_ASSIGN_OR_RETURN(range.last_use, device->CreateEvent());
  }
  return b;
}

absl::StatusOr<BlockTableView> LookupBuffers::UploadBatchTable(
    const HostBatchTable& batch, void* stream) {
  Staged& staging = table_staging_[next_table_];
  // The upload before last read this copy; the last one used the other.
  KVCACHE_RETURN_IF_ERROR(device_->SynchronizeEvent(staging.uploaded));
  const int64_t rows = batch.num_sequences;
  int32_t* staged = staging.host.as<int32_t>();
  const int32_t* lens = StageBatchTable(batch, max_sequences_, cols_, staged);
  int32_t* device_table = table_device_.as<int32_t>();
  int32_t* device_lens = device_table + max_sequences_ * cols_;
  KVCACHE_RETURN_IF_ERROR(device_->CopyToDeviceAsync(
      device_table, staged, rows * cols_ * sizeof(int32_t), stream));
  KVCACHE_RETURN_IF_ERROR(device_->CopyToDeviceAsync(
      device_lens, lens, rows * sizeof(int32_t), stream));
  KVCACHE_RETURN_IF_ERROR(device_->RecordEvent(staging.uploaded, stream));
  next_table_ ^= 1;
  BlockTableView view;
  view.block_table = device_table;
  view.seq_lens = device_lens;
  view.num_sequences = static_cast<int32_t>(rows);
  view.max_blocks = batch.max_blocks;
  view.row_stride = static_cast<int32_t>(cols_);
  return view;
}

absl::StatusOr<const int32_t*> LookupBuffers::UploadGatherRange(
    absl::Span<const BlockId> ranges, void* stream) {
  GatherRange& range = gather_[next_gather_];
  KVCACHE_RETURN_IF_ERROR(device_->SynchronizeEvent(range.staged.uploaded));
  int32_t* staged = range.staged.host.as<int32_t>();
  std::copy(ranges.begin(), ranges.end(), staged);
  // Kernels of the gather before last may still read this device copy.
  KVCACHE_RETURN_IF_ERROR(device_->StreamWaitEvent(stream, range.last_use));
  KVCACHE_RETURN_IF_ERROR(device_->CopyToDeviceAsync(
      range.device.data(), staged, ranges.size() * sizeof(int32_t), stream));
  KVCACHE_RETURN_IF_ERROR(device_->RecordEvent(range.staged.uploaded, stream));
  return range.device.as<int32_t>();
}

absl::Status LookupBuffers::GatherDone(void* stream) {
  GatherRange& range = gather_[next_gather_];
  next_gather_ ^= 1;
  return device_->RecordEvent(range.last_use, stream);
}

}  // namespace kvcache::internal
