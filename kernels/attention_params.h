// Parameters of paged decode attention over the cache (kernels/attention.cuh,
// kernels/cpu_attention.h): a batch of sequences, each with 1 to
// kMaxAttentionQueryTokens new query tokens whose K/V are already in the cache,
// attends its cached keys through its block table. Plain struct, passed by
// value to the CPU and the CUDA implementation; all strides count elements.
//
// For sequence i with L = seq_lens[i] keys and T query rows
// q[q_start[i], q_start[i+1]) (T <= max_query_tokens), query row j is the token
// at position p = L - T + j and attends the keys k with
//
//     k <= p                       (causal among the new tokens)
//     k > p - window               (when window > 0: a sliding window)
//
// o[row, h] = softmax_k(x_k) . V_k   with   x_k = scale * (q[row, h] . K_k),
// and, with soft_cap > 0, x_k = soft_cap * tanh(x_k / soft_cap). Query head h
// reads KV head h / (num_q_heads / num_kv_heads) (grouped-query attention).
// K_k and V_k are the dequantized cache rows (code * scale, DESIGN.md section
// 3) of the slot block_table[i][k / block_size] * block_size + k % block_size.
//
// Padding and out-of-range entries never read outside the buffers:
//   - a sequence with L <= 0 (a padding entry) writes zeros to its query rows;
//   - a query row that attends no key (p < 0) is written as zeros;
//   - keys whose block-table entry is negative or >= num_blocks are skipped,
//     and L is clamped to the table row's capacity (row_stride * block_size);
//   - q_start values are clamped to [0, num_q_tokens]; rows of q covered by
//     no sequence are not written.

#ifndef KVCACHE_KERNELS_ATTENTION_PARAMS_H_
#define KVCACHE_KERNELS_ATTENTION_PARAMS_H_

#include <cstdint>

#include "core/cache_layout.h"
#include "core/dtype.h"

namespace kvcache {

inline constexpr int32_t kMaxAttentionQueryTokens = 8;
inline constexpr int32_t kMaxAttentionGroupSize = 16;
// Split-KV: at most this many thread blocks share one sequence's keys.
inline constexpr int32_t kMaxAttentionSplits = 64;
// Kernel variants selectable through AttentionParams::variant (performance
// experiments; kernels/attention_policy.cc defines them): 0 "auto" is the
// launcher's policy (KV heads per block and blocks per multiprocessor chosen
// per cache type and shape; K rows copied in row order: whole 128-byte lines
// per L2 request), 1 "base" the fixed choice before it (4 heads per block
// when they divide the KV heads, 3 blocks per multiprocessor); 2-7 force one
// part: heads per block 1 or 2, the kernel sized for 4 blocks per
// multiprocessor (8-bit caches, head sizes up to 128), heads per block by
// the first shape rule (auto_heads), and combinations. 1-7 copy K in operand
// order (the v4 kernel: two 64-byte requests per 128-byte line), as does 8
// "auto_v4" (the policy as it was before row copies); 9-13 "rows_*" force
// heads and blocks per multiprocessor with row copies (and swapped narrow
// tiles for 8-bit caches, as 0 "auto"); 14 "auto_v5" is the policy without
// swapped tiles; 15 "auto_v7" is the policy before the v10 swapped tiles
// (variant 0's int8 tiles compute S^T on the integer tensor cores, fp8 ones
// in two accumulator chains, both with the L2::256B hint on code copies:
// kernels/attention.cuh AttnConfig).
inline constexpr int32_t kNumAttentionVariants = 16;
inline constexpr const char* kAttentionVariantNames[kNumAttentionVariants] = {
    "auto",        "base",
    "heads1",      "heads2",
    "occ4",        "occ4_heads1",
    "auto_heads",  "occ4_auto_heads",
    "auto_v4",     "rows_base",
    "rows_heads1", "rows_heads2",
    "rows_occ4",   "rows_occ4_heads1",
    "auto_v5",     "auto_v7"};

// Split-KV scratch, allocated once by the caller (so a launch allocates
// nothing and can be captured in a CUDA graph). A launch with S splits over
// R = num_q_tokens * num_q_heads output rows needs R * S * head_size_v floats
// of partial_o and R * S floats of partial_lse; the launcher lowers S to what
// fits (S = 1 needs no workspace at all).
struct AttentionWorkspace {
  float* partial_o = nullptr;
  float* partial_lse = nullptr;
  int64_t partial_o_floats = 0;    // Capacity of partial_o.
  int64_t partial_lse_floats = 0;  // Capacity of partial_lse.
};

struct AttentionParams {
  LayerCache cache;  // Read only.

  // q [num_q_tokens, num_q_heads, head_size], bfloat16 or float16.
  const void* q = nullptr;
  DType q_dtype = DType::kBFloat16;
  int64_t q_token_stride = 0;
  int64_t q_head_stride = 0;
  // o [num_q_tokens, num_q_heads, head_size_v], the dtype of q.
  void* o = nullptr;
  int64_t o_token_stride = 0;
  int64_t o_head_stride = 0;
  int32_t num_q_tokens = 0;
  int32_t num_q_heads = 0;

  // Batch (device memory on CUDA).
  int32_t num_seqs = 0;
  const int32_t* block_table = nullptr;  // [num_seqs, block_table_stride]
  int64_t block_table_stride = 0;        // Entries per row.
  const int32_t* seq_lens = nullptr;     // [num_seqs] keys, incl. the queries
  const int32_t* q_start = nullptr;      // [num_seqs + 1] rows of q
  // Host-known bounds: every T_i <= max_query_tokens (1..8), every seq_len <=
  // max_seq_len (sizes the split; longer sequences are clamped to it).
  int32_t max_query_tokens = 1;
  int32_t max_seq_len = 0;

  float softmax_scale = 1.0f;
  float soft_cap = 0.0f;  // 0 = off.
  int32_t window = 0;     // 0 = off.

  AttentionWorkspace workspace;  // CUDA only; the CPU ignores it.
  // CUDA only: splits per sequence, 0 = chosen by the launcher (the tests
  // force values); lowered to what the workspace holds.
  int32_t num_splits = 0;
  // CUDA only: the kernel variant, for performance experiments
  // (benchmarks/experiments/attention_variants.sh); 0 = the launcher's
  // policy (the default), 1 = the fixed choice before it (for A/B runs).
  // Every variant computes the same result to within the tests' tolerance;
  // kernels/attention.cuh lists them (kAttentionVariantNames).
  int32_t variant = 0;
};

}  // namespace kvcache

#endif  // KVCACHE_KERNELS_ATTENTION_PARAMS_H_
