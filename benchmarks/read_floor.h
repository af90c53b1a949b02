// Read-only kernels that move exactly the bytes decode attention must read,
// and nothing else: the floor under attention_benchmark's "% of copy"
// (attention_floor_benchmark.cc). No arithmetic beyond an XOR of every word
// read (written once per thread block, so the loads cannot be dropped).
//
// Thread-safety: the launchers are stateless; the caller owns every buffer.

#ifndef KVCACHE_BENCHMARKS_READ_FLOOR_H_
#define KVCACHE_BENCHMARKS_READ_FLOOR_H_

#include <cstdint>

namespace kvcache::bench {

// A paged cache read through a block table, as attention reads it: for each
// sequence, its blocks' K and V bytes (block_bytes each: block_size token
// rows of num_heads heads) and, when scale_bytes > 0, their K and V scales
// (block_size x num_heads floats per block). Grid: num_splits x num_seqs x
// head_groups thread blocks; split s of a sequence reads its blocks
// [s * n / num_splits, (s + 1) * n / num_splits), head group g the heads
// [g * num_heads / head_groups, (g + 1) * num_heads / head_groups) of each
// token row (head_groups = 1: the whole block, one contiguous run).
struct PagedReadParams {
  const void* key = nullptr;  // [num_blocks][block_bytes]
  const void* value = nullptr;
  const void* key_scale = nullptr;  // [num_blocks][scale_bytes] or null
  const void* value_scale = nullptr;
  int64_t block_bytes = 0;
  int64_t scale_bytes = 0;  // block_size x num_heads x 4, or 0.
  int32_t block_size = 16;
  int32_t num_heads = 1;
  // Divides num_heads; a group's bytes of a block are 1 to 16 pieces of 16
  // bytes per thread.
  int32_t head_groups = 1;
  const int32_t* block_table = nullptr;  // [num_seqs][blocks_per_seq]
  int32_t num_seqs = 0;
  int32_t blocks_per_seq = 0;
  int32_t num_splits = 1;
  uint32_t* out = nullptr;  // [num_seqs * head_groups * num_splits]
};

// Launch status as a cudaError_t value (0 = success); -1 for bad params.
int LaunchPagedRead(const PagedReadParams& p, int threads, void* stream);

// `bytes` (a multiple of 16) of contiguous device memory, grid-strided by
// `grid` thread blocks of 256 threads, 4 loads of 16 bytes in flight per
// thread; out: [grid].
int LaunchLinearRead(const void* data, int64_t bytes, uint32_t* out, int grid,
                     void* stream);

}  // namespace kvcache::bench

#endif  // KVCACHE_BENCHMARKS_READ_FLOOR_H_
