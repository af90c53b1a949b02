// GraphStepBuffers: the persistent, fixed-address inputs of the graph-
// capturable decode step (api/graph_step_inputs.h), allocated once at Create
// when config.graph_max_tokens > 0, and what the manager knows of the graphs
// captured over them.
//
// Device layout (one allocation):
//
//   int64 slot_mapping [max_tokens] | int64 positions [max_tokens] |
//   int32 seq_lens [max_sequences]  | int32 block_table [max_sequences, cols]
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
// emptied. Slots, positions and lengths (a few KB) are rewritten every step.
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
  // cols >= 1.
  static absl::StatusOr<std::unique_ptr<GraphStepBuffers>> Create(
      Device* device, int64_t max_tokens, int64_t max_sequences, int64_t cols);

  GraphStepInputs inputs() const;
  int64_t max_tokens() const { return max_tokens_; }
  int64_t max_sequences() const { return max_sequences_; }

  // Writes a step's inputs: `slots` (the plan's slot mapping, batch order),
  // per sequence its `num_tokens` and `first_positions` and its block table
  // (`tables`, including this step's blocks), then -1 / 0 padding, and
  // uploads what changed on `stream`. REQUIRES: slots.size() <= max_tokens,
  // the sequences' tokens sum to slots.size(), num_tokens.size() ==
  // first_positions.size() == tables.size() <= max_sequences, every table at
  // most cols blocks, and each table's (serial, version) as BlockTableRef
  // promises. On error the device's contents are unspecified until the next
  // successful Write (which then rewrites everything).
  absl::Status Write(absl::Span<const int64_t> slots,
                     absl::Span<const int64_t> num_tokens,
                     absl::Span<const int64_t> first_positions,
                     absl::Span<const BlockTableRef> tables, void* stream);
  // Rewrites slots [offset, offset + count) of the last written step to -1
  // (RemoveFromPlan) on `stream`. REQUIRES: within the last Write's tokens.
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
  // (serial, version), then zeros. {0, 0, 0} is an empty row.
  struct RowState {
    uint64_t serial = 0;
    uint64_t version = 0;
    int32_t blocks = 0;
    bool operator==(const RowState& o) const {
      return serial == o.serial && version == o.version && blocks == o.blocks;
    }
    // The first `blocks` entries are those of `o` (same table, grown since).
    bool IsPrefixOf(const RowState& o) const {
      return serial == o.serial && version == o.version && blocks <= o.blocks;
    }
  };
  struct Staging {
    Buffer host;
    Event uploaded;
    int64_t tokens = 0;           // Slots and positions before the padding.
    int64_t rows = 0;             // Rows of seq_lens written.
    std::vector<RowState> table;  // [max_sequences]
  };
  struct Range {
    size_t begin = 0, end = 0;  // Bytes from the start of the buffers.
  };

  GraphStepBuffers(Device* device, int64_t max_tokens, int64_t max_sequences,
                   int64_t cols)
      : device_(device),
        max_tokens_(max_tokens),
        max_sequences_(max_sequences),
        cols_(cols),
        coalesce_(device->kind() != DeviceKind::kCpu) {}

  // Makes row `row` (staging memory) hold `want`, from `have`, writing only
  // what differs; `blocks` are want's table. Then have == want.
  void UpdateRow(RowState& have, const RowState& want, const BlockId* blocks,
                 int32_t* row) const;
  // Adds bytes [begin, end) to the upload (in increasing order).
  void AddRange(size_t begin, size_t end);
  // After a failed upload: the device may hold anything, so the next Write
  // rewrites every byte a step could have written.
  void ForgetDevice();

  // Byte offsets of the four arrays.
  size_t positions_offset() const { return max_tokens_ * sizeof(int64_t); }
  size_t lens_offset() const { return 2 * max_tokens_ * sizeof(int64_t); }
  size_t table_offset() const {
    return lens_offset() + max_sequences_ * sizeof(int32_t);
  }

  Device* const device_;
  const int64_t max_tokens_;
  const int64_t max_sequences_;
  const int64_t cols_;
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
  std::vector<RowState> device_table_;  // [max_sequences]
  std::vector<Range> ranges_;           // Write's upload, reused.
  int64_t last_upload_bytes_ = 0;
  int64_t last_upload_copies_ = 0;
  int next_ = 0;                // The staging copy the next Write uses.
  int last_ = -1;               // The staging copy of the last Write.
  std::vector<char> captured_;  // [max_tokens + 1]
};

}  // namespace kvcache::internal

#endif  // KVCACHE_API_GRAPH_STEP_BUFFERS_H_
