#include "kernels/attention_validation.h"

#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"
#include "kernels/kernel_validation.h"

namespace kvcache::internal {
namespace {

using absl::InvalidArgumentError;
using absl::StrCat;

bool Aligned(const void* p, size_t n) {
  return reinterpret_cast<uintptr_t>(p) % n == 0;
}

// A [tokens, heads, size] operand: non-null, aligned, non-negative strides
// that fit, and (for the output) rows that do not overlap.
absl::Status CheckOperand(const char* what, const void* data, int64_t tokens,
                          int64_t heads, int64_t size, int64_t token_stride,
                          int64_t head_stride, bool output) {
  if (data == nullptr) return InvalidArgumentError(StrCat(what, " is null"));
  if (!Aligned(data, 2)) {
    return InvalidArgumentError(StrCat(what, " is not 2-byte aligned"));
  }
  if (token_stride < 0 || head_stride < 0) {
    return InvalidArgumentError(StrCat(what, " strides (", token_stride, ", ",
                                       head_stride, ") are negative"));
  }
  constexpr int64_t kLimit = int64_t{1} << 40;
  if (token_stride > kLimit || head_stride > kLimit) {
    return InvalidArgumentError(StrCat(what, " strides (", token_stride, ", ",
                                       head_stride, ") exceed 2^40 elements"));
  }
  if (!output) return absl::OkStatus();
  const bool heads_inner =
      heads <= 1 || tokens <= 1 || head_stride <= token_stride;
  const int64_t inner_stride = heads_inner ? head_stride : token_stride;
  const int64_t inner_count = heads_inner ? heads : tokens;
  const int64_t outer_stride = heads_inner ? token_stride : head_stride;
  const int64_t outer_count = heads_inner ? tokens : heads;
  if (inner_count > 1 && inner_stride < size) {
    return InvalidArgumentError(StrCat(what, " stride ", inner_stride,
                                       " is less than ", size,
                                       ": output rows would overlap"));
  }
  const int64_t extent = inner_count > 1 ? inner_count * inner_stride : size;
  if (outer_count > 1 && outer_stride < extent) {
    return InvalidArgumentError(StrCat(what, " stride ", outer_stride,
                                       " is less than ", extent,
                                       ": output rows would overlap"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateAttention(const AttentionParams& p) {
  KVCACHE_RETURN_IF_ERROR(ValidateLayerCache(p.cache));
  const CacheLayout& layout = p.cache.layout;
  if (!layout.has_value()) {
    return InvalidArgumentError(
        "attention over a K-only (latent, head_size_v 0) cache is not "
        "supported: the attention kernels read V rows");
  }
  if (layout.records()) {
    return InvalidArgumentError(StrCat(
        "attention over a cache in records (record_pitch ", layout.record_pitch,
        ": layer groups of several shapes) is not supported"));
  }
  if (p.q_dtype != DType::kBFloat16 && p.q_dtype != DType::kFloat16) {
    return InvalidArgumentError(StrCat("q dtype ", DTypeName(p.q_dtype),
                                       " is not bfloat16 or float16"));
  }
  if (p.num_q_heads < 1 || p.num_q_heads % layout.num_heads != 0) {
    return InvalidArgumentError(StrCat(
        "num_q_heads ", p.num_q_heads,
        " is not a positive multiple of num_kv_heads ", layout.num_heads));
  }
  const int64_t group = p.num_q_heads / layout.num_heads;
  if (group > kMaxAttentionGroupSize) {
    return InvalidArgumentError(StrCat("GQA group of ", group,
                                       " query heads per KV head exceeds ",
                                       kMaxAttentionGroupSize));
  }
  if (p.num_q_tokens < 0 || p.num_seqs < 0) {
    return InvalidArgumentError(StrCat("num_q_tokens ", p.num_q_tokens,
                                       " or num_seqs ", p.num_seqs,
                                       " is negative"));
  }
  if (p.max_query_tokens < 1 || p.max_query_tokens > kMaxAttentionQueryTokens) {
    return InvalidArgumentError(StrCat("max_query_tokens ", p.max_query_tokens,
                                       " is not in [1, ",
                                       kMaxAttentionQueryTokens, "]"));
  }
  if (p.max_seq_len < 0) {
    return InvalidArgumentError(
        StrCat("max_seq_len ", p.max_seq_len, " is negative"));
  }
  if (!std::isfinite(p.softmax_scale)) {
    return InvalidArgumentError(
        StrCat("softmax_scale ", p.softmax_scale, " is not finite"));
  }
  if (!(p.soft_cap >= 0.0f) || !std::isfinite(p.soft_cap)) {
    return InvalidArgumentError(
        StrCat("soft_cap ", p.soft_cap, " is not a finite value >= 0"));
  }
  if (p.window < 0) {
    return InvalidArgumentError(StrCat("window ", p.window, " is negative"));
  }
  if (p.num_splits < 0 || p.num_splits > kMaxAttentionSplits) {
    return InvalidArgumentError(StrCat("num_splits ", p.num_splits,
                                       " is not in [0, ", kMaxAttentionSplits,
                                       "]"));
  }
  if (p.variant < 0 || p.variant >= kNumAttentionVariants) {
    return InvalidArgumentError(StrCat("variant ", p.variant, " is not in [0, ",
                                       kNumAttentionVariants - 1, "]"));
  }
  if (p.num_q_tokens == 0 || p.num_seqs == 0) return absl::OkStatus();
  KVCACHE_RETURN_IF_ERROR(CheckOperand("q", p.q, p.num_q_tokens, p.num_q_heads,
                                       layout.head_size, p.q_token_stride,
                                       p.q_head_stride, false));
  KVCACHE_RETURN_IF_ERROR(CheckOperand("o", p.o, p.num_q_tokens, p.num_q_heads,
                                       layout.head_size_v, p.o_token_stride,
                                       p.o_head_stride, true));
  if (p.block_table == nullptr || p.seq_lens == nullptr ||
      p.q_start == nullptr) {
    return InvalidArgumentError(
        "block_table, seq_lens and q_start must not be null");
  }
  if (!Aligned(p.block_table, 4) || !Aligned(p.seq_lens, 4) ||
      !Aligned(p.q_start, 4)) {
    return InvalidArgumentError(
        "block_table, seq_lens and q_start must be 4-byte aligned");
  }
  if (p.block_table_stride < 1 || p.block_table_stride > (int64_t{1} << 31)) {
    return InvalidArgumentError(StrCat(
        "block_table_stride ", p.block_table_stride, " is not in [1, 2^31]"));
  }
  return absl::OkStatus();
}

absl::Status CheckAttentionBatch(const AttentionParams& p,
                                 const int32_t* block_table,
                                 const int32_t* seq_lens,
                                 const int32_t* q_start) {
  const CacheLayout& layout = p.cache.layout;
  if (p.num_seqs == 0) return absl::OkStatus();
  if (q_start[0] < 0) {
    return InvalidArgumentError(
        StrCat("q_start[0] = ", q_start[0], " is negative"));
  }
  for (int32_t i = 0; i < p.num_seqs; ++i) {
    const int32_t rows = q_start[i + 1] - q_start[i];
    if (q_start[i + 1] < q_start[i] || q_start[i + 1] > p.num_q_tokens ||
        rows > p.max_query_tokens) {
      return InvalidArgumentError(StrCat(
          "sequence ", i, ": q rows [", q_start[i], ", ", q_start[i + 1],
          ") are not a range of at most max_query_tokens ", p.max_query_tokens,
          " rows within the ", p.num_q_tokens, " rows of q"));
    }
    if (seq_lens[i] > p.max_seq_len) {
      return InvalidArgumentError(StrCat("seq_lens[", i, "] = ", seq_lens[i],
                                         " exceeds max_seq_len ",
                                         p.max_seq_len));
    }
    const int64_t blocks =
        (static_cast<int64_t>(seq_lens[i]) + layout.block_size - 1) /
        layout.block_size;
    if (blocks > p.block_table_stride) {
      return InvalidArgumentError(StrCat(
          "seq_lens[", i, "] = ", seq_lens[i], " needs ", blocks,
          " blocks, more than block_table_stride ", p.block_table_stride));
    }
    KVCACHE_RETURN_IF_ERROR(CheckBlockTableIndices(
        block_table + i * p.block_table_stride, blocks, layout.num_blocks));
  }
  return absl::OkStatus();
}

}  // namespace kvcache::internal
