#include "api/graph_step_buffers.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace kvcache::internal {

absl::StatusOr<std::unique_ptr<GraphStepBuffers>> GraphStepBuffers::Create(
    Device* device, int64_t max_tokens, int64_t max_sequences, int64_t cols,
    int64_t tables, bool released) {
  std::unique_ptr<GraphStepBuffers> b(new GraphStepBuffers(
      device, max_tokens, max_sequences, cols, tables, released));
  const size_t bytes =
      b->table_offset() + max_sequences * tables * cols * sizeof(int32_t);
  KVCACHE_ASSIGN_OR_RETURN(b->device_buffer_, device->Allocate(bytes));
  for (Staging& st : b->staging_) {
    KVCACHE_ASSIGN_OR_RETURN(st.host, device->AllocateStaging(bytes));
    KVCACHE_ASSIGN_OR_RETURN(st.uploaded, device->CreateEvent());
    std::memset(st.host.data(), 0, bytes);
    std::fill_n(st.host.as<int64_t>(), tables * max_tokens, int64_t{-1});
    st.table.assign(max_sequences * tables, RowState{});
  }
  b->device_table_.assign(max_sequences * tables, RowState{});
  // Slots per table, positions, lengths and two ranges per row and table at
  // most (released entries, new entries).
  b->ranges_.reserve(2 * max_sequences * tables + tables + 2);
  b->captured_.assign(max_tokens + 1, 0);
  // The buffers start as an empty step: every slot padding.
  KVCACHE_RETURN_IF_ERROR(device->CopyToDeviceAsync(
      b->device_buffer_.data(), b->staging_[0].host.data(), bytes, nullptr));
  KVCACHE_RETURN_IF_ERROR(device->SynchronizeStream(nullptr));
  return b;
}

GraphStepInputs GraphStepBuffers::inputs(int64_t table) const {
  const char* base = static_cast<const char*>(device_buffer_.data());
  GraphStepInputs in;
  in.slot_mapping =
      reinterpret_cast<const int64_t*>(base) + table * max_tokens_;
  in.positions = reinterpret_cast<const int64_t*>(base + positions_offset());
  in.seq_lens = reinterpret_cast<const int32_t*>(base + lens_offset());
  in.block_table =
      reinterpret_cast<const int32_t*>(base + table_offset()) + table * cols_;
  in.max_tokens = max_tokens_;
  in.max_sequences = static_cast<int32_t>(max_sequences_);
  in.row_stride = static_cast<int32_t>(tables_ * cols_);
  return in;
}

template <bool kReleased>
void GraphStepBuffers::UpdateRow(RowState& have, const RowState& want,
                                 const BlockId* blocks, int32_t* row) const {
  if (have.IsPrefixOf<kReleased>(want)) {
    // Entries released since, then entries gained since.
    std::copy(blocks + have.released, blocks + want.released,
              row + have.released);
    const int32_t begin = std::max(have.blocks, want.released);
    std::copy(blocks + begin, blocks + want.blocks, row + begin);
  } else {
    std::copy(blocks, blocks + want.blocks, row);
    if (have.blocks > want.blocks) {
      std::fill(row + want.blocks, row + have.blocks, 0);
    }
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
                 static_cast<int32_t>(cols_), 0};
  }
}

