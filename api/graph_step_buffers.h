// GraphStepBuffers: the persistent, fixed-address inputs of the graph-
// capturable decode step (api/graph_step_inputs.h), allocated once at Create
// when config.graph_max_tokens > 0, and what the manager knows of the graphs
// captured over them. With layer groups a sequence has `tables` block tables
// (NumBlockTables), each with its own slot mapping and block table; the
// positions and lengths are shared. Without groups tables = 1.
//
// Device layout (one allocation):
//
//   int64 slot_mapping [tables, max_tokens] | int64 positions [max_tokens] |
//   int32 seq_lens [max_sequences] | int32 block_table [max_sequences, tables,
//   cols]
//
// so table t's slot mapping starts at t * max_tokens and its block table at
// entry t * cols with rows tables * cols apart (row_stride): the tables'
// rows interleave, so a decode step's changes to every table of a row lie
// together and one upload up to the last changed row covers them all.
// Released sliding-window entries (kNullBlock) are written as they are.
//
// The host side is staged in two pinned copies used in turn, so writing step
// N+1's inputs waits at most for step N-1's upload, never for step N's.
//
// The block table is kept in step incrementally. For every row the buffers
// remember what the device holds (which sequence's table, by its serial and
// version, BlockTableRef, and how many of its blocks; zeros after them), and
// separately what each staging copy holds. A step brings the staging copy it
// writes up to date row by row (in decode: the blocks a sequence gained since
// that copy's last step, two steps ago) and uploads only what the device
// lacks: the entries a row gained, a whole row when its sequence changed, its
// table shrank or an entry was replaced (copy-on-write), zeros where a row
// emptied, and kNullBlock over the entries a sliding window released since
// (BlockTableRef::released). Slots, positions and lengths (a few KB) are rewritten every step.
// On a GPU the upload is one asynchronous copy from the start of the buffer to
// the end of the last changed row (one call costs the host about the same
// whatever its size); on the CPU, where a copy is a memcpy paid by the host,
// it is one copy per run of changed bytes. Every upload runs on the caller's
// stream, after earlier work on that stream (the graph replays that read the
// last inputs).
//
// Thread-compatible: the manager's mutex guards it. Internal to api/.

#ifndef KVCACHE_API_GRAPH_STEP_BUFFERS_H_
#define KVCACHE_API_GRAPH_STEP_BUFFERS_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "allocator/block_manager.h"
#include "api/graph_step_inputs.h"
#include "storage/buffer.h"
#include "storage/device.h"

namespace kvcache::internal {

class GraphStepBuffers {
 public:
  // REQUIRES: `device` outlives the buffers; max_tokens, max_sequences,
  // cols, tables >= 1. `released`: tables may have released entries
  // (BlockTableRef::released; sliding windows); without it they are
  // ignored.
  static absl::StatusOr<std::unique_ptr<GraphStepBuffers>> Create(
      Device* device, int64_t max_tokens, int64_t max_sequences, int64_t cols,
      int64_t tables = 1, bool released = false);

  // Table `table`'s inputs (its slot mapping and block table; the shared
  // positions and lengths). REQUIRES: 0 <= table < tables().
  GraphStepInputs inputs(int64_t table = 0) const;
  int64_t max_tokens() const { return max_tokens_; }
  int64_t max_sequences() const { return max_sequences_; }
  int64_t tables() const { return tables_; }

  // Writes a step's inputs: `slots` (the plan's slot mappings, batch order,
  // table after table: table t's n tokens at t * n), per sequence its
  // `num_tokens` and `first_positions` and its block tables (`tables`,
  // including this step's blocks; sequence i's table t at i * tables() + t),
  // then -1 / 0 padding, and uploads what changed on `stream`. REQUIRES:
  // slots.size() = tables() * n with n <= max_tokens, the sequences' tokens
  // sum to n, num_tokens.size() == first_positions.size() <= max_sequences,
  // tables.size() == tables() * num_tokens.size(), every table at most cols
  // blocks, and each table's (serial, version, released) as BlockTableRef
  // promises. On error the device's contents are unspecified until the next
  // successful Write (which then rewrites everything).
  absl::Status Write(absl::Span<const int64_t> slots,
                     absl::Span<const int64_t> num_tokens,
                     absl::Span<const int64_t> first_positions,
                     absl::Span<const BlockTableRef> tables, void* stream);
  // Rewrites slots [offset, offset + count) of every table's mapping of the
  // last written step to -1 (RemoveFromPlan) on `stream`. REQUIRES: within
  // the last Write's tokens.
  absl::Status Pad(int64_t offset, int64_t count, void* stream);

  // Graphs: a capture of `graph_tokens` tokens is complete once a plan of
  // that size held every layer's Append (the host counted them) and was
  // committed; a later step of that size may be committed without Appends
  // seen on the host (they ran in the replayed graph).
  void MarkCaptured(int64_t graph_tokens) { captured_[graph_tokens] = 1; }
  bool IsCaptured(int64_t graph_tokens) const {
    return captured_[graph_tokens] != 0;
  }

