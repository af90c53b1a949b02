// Argument validation of decode attention (kernels/attention_params.h), shared
// by the CPU and CUDA launchers and the manager. InvalidArgument naming the bad
// value and its limit. ValidateAttention reads no pointer; CheckAttentionBatch
// reads the batch arrays, which must be host-readable (the CPU backend always;
// the CUDA backend in debug builds, after copying them to the host).

#ifndef KVCACHE_KERNELS_ATTENTION_VALIDATION_H_
#define KVCACHE_KERNELS_ATTENTION_VALIDATION_H_

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/attention_params.h"

namespace kvcache::internal {

absl::Status ValidateAttention(const AttentionParams& params);

// q_start is non-decreasing within [0, num_q_tokens] with at most
// max_query_tokens rows per sequence, seq_lens <= max_seq_len, and the
// block-table entries a sequence reads are < num_blocks.
absl::Status CheckAttentionBatch(const AttentionParams& params,
                                 const int32_t* block_table,
                                 const int32_t* seq_lens,
                                 const int32_t* q_start);

}  // namespace kvcache::internal

#endif  // KVCACHE_KERNELS_ATTENTION_VALIDATION_H_