template <bool kReleased>
void GraphStepBuffers::WriteTables(Staging& st, int32_t* table, int64_t rows,
                                   absl::Span<const BlockTableRef> tables) {
  // Row by row (every table of a row, in memory order) over every row the
  // step or the device holds.
  const int64_t table_rows = std::max(rows, device_table_rows_);
  for (int64_t i = 0; i < table_rows * tables_; ++i) {
    RowState want;
    const BlockId* blocks = nullptr;
    if (i < rows * tables_) {
      const BlockTableRef& ref = tables[i];
      want = RowState{ref.serial, ref.version,
                      static_cast<int32_t>(ref.blocks.size()),
                      kReleased ? static_cast<int32_t>(ref.released) : 0};
      blocks = ref.blocks.data();
    }
    // Most decode rows are unchanged: only the others call out.
    if (RowState& staged = st.table[i]; !staged.Same<kReleased>(want)) {
      UpdateRow<kReleased>(staged, want, blocks, table + i * cols_);
    }
    RowState& device = device_table_[i];
    if (device.Same<kReleased>(want)) continue;
    const size_t row_offset = table_offset() + i * cols_ * sizeof(int32_t);
    if (device.IsPrefixOf<kReleased>(want)) {
      if (kReleased) {
        AddRange(row_offset + device.released * sizeof(int32_t),
                 row_offset + want.released * sizeof(int32_t));
      }
      const int32_t begin = std::max(device.blocks, want.released);
      AddRange(row_offset + begin * sizeof(int32_t),
               row_offset + want.blocks * sizeof(int32_t));
    } else {
      AddRange(row_offset, row_offset + std::max(device.blocks, want.blocks) *
                                            sizeof(int32_t));
    }
    device = want;
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
  const int64_t n = static_cast<int64_t>(slots.size()) / tables_;
  const int64_t rows = static_cast<int64_t>(num_tokens.size());
  for (int64_t t = 0; t < tables_; ++t) {
    int64_t* mapping = host_slots + t * max_tokens_;
    std::copy(slots.begin() + t * n, slots.begin() + (t + 1) * n, mapping);
    if (st.tokens > n) std::fill(mapping + n, mapping + st.tokens, int64_t{-1});
  }
  if (st.tokens > n) {
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
  for (int64_t t = 0; t < tables_; ++t) {
    const size_t begin = t * max_tokens_ * sizeof(int64_t);
    AddRange(begin, begin + token_bytes);
  }
  AddRange(positions_offset(), positions_offset() + token_bytes);
  AddRange(lens_offset(),
           lens_offset() + std::max(rows, device_rows_) * sizeof(int32_t));

  if (released_) {
    WriteTables<true>(st, table, rows, tables);
  } else {
    WriteTables<false>(st, table, rows, tables);
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
  for (int64_t t = 0; t < tables_; ++t) {
    const int64_t at = t * max_tokens_ + offset;
    int64_t* staged = st.host.as<int64_t>() + at;
    std::fill(staged, staged + count, int64_t{-1});
    KVCACHE_RETURN_IF_ERROR(device_->CopyToDeviceAsync(
        device_buffer_.as<int64_t>() + at, staged,
        static_cast<size_t>(count) * sizeof(int64_t), stream));
  }
  return device_->RecordEvent(st.uploaded, stream);
}

absl::Status CheckGraphStep(const GraphStepBuffers* graph,
                            uint64_t plan_in_flight,
                            absl::Span<const ReserveRequest> batch,
                            int64_t graph_tokens) {
  if (graph == nullptr) {
    return absl::FailedPreconditionError(
        "graph step of a manager created with graph_max_tokens 0");
  }
  if (graph_tokens < 1 || graph_tokens > graph->max_tokens()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "graph step padded to ", graph_tokens,
        " tokens: expected 1 to graph_max_tokens ", graph->max_tokens()));
  }
  if (plan_in_flight != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "graph step while graph step plan ", plan_in_flight,
        " is in flight (its inputs share one set of buffers): commit or "
        "abort it first"));
  }
  if (static_cast<int64_t>(batch.size()) > graph->max_sequences()) {
    return absl::InvalidArgumentError(
        absl::StrCat("graph step of ", batch.size(), " sequences exceeds its ",
                     graph->max_sequences(), " block-table rows"));
  }
  int64_t tokens = 0;
  for (const ReserveRequest& request : batch) {
    tokens += std::max<int64_t>(request.num_tokens, 0);
  }
  if (tokens > graph_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("graph step of ", tokens,
                                                   " tokens padded to only ",
                                                   graph_tokens, " tokens"));
  }
  return absl::OkStatus();
}

}  // namespace kvcache::internal
