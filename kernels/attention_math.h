// Index math of decode attention shared by the CPU twin and the CUDA kernel
// (semantics in kernels/attention_params.h), so both read the same keys.

#ifndef KVCACHE_KERNELS_ATTENTION_MATH_H_
#define KVCACHE_KERNELS_ATTENTION_MATH_H_

#include <cstdint>

#include "core/host_device.h"
#include "kernels/attention_params.h"

namespace kvcache::internal {

// One sequence of the batch as the kernels see it.
struct AttentionSeq {
  int32_t len = 0;        // Keys (clamped; <= 0 for a padding entry).
  int32_t q_begin = 0;    // First row of q.
  int32_t num_q = 0;      // Query rows (0..max_query_tokens).
  int32_t key_begin = 0;  // First key any of its rows attends.
};

KVCACHE_HOST_DEVICE int32_t ClampI32(int64_t v, int64_t lo, int64_t hi) {
  return static_cast<int32_t>(v < lo ? lo : (v > hi ? hi : v));
}

// Sequence i of validated params, with every value clamped so that no read
// leaves the buffers (attention_params.h: padding and out-of-range entries).
KVCACHE_HOST_DEVICE AttentionSeq LoadAttentionSeq(const AttentionParams& p,
                                                  int32_t i, int32_t seq_len,
                                                  int32_t q_start,
                                                  int32_t q_end) {
  AttentionSeq s;
  const int64_t capacity = p.block_table_stride * p.cache.layout.block_size;
  int64_t cap = p.max_seq_len < capacity ? p.max_seq_len : capacity;
  s.len = ClampI32(seq_len, 0, cap);
  s.q_begin = ClampI32(q_start, 0, p.num_q_tokens);
  const int32_t end = ClampI32(q_end, s.q_begin, p.num_q_tokens);
  s.num_q = ClampI32(end - s.q_begin, 0, p.max_query_tokens);
  const int64_t first_pos = static_cast<int64_t>(s.len) - s.num_q;
  s.key_begin = p.window > 0 ? ClampI32(first_pos - p.window + 1, 0, s.len) : 0;
  (void)i;
  return s;
}

// Keys [*begin, *end) that query row j of `s` attends (empty when its
// position is negative).
KVCACHE_HOST_DEVICE void AttentionRowKeys(const AttentionSeq& s, int32_t window,
                                          int32_t j, int32_t* begin,
                                          int32_t* end) {
  const int64_t pos = static_cast<int64_t>(s.len) - s.num_q + j;
  const int64_t lo = window > 0 ? pos - window + 1 : 0;
  *begin = ClampI32(lo, 0, s.len);
  *end = ClampI32(pos + 1, *begin, s.len);
}

// The cache slot of key k through a table row; -1 when its entry is outside
// [0, num_blocks) (the key is then skipped).
KVCACHE_HOST_DEVICE int64_t AttentionSlot(const int32_t* table_row,
                                          int64_t block_size,
                                          int64_t num_blocks, int64_t k) {
  const int64_t block = table_row[k / block_size];
  if (block < 0 || block >= num_blocks) return -1;
  return block * block_size + k % block_size;
}

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_ATTENTION_MATH_H_