  // Bytes the last Write uploaded and in how many copies (for tests).
  int64_t last_upload_bytes() const { return last_upload_bytes_; }
  int64_t last_upload_copies() const { return last_upload_copies_; }
  // Uploads as on a GPU (one copy) whatever the device.
  void set_coalesce_for_testing(bool on) { coalesce_ = on; }

 private:
  // What a block-table row holds: the first `blocks` entries of the table
  // (serial, version) with its first `released` entries kNullBlock, then
  // zeros. {0, 0, 0, 0} is an empty row.
  struct RowState {
    uint64_t serial = 0;
    uint64_t version = 0;
    int32_t blocks = 0;
    int32_t released = 0;
    // kReleased: whether `released` may be nonzero (sliding windows); the
    // uniform manager's rows compare without it.
    template <bool kReleased>
    bool Same(const RowState& o) const {
      return serial == o.serial && version == o.version && blocks == o.blocks &&
             (!kReleased || released == o.released);
    }
    // The entries are those of `o` but for o's entries past `blocks` and
    // its released ones past `released` (same table, grown since).
    template <bool kReleased>
    bool IsPrefixOf(const RowState& o) const {
      return serial == o.serial && version == o.version && blocks <= o.blocks &&
             (!kReleased || released <= o.released);
    }
  };
  struct Staging {
    Buffer host;
    Event uploaded;
    int64_t tokens = 0;           // Slots and positions before the padding.
    int64_t rows = 0;             // Rows of seq_lens written.
    std::vector<RowState> table;  // [max_sequences * tables]
  };
  struct Range {
    size_t begin = 0, end = 0;  // Bytes from the start of the buffers.
  };

  GraphStepBuffers(Device* device, int64_t max_tokens, int64_t max_sequences,
                   int64_t cols, int64_t tables, bool released)
      : device_(device),
        max_tokens_(max_tokens),
        max_sequences_(max_sequences),
        cols_(cols),
        tables_(tables),
        released_(released),
        coalesce_(device->kind() != DeviceKind::kCpu) {}

  // Makes row `row` (staging memory) hold `want`, from `have` (!= want),
  // writing only what differs; `blocks` are want's table. Then have ==
  // want.
  template <bool kReleased>
  void UpdateRow(RowState& have, const RowState& want, const BlockId* blocks,
                 int32_t* row) const;
  // Write's block tables: staging copy `st` (its table entries at `table`)
  // and the upload ranges for `rows` rows of `tables`.
  template <bool kReleased>
  void WriteTables(Staging& st, int32_t* table, int64_t rows,
                   absl::Span<const BlockTableRef> tables);
  // Adds bytes [begin, end) to the upload (in increasing order).
  void AddRange(size_t begin, size_t end);
  // After a failed upload: the device may hold anything, so the next Write
  // rewrites every byte a step could have written.
  void ForgetDevice();

  // Byte offsets of the four arrays.
  size_t positions_offset() const {
    return tables_ * max_tokens_ * sizeof(int64_t);
  }
  size_t lens_offset() const {
    return positions_offset() + max_tokens_ * sizeof(int64_t);
  }
  size_t table_offset() const {
    return lens_offset() + max_sequences_ * sizeof(int32_t);
  }

  Device* const device_;
  const int64_t max_tokens_;
  const int64_t max_sequences_;
  const int64_t cols_;
  const int64_t tables_;
  const bool released_;
  // One upload per step (GPU), or one per run of changed bytes (CPU).
  bool coalesce_;
  Buffer device_buffer_;
  Staging staging_[2];
  // What the device holds: tokens of slots / positions and rows of seq_lens
  // that may be nonzero, and per block-table row its state; rows at and past
  // device_table_rows_ are empty.
  int64_t device_tokens_ = 0;
  int64_t device_rows_ = 0;
  int64_t device_table_rows_ = 0;
  std::vector<RowState> device_table_;  // [max_sequences * tables]
  std::vector<Range> ranges_;           // Write's upload, reused.
  int64_t last_upload_bytes_ = 0;
  int64_t last_upload_copies_ = 0;
  int next_ = 0;                // The staging copy the next Write uses.
  int last_ = -1;               // The staging copy of the last Write.
  std::vector<char> captured_;  // [max_tokens + 1]
};

// The graph step's limits, the same for both managers: its buffers made
// (`graph` not null: config.graph_max_tokens > 0), the padded count within
// 1..max_tokens, no graph step plan in flight (`plan_in_flight` 0; the steps
// share one set of buffers), the batch within the block-table rows and its
// tokens within the padded count. FailedPrecondition or InvalidArgument
// naming the value.
absl::Status CheckGraphStep(const GraphStepBuffers* graph,
                            uint64_t plan_in_flight,
                            absl::Span<const ReserveRequest> batch,
                            int64_t graph_tokens);

}  // namespace kvcache::internal

#endif  // KVCACHE_API_GRAPH_STEP_BUFFERS_H_
