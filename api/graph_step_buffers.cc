#include "api/graph_step_buffers.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "core/status_macros.h"

namespace kvcache::internal {

absl::StatusOr<std::unique_ptr<GraphStepBuffers>> GraphStepBuffers::Create(
    Device* device, int64_t max_tokens, int64_t max_sequences, int64_t cols) {
  std::unique_ptr<GraphStepBuffers> b(
      new GraphStepBuffers(device, max_tokens, max_sequences, cols));
  const size_t bytes =
      b->table_offset() + max_sequences * cols * sizeof(int32_t);
  KVCACHE_ASSIGN_OR_RETURN(b->device_buffer_, device->Allocate(bytes));
  for (Staging& st : b->staging_) {
    KVCACHE_ASSIGN_OR_RETURN(st.host, device->AllocateStaging(bytes));
    KVCACHE_ASSIGN_OR_RETURN(st.uploaded, device->CreateEvent());
    std::memset(st.host.data(), 0, bytes);
    std::fill_n(st.host.as<int64_t>(), max_tokens, int64_t{-1});
    st.row_blocks.assign(max_sequences, 0);
  }
  b->captured_.assign(max_tokens + 1, 0);
  // The buffers start as an empty step: every slot padding.
  KVCACHE_RETURN_IF_ERROR(device->CopyToDeviceAsync(
      b->device_buffer_.data(), b->staging_[0].host.data(), bytes, nullptr));
  KVCACHE_RETURN_IF_ERROR(device->SynchronizeStream(nullptr));
  return b;
}

GraphStepInputs GraphStepBuffers::inputs() const {
  const char* base = static_cast<const char*>(device_buffer_.data());
  GraphStepInputs in;
  in.slot_mapping = reinterpret_cast<const int64_t*>(base);
  in.positions = reinterpret_cast<const int64_t*>(base + positions_offset());
  in.seq_lens = reinterpret_cast<const int32_t*>(base + lens_offset());
  in.block_table = reinterpret_cast<const int32_t*>(base + table_offset());
  in.max_tokens = max_tokens_;
  in.max_sequences = static_cast<int32_t>(max_sequences_);
  in.row_stride = static_cast<int32_t>(cols_);
  return in;
}

absl::Status GraphStepBuffers::Write(
    absl::Span<const int64_t> slots, absl::Span<const PlanSequence> layout,
    absl::Span<const absl::Span<const BlockId>> tables, int64_t graph_tokens,
    void* stream) {
  (void)graph_tokens;  // Slots past the step's are -1 up to max_tokens.
  Staging& st = staging_[next_];
  // Step N-1's upload from this copy must have finished.
  KVCACHE_RETURN_IF_ERROR(device_->SynchronizeEvent(st.uploaded));
  char* base = static_cast<char*>(st.host.data());
  int64_t* host_slots = reinterpret_cast<int64_t*>(base);
  int64_t* positions = reinterpret_cast<int64_t*>(base + positions_offset());
  int32_t* lens = reinterpret_cast<int32_t*>(base + lens_offset());
  int32_t* rows_out = reinterpret_cast<int32_t*>(base + table_offset());

  const int64_t n = static_cast<int64_t>(slots.size());
  std::copy(slots.begin(), slots.end(), host_slots);
  if (st.tokens > n) {
    std::fill(host_slots + n, host_slots + st.tokens, int64_t{-1});
    std::fill(positions + n, positions + st.tokens, int64_t{0});
  }
  for (const PlanSequence& s : layout) {
    for (int64_t j = 0; j < s.num_tokens; ++j) {
      positions[s.slot_offset + j] = s.first_position + j;
    }
  }
  const int64_t rows = static_cast<int64_t>(layout.size());
  for (int64_t r = 0; r < rows; ++r) {
    lens[r] =
        static_cast<int32_t>(layout[r].first_position + layout[r].num_tokens);
    int32_t* row = rows_out + r * cols_;
    const int32_t blocks = static_cast<int32_t>(tables[r].size());
    std::copy(tables[r].begin(), tables[r].end(), row);
    if (st.row_blocks[r] > blocks) {
      std::fill(row + blocks, row + st.row_blocks[r], 0);
    }
    st.row_blocks[r] = blocks;
  }
  for (int64_t r = rows; r < st.rows; ++r) {
    lens[r] = 0;
    std::fill_n(rows_out + r * cols_, st.row_blocks[r], 0);
    st.row_blocks[r] = 0;
  }
  // The device holds the other copy's last contents: cover its rows too.
  const int64_t upload_rows =
      std::max({rows, st.rows, staging_[next_ ^ 1].rows});
  st.tokens = n;
  st.rows = rows;
  const size_t bytes = table_offset() + upload_rows * cols_ * sizeof(int32_t);
  KVCACHE_RETURN_IF_ERROR(
      device_->CopyToDeviceAsync(device_buffer_.data(), base, bytes, stream));
  KVCACHE_RETURN_IF_ERROR(device_->RecordEvent(st.uploaded, stream));
  last_ = next_;
  next_ ^= 1;
  return absl::OkStatus();
}

absl::Status GraphStepBuffers::Pad(int64_t offset, int64_t count,
                                   void* stream) {
  if (count <= 0 || last_ < 0) return absl::OkStatus();
  Staging& st = staging_[last_];
  KVCACHE_RETURN_IF_ERROR(device_->SynchronizeEvent(st.uploaded));
  int64_t* staged = st.host.as<int64_t>() + offset;
  std::fill(staged, staged + count, int64_t{-1});
  KVCACHE_RETURN_IF_ERROR(device_->CopyToDeviceAsync(
      device_buffer_.as<int64_t>() + offset, staged,
      static_cast<size_t>(count) * sizeof(int64_t), stream));
  return device_->RecordEvent(st.uploaded, stream);
}

}  // namespace kvcache::internal
