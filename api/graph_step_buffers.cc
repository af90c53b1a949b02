#include "api/graph_step_buffers.h"

#include <algorithm>
#include <cstring>
#include <limits>
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
    st.table.assign(max_sequences, RowState{});
  }
  b->device_table_.assign(max_sequences, RowState{});
  // Slots, positions, lengths and one range per row at most.
  b->ranges_.reserve(max_sequences + 3);
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

void GraphStepBuffers::UpdateRow(RowState& have, const RowState& want,
                                 const BlockId* blocks, int32_t* row) const {
  if (have == want) return;
  const int32_t begin = have.IsPrefixOf(want) ? have.blocks : 0;
  std::copy(blocks + begin, blocks + want.blocks, row + begin);
  if (have.blocks > want.blocks) {
    std::fill(row + want.blocks, row + have.blocks, 0);
  }
  have = want;
}

void GraphStepBuffers::AddRange(size_t begin, size_t end) {
  if (begin >= end) return;
  if (!ranges_.empty() && (coalesce_ || ranges_.back().end >= begin)) {
    ranges_.back().end = std::max(ranges_.back().end, end);
    return;
  }
  ranges_.push_back(Range{begin, end});  // Within the reserved capacity.
}

void GraphStepBuffers::ForgetDevice() {
  device_tokens_ = max_tokens_;
  device_rows_ = max_sequences_;
  device_table_rows_ = max_sequences_;
  // No staging row is ever in this state: every row is rewritten whole.
  for (RowState& r : device_table_) {
    r = RowState{std::numeric_limits<uint64_t>::max(), 0,
                 static_cast<int32_t>(cols_)};
  }
}

absl::Status GraphStepBuffers::Write(absl::Span<const int64_t> slots,
                                     absl::Span<const int64_t> num_tokens,
                                     absl::Span<const int64_t> first_positions,
                                     absl::Span<const BlockTableRef> tables,
                                     void* stream) {
  Staging& st = staging_[next_];
  // Step N-1's upload from this copy must have finished.
  KVCACHE_RETURN_IF_ERROR(device_->SynchronizeEvent(st.uploaded));
  char* base = static_cast<char*>(st.host.data());
  int64_t* host_slots = reinterpret_cast<int64_t*>(base);
  int64_t* positions = reinterpret_cast<int64_t*>(base + positions_offset());
  int32_t* lens = reinterpret_cast<int32_t*>(base + lens_offset());
  int32_t* table = reinterpret_cast<int32_t*>(base + table_offset());

  // Slots, positions and lengths: this copy's whole arrays are made right
  // (padding past the step), and the device's covered up to what either the
  // step or the device's last contents reach.
  const int64_t n = static_cast<int64_t>(slots.size());
  const int64_t rows = static_cast<int64_t>(tables.size());
  std::copy(slots.begin(), slots.end(), host_slots);
  if (st.tokens > n) {
    std::fill(host_slots + n, host_slots + st.tokens, int64_t{-1});
    std::fill(positions + n, positions + st.tokens, int64_t{0});
  }
  int64_t offset = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t first = first_positions[r];
    for (int64_t j = 0; j < num_tokens[r]; ++j) {
      positions[offset + j] = first + j;
    }
    offset += num_tokens[r];
    lens[r] = static_cast<int32_t>(first + num_tokens[r]);
  }
  if (st.rows > rows) std::fill(lens + rows, lens + st.rows, 0);
  st.tokens = n;
  st.rows = rows;
  ranges_.clear();
  const size_t token_bytes = std::max(n, device_tokens_) * sizeof(int64_t);
  AddRange(0, token_bytes);
  AddRange(positions_offset(), positions_offset() + token_bytes);
  AddRange(lens_offset(),
           lens_offset() + std::max(rows, device_rows_) * sizeof(int32_t));

  // The block table, row by row over every row the step or the device holds.
  const int64_t table_rows = std::max(rows, device_table_rows_);
  for (int64_t r = 0; r < table_rows; ++r) {
    RowState want;
    const BlockId* blocks = nullptr;
    if (r < rows) {
      want = RowState{tables[r].serial, tables[r].version,
                      static_cast<int32_t>(tables[r].blocks.size())};
      blocks = tables[r].blocks.data();
    }
    int32_t* row = table + r * cols_;
    UpdateRow(st.table[r], want, blocks, row);
    RowState& device = device_table_[r];
    if (device == want) continue;
    const int32_t begin = device.IsPrefixOf(want) ? device.blocks : 0;
    const int32_t end = std::max(device.blocks, want.blocks);
    const size_t row_offset = table_offset() + r * cols_ * sizeof(int32_t);
    AddRange(row_offset + begin * sizeof(int32_t),
             row_offset + end * sizeof(int32_t));
    device = want;
  }
  device_tokens_ = n;
  device_rows_ = rows;
  device_table_rows_ = rows;

  last_upload_bytes_ = 0;
  last_upload_copies_ = 0;
  for (const Range& range : ranges_) {
    // Coalesced, the one copy starts at the buffers' start.
    const size_t begin = coalesce_ ? 0 : range.begin;
    if (absl::Status s = device_->CopyToDeviceAsync(
            static_cast<char*>(device_buffer_.data()) + begin, base + begin,
            range.end - begin, stream);
        !s.ok()) {
      ForgetDevice();
      return s;
    }
    last_upload_bytes_ += static_cast<int64_t>(range.end - begin);
    ++last_upload_copies_;
  }
  if (absl::Status s = device_->RecordEvent(st.uploaded, stream); !s.ok()) {
    ForgetDevice();
    return s;
  }
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
