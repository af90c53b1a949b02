// GraphStepBuffers: the persistent, fixed-address inputs of the graph-
// capturable decode step (api/graph_step_inputs.h), allocated once at Create
// when config.graph_max_tokens > 0, and what the manager knows of the graphs
// captured over them.
//
// Device layout (one allocation, so one upload per step):
//
//   int64 slot_mapping [max_tokens] | int64 positions [max_tokens] |
//   int32 seq_lens [max_sequences]  | int32 block_table [max_sequences, cols]
//
// The host side is staged in two pinned copies used in turn, so writing step
// N+1's inputs waits at most for step N-1's upload, never for step N's. Each
// staging copy remembers how far its last contents reached (tokens, rows,
// blocks per row), so a step rewrites only what changed: padding stays -1
// (slots), 0 (positions, lengths) and zeros (table columns past a sequence's
// blocks) without refilling whole buffers. The upload covers the step's rows
// and whatever the previous contents reached, on the caller's stream, after
// earlier work on that stream (the graph replays that read the last inputs).
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
#include "core/plan_sequence.h"
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
  // `layout` (its sequences), `tables` (their block tables, including this
  // step's blocks) and padding up to `graph_tokens`, then uploads them on
  // `stream`. REQUIRES: slots.size() <= graph_tokens <= max_tokens,
  // layout.size() == tables.size() <= max_sequences, every table at most
  // cols blocks. On error nothing was uploaded.
  absl::Status Write(absl::Span<const int64_t> slots,
                     absl::Span<const PlanSequence> layout,
                     absl::Span<const absl::Span<const BlockId>> tables,
                     int64_t graph_tokens, void* stream);
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

 private:
  struct Staging {
    Buffer host;
    Event uploaded;
    int64_t tokens = 0;  // Slots and positions written before the padding.
    int64_t rows = 0;    // Rows of seq_lens and block_table written.
    std::vector<int32_t> row_blocks;  // Per row: nonzero table columns.
  };

  GraphStepBuffers(Device* device, int64_t max_tokens, int64_t max_sequences,
                   int64_t cols)
      : device_(device),
        max_tokens_(max_tokens),
        max_sequences_(max_sequences),
        cols_(cols) {}

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
  Buffer device_buffer_;
  Staging staging_[2];
  int next_ = 0;                // The staging copy the next Write uses.
  int last_ = -1;               // The staging copy of the last Write.
  std::vector<char> captured_;  // [max_tokens + 1]
};

}  // namespace kvcache::internal

#endif  // KVCACHE_API_GRAPH_STEP_BUFFERS_H_
