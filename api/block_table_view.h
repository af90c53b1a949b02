// BlockTableView: a batch's block tables and lengths as BatchBlockTable hands
// them to an engine's attention kernel. A plain value; the buffers belong to
// the manager.

#ifndef KVCACHE_API_BLOCK_TABLE_VIEW_H_
#define KVCACHE_API_BLOCK_TABLE_VIEW_H_

#include <cstdint>

namespace kvcache {

// A batch's block tables in fixed buffers of the backend's memory (the same
// pointers on every call, so they can be captured in a CUDA graph): row i holds
// sequence i's block ids, then zeros.
struct BlockTableView {
  const int32_t* block_table = nullptr;  // [num_sequences, row_stride]
  // [num_sequences]: computed tokens per sequence.
  const int32_t* seq_lens = nullptr;
  int32_t num_sequences = 0;
  int32_t max_blocks = 0;  // Longest table in this batch.
  int32_t row_stride = 0;  // Columns of the buffer (max_blocks_per_sequence).
};

}  // namespace kvcache

#endif  // KVCACHE_API_BLOCK_TABLE_VIEW_H_
