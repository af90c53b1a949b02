// GraphStepInputs: the fixed-address device inputs of a graph-capturable
// decode step (KVCacheManager::ReserveGraphStep, GraphStep). A plain value;
// the buffers belong to the manager and keep their addresses for its life, so
// an engine captures them (and Append's reads of them) in a CUDA graph once
// and every later ReserveGraphStep rewrites their contents on its stream.

#ifndef KVCACHE_API_GRAPH_STEP_INPUTS_H_
#define KVCACHE_API_GRAPH_STEP_INPUTS_H_

#include <cstdint>

namespace kvcache {

// After ReserveGraphStep(batch, graph_tokens) of a batch of n sequences and
// t <= graph_tokens tokens, in the backend's memory:
//
//   slot_mapping  int64 [max_tokens]   the step's t slots in batch order, then
//                                      -1 (padding, skipped by Append) up to
//                                      at least graph_tokens
//   positions     int64 [max_tokens]   each new token's position in its
//                                      sequence, then 0 for padding
//   seq_lens      int32 [max_sequences] computed + this step's tokens per
//                                      sequence (the lengths attention over
//                                      the step's own tokens needs), then 0
//   block_table   int32 [max_sequences, row_stride]  row i: sequence i's
//                                      blocks (including the ones reserved for
//                                      this step), then zeros
//
// With layer groups (KVCacheManager::GroupGraphStep(table)) each block table
// has its own slot_mapping and block_table (entries of blocks released from a
// sliding window are kNullBlock, -1), and every table shares positions and
// seq_lens. The tables' rows interleave in one buffer: row i of table t
// starts at entry i * row_stride of its block_table, row_stride being
// NumBlockTables() x max_blocks_per_sequence (without groups, the columns).
struct GraphStepInputs {
  const int64_t* slot_mapping = nullptr;
  const int64_t* positions = nullptr;
  const int32_t* seq_lens = nullptr;
  const int32_t* block_table = nullptr;
  // Limits, known before any capture: a graph may be captured for any padded
  // token count 1..max_tokens (config.graph_max_tokens), for batches of at
  // most max_sequences sequences.
  int64_t max_tokens = 0;
  int32_t max_sequences = 0;
  // Entries from one row of block_table to the next (its columns without
  // groups; NumBlockTables() x the columns with them).
  int32_t row_stride = 0;
};

}  // namespace kvcache

#endif  // KVCACHE_API_GRAPH_STEP_INPUTS_H_
